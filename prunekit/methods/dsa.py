"""DSA allocation programs: a small program maps a block's element scores to one number, and the
numbers of all blocks are mapped OWL-style to per-block sparsity ratios.

Grammar (canonical text form, what is saved in recipes)::

    pre:OP[,OP]|red:RED|tr:OP[,OP[,OP]]|post:POST          e.g.  pre:abslog|red:var|tr:atan,asin|post:none

Sections may be given in any order; ``pre``, ``tr`` and ``post`` may be omitted (= ``none``); ``red`` is
required. The readable (paper) form is also accepted and printed by :meth:`Program.readable`::

    PRE -> RED -> TR [-> POST]                              e.g.  abslog -> var -> atan, asin

Evaluation of a program on block b (element scores x, float64):
  1. ``pre``: element-wise ops applied in order (at most :data:`MAX_PRE`);
  2. ``red``: reduction of the tensor to a scalar v_b;
  3. ``tr``: scalar ops applied in order (at most :data:`MAX_TR`);
  4. over the blocks: v is min-max normalised to s in [0, 1] (all equal -> uniform allocation);
     ``post`` re-shapes s (still in [0, 1]);
  5. OWL-style mapping (density proportional to 1 - s): D_b = (1 - s_b) * 2 lam, density
     rho_b = D_b - mean(D) + (1 - S), ratio r_b = 1 - rho_b: the ratios span 2 lam around S (exactly
     [S - lam, S + lam] when the values are symmetric, as in OWL) and a *higher* program value means
     *more* pruning; :func:`prunekit.allocate.finalize` then makes the
     parameter-weighted mean exactly S.
A program whose value is nan/inf on any block is *invalid* on that model (:class:`InvalidProgram`);
the search gives it fitness inf and never breeds from it.

The block's element scores are the concatenation of its layers' score samples (``summary.scores``,
from the pruning plan's score profile), each layer contributing evenly spaced quantiles of its
sorted sample in proportion to its parameter count (so a 65,536-element sample of a large MLP
matrix and the full scores of a small k_proj are weighted like the block itself).

Canonicalisation (:meth:`Program.canonical`) applies only rewrites that hold for every input
(identity removal, idempotent repeats, ``abs`` after a non-negative op, ``neg,neg``...), so two
programs with the same canonical text compute the same function; the search additionally
de-duplicates programs that produce the same ratios on the model at hand.

Registered allocator: ``dsa`` (needs ``scores``) with parameters ``program`` (text) and ``lam``.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Optional

import torch
from pydantic import Field

from ..core.allocation import Allocation, ModelSummary, finalize, register_allocator
from ..core.errors import PrunekitError
from ..core.registry import Params

EPS = 1e-12
MAX_PRE = 2
MAX_TR = 3


class InvalidProgram(PrunekitError):
    """The program is not in the grammar, or produces nan/inf on the given scores."""


# ----------------------------------------------------------------------------- primitives
def _minmax(x):
    lo, hi = x.min(), x.max()
    return (x - lo) / (hi - lo + EPS)


def _zscore(x):
    return (x - x.mean()) / (x.std() + EPS) if x.numel() > 1 else x - x.mean()


# element-wise pre-processing of a block's score tensor (float64, 1-D)
PRE_OPS = {
    "abs": torch.abs,
    "log": lambda x: torch.log(x.clamp_min(EPS)),  # non-positive values are clamped to EPS
    "abslog": lambda x: torch.log(x.abs() + EPS),
    "sq": torch.square,
    "sqrt": lambda x: torch.sqrt(x.abs()),  # of |x|
    "exp": torch.exp,
    "norm": lambda x: x / (x.abs().mean() + EPS),  # scale to mean |x| = 1
    "zscore": _zscore,
    "minmax": _minmax,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
}


def _entropy(x):
    p = x.abs()
    p = p / (p.sum() + EPS)
    return -(p * torch.log(p + EPS)).sum()


def _moment(x, k):
    c = x - x.mean()
    sd = c.square().mean().sqrt()
    return (c ** k).mean() / (sd ** k + EPS)


def _outlier(m):
    return lambda x: (x > m * x.mean()).double().mean()


# reductions: tensor -> scalar. Sums (fro, l1) depend on the element count, which is the same for
# every block of a model (equal sample sizes).
REDUCTIONS = {
    "mean": torch.mean,
    "median": lambda x: x.median(),
    "var": torch.var,
    "std": torch.std,
    "fro": lambda x: x.square().sum().sqrt(),
    "l1": lambda x: x.abs().sum(),
    "entropy": _entropy,
    "geomean": lambda x: torch.exp(torch.log(x.abs() + EPS).mean()),
    "max": torch.max,
    "min": torch.min,
    "skew": lambda x: _moment(x, 3),
    "kurt": lambda x: _moment(x, 4),
    "outlier3": _outlier(3.0),  # share of elements above 3 x mean (OWL's statistic)
    "outlier5": _outlier(5.0),
    "outlier10": _outlier(10.0),
}

# transforms: scalar -> scalar, applied to the vector of block values element-wise
TRANSFORMS = {
    "sin": torch.sin,
    "cos": torch.cos,
    "tan": torch.tan,
    "asin": torch.asin,  # nan outside [-1, 1] -> invalid
    "acos": torch.acos,
    "atan": torch.atan,
    "exp": torch.exp,
    "log": torch.log,  # -inf/nan for <= 0 -> invalid
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "softplus": torch.nn.functional.softplus,
    "neg": torch.neg,
    "abs": torch.abs,
    "sq": torch.square,
    "sqrt": torch.sqrt,  # nan for < 0 -> invalid
    "recip": torch.reciprocal,  # inf at 0 -> invalid
}


def _rank(s):
    n = s.numel()
    if n < 2:
        return torch.zeros_like(s)
    order = s.argsort(stable=True)
    r = torch.empty_like(s)
    r[order] = torch.arange(n, dtype=s.dtype)
    for v in s.unique():  # ties share their mean rank
        sel = s == v
        r[sel] = r[sel].mean()
    return r / (n - 1)


def _smooth(s):
    if s.numel() < 3:
        return s
    p = torch.nn.functional.pad(s[None, None], (1, 1), mode="replicate")[0, 0]
    return _minmax((p[:-2] + p[1:-1] + p[2:]) / 3)


# post-processing of the min-max normalised block values s in [0, 1] (result stays in [0, 1])
POST_OPS = {
    "none": lambda s: s,
    "sqrt": torch.sqrt,
    "sq": torch.square,
    "rank": _rank,  # ranks / (n - 1): only the order of the blocks matters
    "smooth": _smooth,  # 3-tap moving average over neighbouring blocks, re-normalised
}

# canonicalisation facts (hold for every input)
_PRE_NONNEG = {"abs", "sq", "sqrt", "exp", "minmax", "sigmoid"}
_PRE_IDEMPOTENT = {"abs", "minmax", "zscore", "norm"}
_PRE_ABS_INSIDE = {"sq", "sqrt", "abslog"}  # f(|x|) == f(x)
_TR_NONNEG = {"abs", "sq", "exp", "sigmoid", "softplus"}
_TR_IDEMPOTENT = {"abs"}
_TR_EVEN = {"abs", "sq", "cos"}  # f(-x) == f(x)


@dataclass(frozen=True)
class Program:
    pre: tuple[str, ...]
    red: str
    tr: tuple[str, ...] = ()
    post: str = "none"

    # ---- text forms -------------------------------------------------------------------------
    @property
    def text(self) -> str:
        """The canonical grammar's text of *this* program (not canonicalised)."""
        return (f"pre:{','.join(self.pre) or 'none'}|red:{self.red}|tr:{','.join(self.tr) or 'none'}"
                f"|post:{self.post}")

    def __str__(self) -> str:
        return self.text

    def readable(self) -> str:
        """The paper's arrow form, e.g. ``abslog -> var -> atan, asin``."""
        s = f"{', '.join(self.pre) or 'none'} -> {self.red} -> {', '.join(self.tr) or 'none'}"
        return s + (f" -> {self.post}" if self.post != "none" else "")

    @classmethod
    def parse(cls, text: str) -> "Program":
        if not isinstance(text, str) or not text.strip():
            raise InvalidProgram("empty DSA program")
        t = text.strip()
        if "->" in t:
            parts = [p.strip() for p in t.split("->")]
            if len(parts) not in (3, 4):
                raise InvalidProgram(f"DSA program {text!r}: the arrow form is 'PRE -> RED -> TR [-> POST]'")
            pre, red, tr = parts[:3]
            post = parts[3] if len(parts) == 4 else "none"
        else:
            fields = {}
            for part in t.split("|"):
                if ":" not in part:
                    raise InvalidProgram(f"DSA program {text!r}: section {part!r} is not 'name:value' "
                                         "(grammar: pre:OPS|red:RED|tr:OPS|post:POST)")
                k, v = (s.strip() for s in part.split(":", 1))
                if k not in ("pre", "red", "tr", "post") or k in fields:
                    raise InvalidProgram(f"DSA program {text!r}: unknown or repeated section {k!r}")
                fields[k] = v
            if "red" not in fields:
                raise InvalidProgram(f"DSA program {text!r} has no reduction (red:...)")
            pre, red, tr, post = (fields.get("pre", "none"), fields["red"], fields.get("tr", "none"),
                                  fields.get("post", "none"))

        def ops(s):
            items = [o.strip() for o in s.split(",") if o.strip()]
            return tuple(o for o in items if o not in ("none", "id"))

        prog = cls(ops(pre), red.strip(), ops(tr), post.strip() or "none")
        prog.validate()
        return prog

    def validate(self) -> "Program":
        bad = [o for o in self.pre if o not in PRE_OPS]
        if bad:
            raise InvalidProgram(f"unknown pre-processing op(s) {bad}; valid: {', '.join(PRE_OPS)}")
        if self.red not in REDUCTIONS:
            raise InvalidProgram(f"unknown reduction {self.red!r}; valid: {', '.join(REDUCTIONS)}")
        bad = [o for o in self.tr if o not in TRANSFORMS]
        if bad:
            raise InvalidProgram(f"unknown transform(s) {bad}; valid: {', '.join(TRANSFORMS)}")
        if self.post not in POST_OPS:
            raise InvalidProgram(f"unknown post-processing {self.post!r}; valid: {', '.join(POST_OPS)}")
        if len(self.pre) > MAX_PRE or len(self.tr) > MAX_TR:
            raise InvalidProgram(f"at most {MAX_PRE} pre-processing ops and {MAX_TR} transforms")
        return self

    # ---- canonical form ---------------------------------------------------------------------
    def canonical(self) -> "Program":
        def simplify(seq, nonneg, idem, abs_inside, even, involution):
            seq = list(seq)
            changed = True
            while changed:
                changed = False
                for i in range(1, len(seq)):
                    a, b = seq[i - 1], seq[i]
                    if (b == a and a in idem) or (b == "abs" and a in nonneg):
                        del seq[i]  # f(f(x)) == f(x); |g(x)| == g(x) for g >= 0
                    elif (a == "abs" and b in abs_inside) or (a == "neg" and b in even):
                        del seq[i - 1]  # f(|x|) == f(x); f(-x) == f(x)
                    elif a == b and a in involution:
                        del seq[i - 1:i + 1]  # -(-x) == x
                    else:
                        continue
                    changed = True
                    break
            return tuple(seq)

        pre = simplify(self.pre, _PRE_NONNEG, _PRE_IDEMPOTENT, _PRE_ABS_INSIDE, set(), set())
        tr = simplify(self.tr, _TR_NONNEG, _TR_IDEMPOTENT, set(), _TR_EVEN, {"neg"})
        return Program(pre, self.red, tr, self.post)

    @property
    def key(self) -> str:
        """De-duplication key: the canonical text."""
        return self.canonical().text

    # ---- evaluation -------------------------------------------------------------------------
    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        """pre-processing + reduction of one block's scores (1-D float64) -> 0-d tensor."""
        for op in self.pre:
            x = PRE_OPS[op](x)
        return REDUCTIONS[self.red](x)

    def transform(self, v: torch.Tensor) -> torch.Tensor:
        for op in self.tr:
            v = TRANSFORMS[op](v)
        return v

    def evaluate(self, x: torch.Tensor) -> float:
        """The program's value on one block's element scores (nan/inf possible: see :meth:`block_values`)."""
        return float(self.transform(self.reduce(torch.as_tensor(x, dtype=torch.float64).flatten())))

    def block_values(self, blocks) -> torch.Tensor:
        """Program value per block (``blocks``: a :class:`BlockScores` or a list of 1-D tensors).
        Raises :class:`InvalidProgram` on nan/inf."""
        if isinstance(blocks, BlockScores):
            v = blocks.reduced(self)
        else:
            v = torch.stack([self.reduce(torch.as_tensor(b, dtype=torch.float64).flatten()) for b in blocks])
        with torch.no_grad():
            v = self.transform(v)
        if not bool(torch.isfinite(v).all()):
            raise InvalidProgram(f"DSA program {self.readable()!r} gives nan/inf on this model's scores")
        return v

    def normalized(self, blocks) -> torch.Tensor:
        """Min-max normalised, post-processed block values s in [0, 1] (all zeros when constant)."""
        v = self.block_values(blocks)
        lo, hi = float(v.min()), float(v.max())
        if hi - lo <= 1e-12 * max(1.0, abs(hi), abs(lo)):
            return torch.zeros_like(v)
        s = POST_OPS[self.post]((v - lo) / (hi - lo))
        if not bool(torch.isfinite(s).all()):
            raise InvalidProgram(f"DSA program {self.readable()!r}: post-processing gave nan/inf")
        return s

    def block_ratios(self, blocks, target: float, lam: float = 0.08) -> torch.Tensor:
        """Raw per-block ratios, spanning 2 lam around S (before :func:`finalize`)."""
        s = self.normalized(blocks)
        D = (1.0 - s) * 2.0 * lam
        rho = D - D.mean() + (1.0 - float(target))
        return 1.0 - rho


