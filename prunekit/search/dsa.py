"""DSA: evolutionary search of allocation programs (:mod:`prunekit.search.program`).

Generational GA, every random choice from one seeded ``random.Random``:
  - generation 0: the seed programs (the paper's LLaMA-7B program and an OWL-like one, when valid on
    this model) + random programs, ``population`` in all;
  - next generation: the ``elite`` best programs survive unchanged; every other child comes from two
    tournament-selected parents (``tournament`` contestants each), uniform crossover of the program's
    sections with probability ``p_crossover`` (else a copy of the first parent), then a mutation with
    probability ``p_mutation`` (always, when the child equals a parent);
  - de-duplication: a child must be *novel*: its canonical text and the ratios it gives on this model
    differ from every evaluated program and every other child (else it is varied again, and after
    ``max_tries`` replaced by a random program). Programs that are nan/inf on this model are
    rejected at birth (they never cost an evaluation);
  - fitness: held-out perplexity of the model pruned with the program's ratios
    (:class:`prunekit.search.fitness.Fitness`), memoised by canonical text;
  - ``budget`` = number of perplexity evaluations; the search stops when it is spent (possibly within
    a generation).
Checkpoint: ``<out_dir>/dsa_state.json``, written atomically (temp file + rename) after each new
generation is drawn and after *every* evaluation; it holds the RNG state, the current generation, the
table of evaluated programs and the history. Resuming (after an exception or ``kill -9``) reloads it,
evaluates the rest of the current generation and goes on: evaluation consumes no randomness, so the
resumed run is identical to an uninterrupted one. A larger ``budget`` on resume continues the search.
"""
from __future__ import annotations

import math
import random
import time
from pathlib import Path

from pydantic import Field
from tqdm.auto import tqdm

from ..core.errors import PrunekitError
from ..core.registry import Int, Params
from ..methods.dsa import BlockScores, InvalidProgram, Program, crossover, dsa_final_ratios, mutate, random_program
from ..pruning.allocator_inputs import score_profile, score_profile_from_stats, stats_cover_scores
from . import checkpoint
from .registry import register_search

DEFAULT_SEEDS = (
    "pre:abslog|red:var|tr:atan,asin|post:none",  # found for LLaMA-1-7B in the DSA paper
    "pre:none|red:outlier5|tr:neg|post:none",  # OWL-like: more outliers (M=5) -> less pruning
)
STATE_VERSION = 1
UNIFORM = "<uniform>"


def _rng_state(rng: random.Random):
    v, state, gauss = rng.getstate()
    return [v, list(state), gauss]


def _set_rng_state(rng: random.Random, s) -> None:
    rng.setstate((s[0], tuple(s[1]), s[2]))


class ProgramSpace:
    """Programs -> exact per-layer ratios on one model (what ``allocate('dsa', ...)`` would give)."""

    def __init__(self, summary, target: float, lam: float = 0.08, max_ratio: float = 0.99):
        self.summary, self.target, self.lam, self.max_ratio = summary, float(target), float(lam), max_ratio
        self.blocks = BlockScores.from_summary(summary)
        self.block_of_first = {}
        for l in summary.layers:
            self.block_of_first.setdefault(l.block, l.name)

    def ratios(self, prog: Program) -> dict[str, float]:
        """Raises :class:`InvalidProgram` if the program is nan/inf on this model."""
        return dsa_final_ratios(self.summary, self.target, prog, self.lam, self.blocks, self.max_ratio)

    def block_list(self, ratios: dict[str, float]) -> list[float]:
        return [ratios[self.block_of_first[b]] for b in sorted(self.block_of_first)]

    @staticmethod
    def key(ratios: dict[str, float]) -> tuple:
        return tuple(round(v, 10) for v in ratios.values())


