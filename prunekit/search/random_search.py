"""Random search over DSA programs: the same-budget baseline for the evolutionary search.

Programs are drawn from the same distribution as DSA's initial population (including the seed
programs first, so both searches start from the same place), with the same validity and novelty
rules, the same fitness, checkpointing and resume. Each "generation" is simply the next batch of
``population`` random programs.
"""
from __future__ import annotations

from pydantic import Field

from ..core.registry import Int, Params
from .dsa import DEFAULT_SEEDS, ProgramSearch, ProgramSpace, program_recipe, program_space
from .registry import register_search


class RandomProgramSearch(ProgramSearch):
    method = "random"

    def next_population(self) -> list[str]:
        taken: dict[str, tuple] = {}
        while len(taken) < self.population_size:
            if self._random_novel(taken) is None:
                break
        return list(taken)


def search_random(space: ProgramSpace, fitness, budget: int, out_dir=None, seed: int = 0, resume: bool = True,
                  population: int = 16, seed_programs=DEFAULT_SEEDS, progress: bool = True,
                  fingerprint: dict | None = None) -> dict:
    return RandomProgramSearch(space, fitness, budget, out_dir, seed, resume, population=population, elite=0,
                               seed_programs=seed_programs, progress=progress, fingerprint=fingerprint).run()


class RandomParams(Params):
    population: Int = Field(16, ge=2, description="programs per batch")
    seed_programs: list[str] = list(DEFAULT_SEEDS)


@register_search("random", params=RandomParams)
def run_random(setup, budget, out_dir, resume, progress, fingerprint, **params) -> tuple[dict, dict]:
    res = search_random(program_space(setup), setup.fitness, budget, out_dir, setup.seed, resume,
                        fingerprint=fingerprint, progress=progress, **params)
    return res, program_recipe(res, setup)