def parse(text: str) -> Program:
    return Program.parse(text)


def as_program(p) -> Program:
    return p if isinstance(p, Program) else Program.parse(p)


# ----------------------------------------------------------------------------- block scores
class BlockScores:
    """Per-block element-score samples (float64) with a cache of pre-processing + reduction results
    (transforms and post-processing act on one number per block, so they are cheap)."""

    def __init__(self, blocks: list[torch.Tensor]):
        self.blocks = [torch.as_tensor(b, dtype=torch.float64).flatten() for b in blocks]
        self._cache: dict[tuple, torch.Tensor] = {}

    def __len__(self):
        return len(self.blocks)

    @classmethod
    def from_summary(cls, summary: ModelSummary) -> "BlockScores":
        if not summary.scores:
            raise PrunekitError("DSA needs score samples (summary.scores)")
        nb = summary.n_blocks
        per_block: list[list] = [[] for _ in range(nb)]
        for l in summary.layers:
            if l.name not in summary.scores:
                raise PrunekitError(f"DSA: no score sample for layer {l.name}")
            per_block[l.block].append((summary.scores[l.name].double().flatten().sort().values, l.numel))
        out = []
        for b, items in enumerate(per_block):
            if not items:
                raise PrunekitError(f"DSA: block {b} has no prunable layer")
            total = sum(n for _, n in items)
            # largest sample size T such that each layer can give T * share evenly spaced quantiles
            T = min(len(s) * total / n for s, n in items)
            parts = []
            for s, n in items:
                k = max(1, min(len(s), int(round(T * n / total))))
                idx = torch.linspace(0, len(s) - 1, k).round().long() if k < len(s) else torch.arange(len(s))
                parts.append(s[idx])
            out.append(torch.cat(parts))
        return cls(out)

    def reduced(self, prog: Program) -> torch.Tensor:
        key = (prog.pre, prog.red)
        v = self._cache.get(key)
        if v is None:
            with torch.no_grad():
                v = torch.stack([prog.reduce(x) for x in self.blocks])
            if len(self._cache) > 4096:
                self._cache.clear()
            self._cache[key] = v
        return v