class ProgramSearch:
    """The search loop shared by DSA and the random-search baseline (which only overrides
    :meth:`next_population`)."""

    method = "dsa"

    def __init__(self, space: ProgramSpace, fitness, budget: int, out_dir=None, seed: int = 0, resume: bool = True,
                 population: int = 16, elite: int = 2, tournament: int = 3, p_crossover: float = 0.7,
                 p_mutation: float = 0.9, seed_programs=DEFAULT_SEEDS, max_tries: int = 50,
                 fingerprint: dict | None = None, progress: bool = True):
        if budget < 1:
            raise PrunekitError("search budget must be >= 1 evaluation")
        if population < 2 or not 0 <= elite < population or tournament < 1:
            raise PrunekitError("need population >= 2, 0 <= elite < population, tournament >= 1")
        self.space, self.fitness, self.budget = space, fitness, int(budget)
        self.seed, self.population_size, self.elite, self.tournament = seed, population, elite, tournament
        self.p_crossover, self.p_mutation, self.max_tries = p_crossover, p_mutation, max_tries
        self.seed_programs = [Program.parse(p).canonical() for p in (seed_programs or ())]
        self.progress = progress
        self.params = {"population": population, "elite": elite, "tournament": tournament,
                       "p_crossover": p_crossover, "p_mutation": p_mutation, "max_tries": max_tries,
                       "seed_programs": [p.text for p in self.seed_programs]}
        self.fingerprint = dict(fingerprint or {}, method=self.method, seed=seed, target=space.target, lam=space.lam,
                                n_blocks=len(space.blocks), params=self.params)
        self.path = Path(out_dir) / f"{self.method}_state.json" if out_dir is not None else None
        self.rng = random.Random(seed)
        self.generation = -1
        self.population: list[str] = []
        self.cache: dict[str, dict] = {}  # canonical text -> {"fitness", "block_ratios", "duplicate_of"}
        # the uniform allocation is the baseline, evaluated outside the budget: programs that give it
        # (constant on this model) are not novel
        self.uniform = {l.name: self.space.target for l in self.space.summary.layers}
        self.ratio_index: dict[tuple, str] = {self.space.key(self.uniform): UNIFORM}
        self.history: list[dict] = []
        self.baselines: dict = {}
        self.resumed_from = None
        if self.path is not None:
            checkpoint.start([self.path], resume)
            if self.path.exists():
                self._load()

    # ---- checkpoint --------------------------------------------------------------------------
    def _save(self) -> None:
        if self.path is None:
            return
        checkpoint.save_json(self.path, {
            "version": STATE_VERSION, "fingerprint": self.fingerprint, "rng": _rng_state(self.rng),
            "generation": self.generation, "population": self.population, "cache": self.cache,
            "history": self.history, "baselines": self.baselines})

    def _load(self) -> None:
        st = checkpoint.load_json(self.path)
        if st.get("version") != STATE_VERSION:
            checkpoint.check_fingerprint(None, self.fingerprint, self.path)
        checkpoint.check_fingerprint(st.get("fingerprint"), self.fingerprint, self.path)
        _set_rng_state(self.rng, st["rng"])
        self.generation, self.population = st["generation"], st["population"]
        self.cache, self.history, self.baselines = st["cache"], st["history"], st.get("baselines", {})
        for text, e in self.cache.items():
            if e.get("block_ratios") is not None and e.get("duplicate_of") is None:
                ratios = self.space.ratios(Program.parse(text))
                self.ratio_index.setdefault(self.space.key(ratios), text)
        self.resumed_from = {"evaluations": len(self.history), "generation": self.generation}

    # ---- candidates --------------------------------------------------------------------------
    def _candidate(self, prog: Program, taken: dict) -> tuple[Program, tuple] | None:
        """(canonical program, ratio key) if valid on this model and novel, else None."""
        prog = prog.canonical()
        text = prog.text
        if text in self.cache or text in taken:
            return None
        try:
            ratios = self.space.ratios(prog)
        except InvalidProgram:
            return None
        k = self.space.key(ratios)
        if k in self.ratio_index or k in taken.values():
            return None
        return prog, k

    def _random_novel(self, taken: dict, tries: int = 200) -> Program | None:
        for _ in range(tries):
            c = self._candidate(random_program(self.rng), taken)
            if c is not None:
                taken[c[0].text] = c[1]
                return c[0]
        return None

    def initial_population(self) -> list[str]:
        taken: dict[str, tuple] = {}
        for p in self.seed_programs:
            c = self._candidate(p, taken)
            if c is not None and len(taken) < self.population_size:
                taken[c[0].text] = c[1]
        while len(taken) < self.population_size:
            if self._random_novel(taken) is None:
                break
        return list(taken)

    def fitness_of(self, text: str) -> float:
        return self.cache[text]["fitness"]

    def _tournament(self, pool: list[str]) -> str:
        contestants = [self.rng.choice(pool) for _ in range(self.tournament)]
        return min(contestants, key=lambda t: (self.fitness_of(t), pool.index(t)))

    def next_population(self) -> list[str]:
        pool = [t for t in self.population if t in self.cache and math.isfinite(self.fitness_of(t))]
        if not pool:
            return self.initial_population()
        ranked = sorted(pool, key=lambda t: (self.fitness_of(t), pool.index(t)))
        nxt = ranked[: self.elite]
        taken: dict[str, tuple] = {}
        while len(nxt) + len(taken) < self.population_size:
            child = None
            for _ in range(self.max_tries):
                a, b = Program.parse(self._tournament(pool)), Program.parse(self._tournament(pool))
                p = crossover(a, b, self.rng) if self.rng.random() < self.p_crossover else a
                if self.rng.random() < self.p_mutation or p.text in (a.text, b.text):
                    p = mutate(p, self.rng)
                if p.text in nxt:
                    continue
                c = self._candidate(p, taken)
                if c is not None:
                    child = c
                    break
            if child is not None:
                taken[child[0].text] = child[1]
            elif self._random_novel(taken) is None:
                break  # the space near this population is exhausted
        return nxt + list(taken)

    # ---- evaluation --------------------------------------------------------------------------
    def _evaluate(self, text: str, bar) -> None:
        if text in self.cache:
            return
        prog = Program.parse(text)
        try:
            ratios = self.space.ratios(prog)
        except InvalidProgram:  # only user-given seeds can get here
            self.cache[text] = {"fitness": math.inf, "block_ratios": None, "duplicate_of": None}
            self._save()
            return
        k = self.space.key(ratios)
        if k in self.ratio_index:  # same ratios as an evaluated program: same fitness, no cost
            other = self.ratio_index[k]
            if other == UNIFORM:
                self.cache[text] = {"fitness": self.baselines["uniform"], "block_ratios": self.space.block_list(ratios),
                                    "duplicate_of": UNIFORM}
            else:
                self.cache[text] = dict(self.cache[other], duplicate_of=other)
            self._save()
            return
        f = float(self.fitness.evaluate(ratios))
        self.cache[text] = {"fitness": f, "block_ratios": self.space.block_list(ratios), "duplicate_of": None}
        self.ratio_index[k] = text
        entry = {"eval": len(self.history) + 1, "generation": self.generation, "program": text, "fitness": f}
        self.history.append(entry)
        best = self.best()
        entry.update(best_fitness=best["fitness"], best_program=best["program"])
        self._save()
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"gen {self.generation} best {best['fitness']:.4g}")

    def best(self) -> dict:
        """The evaluated program with the lowest fitness (ties: the earlier evaluation)."""
        if not self.history:
            return {"program": None, "fitness": math.inf}
        h = min(self.history, key=lambda e: (e["fitness"], e["eval"]))
        return {"program": h["program"], "fitness": h["fitness"], "block_ratios": self.cache[h["program"]]["block_ratios"]}

    def run(self) -> dict:
        t0 = time.time()
        if "uniform" not in self.baselines:
            self.baselines = {"dense": float(self.fitness.evaluate(None)),
                              "uniform": float(self.fitness.evaluate(self.uniform))}
            self._save()
        bar = tqdm(total=self.budget, initial=min(len(self.history), self.budget), desc=self.method.upper(),
                   unit="eval", disable=not self.progress, dynamic_ncols=True)
        stale = 0
        try:
            while len(self.history) < self.budget:
                if self.generation < 0 or all(t in self.cache for t in self.population):
                    self.population = self.initial_population() if self.generation < 0 else self.next_population()
                    self.generation += 1
                    self._save()
                    if not self.population:
                        break
                before = len(self.history)
                bar.set_postfix_str(f"gen {self.generation} best {self.best()['fitness']:.4g}")
                for text in self.population:
                    if len(self.history) >= self.budget:
                        break
                    self._evaluate(text, bar)
                stale = stale + 1 if len(self.history) == before else 0
                if stale >= 3:  # no new program could be bred three generations in a row
                    break
        finally:
            bar.close()
        return self.result(time.time() - t0)

    def result(self, seconds: float) -> dict:
        best = self.best()
        prog = Program.parse(best["program"]) if best["program"] else None
        valid = sum(1 for e in self.cache.values() if e["block_ratios"] is not None)
        return {
            "method": self.method,
            "budget": self.budget,
            "evaluations": len(self.history),
            "generations": self.generation + 1,
            "target": self.space.target,
            "lam": self.space.lam,
            "best": {"program": best["program"], "readable": prog.readable() if prog else None,
                     "fitness": best["fitness"], "block_ratios": best.get("block_ratios")},
            "baselines": self.baselines,
            "history": self.history,
            "programs_seen": len(self.cache),
            "programs_valid": valid,
            "params": self.params,
            "seed": self.seed,
            "checkpoint": str(self.path) if self.path else None,
            "resumed_from": self.resumed_from,
            "seconds": round(seconds, 2),
        }