# ----------------------------------------------------------------------------- random programs and variation
PRE_LEN_WEIGHTS = (0.3, 0.5, 0.2)  # P(len = 0, 1, 2)
TR_LEN_WEIGHTS = (0.2, 0.4, 0.3, 0.1)  # P(len = 0, 1, 2, 3)
POST_NONE_P = 0.6


def random_program(rng: random.Random) -> Program:
    npre = rng.choices(range(MAX_PRE + 1), PRE_LEN_WEIGHTS)[0]
    ntr = rng.choices(range(MAX_TR + 1), TR_LEN_WEIGHTS)[0]
    pre = tuple(rng.choice(list(PRE_OPS)) for _ in range(npre))
    tr = tuple(rng.choice(list(TRANSFORMS)) for _ in range(ntr))
    post = "none" if rng.random() < POST_NONE_P else rng.choice([p for p in POST_OPS if p != "none"])
    return Program(pre, rng.choice(list(REDUCTIONS)), tr, post).canonical()


def _mutate_seq(seq: tuple, vocab: list, cap: int, rng: random.Random) -> tuple:
    seq = list(seq)
    actions = []
    if seq:
        actions += ["replace", "delete"]
    if len(seq) < cap:
        actions.append("insert")
    a = rng.choice(actions)
    if a == "replace":
        i = rng.randrange(len(seq))
        seq[i] = rng.choice([o for o in vocab if o != seq[i]])
    elif a == "delete":
        del seq[rng.randrange(len(seq))]
    else:
        seq.insert(rng.randrange(len(seq) + 1), rng.choice(vocab))
    return tuple(seq)


def mutate(p: Program, rng: random.Random, tries: int = 10) -> Program:
    """One random edit (replace / insert / delete an op, or swap the reduction or post-processing);
    retried until the canonical form changes. Always a valid, canonical program."""
    base = p.canonical()
    child = base
    for _ in range(tries):
        gene = rng.choices(("pre", "red", "tr", "post"), (0.3, 0.2, 0.35, 0.15))[0]
        if gene == "pre":
            child = Program(_mutate_seq(base.pre, list(PRE_OPS), MAX_PRE, rng), base.red, base.tr, base.post)
        elif gene == "tr":
            child = Program(base.pre, base.red, _mutate_seq(base.tr, list(TRANSFORMS), MAX_TR, rng), base.post)
        elif gene == "red":
            child = Program(base.pre, rng.choice([r for r in REDUCTIONS if r != base.red]), base.tr, base.post)
        else:
            child = Program(base.pre, base.red, base.tr, rng.choice([q for q in POST_OPS if q != base.post]))
        child = child.canonical()
        if child != base:
            break
    return child.validate()


def crossover(a: Program, b: Program, rng: random.Random) -> Program:
    """Uniform crossover of the four sections; when both parents have transforms, the transform list
    is a one-point splice of the two (truncated to :data:`MAX_TR`). Always valid and canonical."""
    pick = lambda x, y: x if rng.random() < 0.5 else y  # noqa: E731
    pre = pick(a.pre, b.pre)
    red = pick(a.red, b.red)
    if a.tr and b.tr and rng.random() < 0.5:
        first, second = (a.tr, b.tr) if rng.random() < 0.5 else (b.tr, a.tr)
        i, j = rng.randrange(len(first) + 1), rng.randrange(len(second) + 1)
        tr = (first[:i] + second[j:])[:MAX_TR]
    else:
        tr = pick(a.tr, b.tr)
    post = pick(a.post, b.post)
    return Program(pre, red, tr, post).canonical().validate()