def search_dsa(space: ProgramSpace, fitness, budget: int, out_dir=None, seed: int = 0, resume: bool = True,
               **params) -> dict:
    return ProgramSearch(space, fitness, budget, out_dir, seed, resume, **params).run()


def program_space(setup) -> ProgramSpace:
    """DSA's programs on this model: the block scores come from the statistics the cached fitness already holds
    for these windows when they cover the metric's score (no second pass), else from one calibration pass."""
    fit = setup.fitness
    if fit.stats and all(stats_cover_scores(fit.stats.get(n), fit.metric) for n in fit.layers):
        setup.summary.scores = score_profile_from_stats(fit.block_layers, fit.stats, fit.metric, setup.seed)
    else:
        setup.summary.scores = score_profile(setup.model, fit.blocks, fit.block_layers, setup.calib_ids, fit.metric,
                                             fit.device, setup.batch_size, setup.seed)
    return ProgramSpace(setup.summary, setup.target, setup.lam)


def program_recipe(res: dict, setup) -> dict:
    return {"allocation": "dsa", "allocation_params": {"program": res["best"]["program"], "lam": setup.lam},
            "sparsity": float(setup.target)}


class DSAParams(Params):
    population: Int = Field(16, ge=2)
    elite: Int = Field(2, ge=0, description="best programs kept unchanged (< population)")
    tournament: Int = Field(3, ge=1)
    p_crossover: float = Field(0.7, ge=0, le=1)
    p_mutation: float = Field(0.9, ge=0, le=1)
    seed_programs: list[str] = list(DEFAULT_SEEDS)
    max_tries: Int = Field(50, ge=1)


@register_search("dsa", params=DSAParams)
def run_dsa(setup, budget, out_dir, resume, progress, fingerprint, **params) -> tuple[dict, dict]:
    res = search_dsa(program_space(setup), setup.fitness, budget, out_dir, setup.seed, resume,
                     fingerprint=fingerprint, progress=progress, **params)
    return res, program_recipe(res, setup)