# ----------------------------------------------------------------------------- the allocator
def dsa_layer_ratios(summary: ModelSummary, target: float, program, lam: float = 0.08,
                     blocks: BlockScores | None = None) -> dict[str, float]:
    """Raw per-layer ratios (every layer of a block at the block's ratio), before ``finalize``.
    ``blocks``: pre-built :class:`BlockScores` of ``summary`` (the search builds them once)."""
    prog = as_program(program)
    if not 0.0 <= float(target) <= 1.0:
        raise PrunekitError(f"target sparsity {target} outside [0, 1]")
    if lam < 0 or not math.isfinite(lam):
        raise PrunekitError(f"lam must be >= 0, got {lam}")
    blocks = blocks if blocks is not None else BlockScores.from_summary(summary)
    if len(blocks) != summary.n_blocks:
        raise PrunekitError(f"DSA: {len(blocks)} blocks of scores for a model with {summary.n_blocks} blocks")
    r = prog.block_ratios(blocks, target, lam)
    return {l.name: float(r[l.block]) for l in summary.layers}


def dsa_final_ratios(summary: ModelSummary, target: float, program, lam: float = 0.08,
                     blocks: BlockScores | None = None, max_ratio: float = 0.99) -> dict[str, float]:
    """Exactly what ``allocate("dsa", summary, target, program=..., lam=...)`` returns with the default
    block granularity (all layers of a block share a ratio, so block averaging is the identity), without
    recomputing the block samples: the search calls this for every candidate."""
    raw = dsa_layer_ratios(summary, target, program, lam, blocks)
    r = finalize(torch.tensor([raw[l.name] for l in summary.layers], dtype=torch.float64), summary.numels(),
                 target, max_ratio)
    return {l.name: float(v) for l, v in zip(summary.layers, r)}


class DSAParams(Params):
    program: Optional[str] = Field(None, description="program text, e.g. 'pre:abslog|red:var|tr:atan,asin|post:none'")
    lam: float = Field(0.08, ge=0, description="ratios span [S - lam, S + lam]")


@register_allocator("dsa", needs=("scores",), params=DSAParams,
                    description="DSA: a (searched) program over each block's element scores, mapped OWL-style")
def dsa(summary: ModelSummary, target: float, program: str | None = None, lam: float = 0.08) -> Allocation:
    """``program``: DSA program text (``prunekit search --method dsa`` prints and saves one);
    ``lam``: half-width of the ratio range [S - lam, S + lam] (OWL's lambda)."""
    if program is None:
        raise PrunekitError("allocation 'dsa' needs program=... (e.g. 'pre:abslog|red:var|tr:atan,asin|post:none'); "
                            "find one with `prunekit search --method dsa`")
    prog = as_program(program)
    return Allocation(dsa_layer_ratios(summary, target, prog, float(lam)),
                      {"dsa_program": prog.text, "dsa_readable": prog.readable()})
