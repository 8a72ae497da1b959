"""The one validated configuration shared by the CLI, the Python API and YAML recipes."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..core.allocation import check_allocation_params, tuned_params
from ..core.data import NAMED_SETS
from ..core.errors import PrunekitError
from ..core.masks import parse_pattern
from ..core.metric import METRICS, get_metric
from ..core.refine import REFINERS
from ..core.registry import Params
from ..core.rowwise import ROWWISE
from ..methods.prototype import parse_select
from ..methods.experts import EXPERT_SCORES, ExpertAllocationParams
from ..methods.removal import BLOCK_SCORES, REMOVALS


def _given(p: Params, given: dict) -> dict:
    """The parameters the user set, in the user's order, as validated (converted) values: what the recipe keeps."""
    return {k: getattr(p, k) for k in given}


class PruneConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field("smollm2", description="hub id, local HF folder, .gguf file, or 'smollm2' (embedded default)")
    metric: str = "wanda"
    sparsity: Union[float, list[float]] = Field(0.5, description="target, or one ratio per block")
    pattern: str = "unstructured"
    allocation: str = "uniform"
    allocation_params: dict[str, Any] = Field(default_factory=dict, description="the allocator's parameters; "
                                              "those it tunes by default (AlphaPruning eps, ...) are 'auto' unless set")
    granularity: Optional[str] = Field(None, description="block | layer; default: the allocation's own level")
    max_ratio: float = 0.99
    row_rounding: str = Field("exact", description="per-row masks: 'exact' (every layer prunes floor(numel * s): each "
                              "row floor(d_in * s), the rows whose next weight scores lowest one more) or 'floor' "
                              "(every row floors d_in * s, as the reference codes do; a layer then falls short of s "
                              "by up to one weight per row)")
    rowwise: Optional[str] = Field(None, description="row-wise allocation inside each layer: 'trim'")
    rowwise_params: dict[str, Any] = Field(default_factory=dict)
    rowwise_skip: list[str] = Field(default_factory=list, description="fnmatch patterns of layers that keep the "
                                    "metric's plain mask (no row-wise allocation), e.g. '*.mlp.up_proj'")
    refine: Optional[str] = Field(None, description="mask refinement at unchanged per-row (per N:M group) counts, "
                                  "after the mask and before any reconstruction: 'dsnot' or 'swaps'")
    refine_params: dict[str, Any] = Field(default_factory=dict, description="the refiner's parameters (`prunekit "
                                          "methods`)")
    reconstruct: Optional[str] = Field(None, description="a solver that rewrites the weights on the chosen mask: "
                                       "'sparsegpt' (OBS updates), 'admm' or 'alps' (the least-squares optimum)")
    metric_params: dict[str, Any] = Field(default_factory=dict, description="the metric's parameters, e.g. "
                                          "SparseGPT percdamp / blocksize, RIA alpha, ACE lam (`prunekit methods`)")
    reconstruct_params: dict[str, Any] = Field(default_factory=dict, description="the reconstruct solver's "
                                               "parameters, e.g. sparsegpt percdamp, admm iters / rho")
    remove_blocks: int = Field(0, description="decoder blocks to remove before pruning")
    removal: str = Field("prune-comp", description="prune-comp (iterative, compensated) or bi (ShortGPT one-shot)")
    removal_score: str = Field("bi", description="block score: bi, magnitude, taylor, ppl")
    remove_experts: int = Field(0, description="mixture of experts: experts to remove from every MoE block before "
                                "pruning (router rows dropped, config updated)")
    expert_score: str = Field("reap", description="score of the experts removed first (lowest): reap, frequency, gate")
    expert_allocation: str = Field("uniform", description="sparsity across each MoE layer's experts: uniform (each "
                                   "at its layer's ratio) or an expert score (reap, frequency, gate: low scores prune "
                                   "more, the layer's total kept)")
    expert_allocation_params: dict[str, Any] = Field(default_factory=dict, description="eps: spread of the experts' "
                                                     "ratios around the layer's")
    calib_select: Optional[str] = Field(None, description="prototype:hard|easy|mixed")
    calib_pool: Optional[int] = Field(None, description="candidate windows for calib_select (default 4 x nsamples)")
    calib: str = "c4"
    nsamples: int = 128
    seqlen: Optional[int] = Field(None, description="default: min(2048, model context)")
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    ignore: list[str] = Field(default_factory=list, description="fnmatch patterns of layers to leave dense")
    sequential: bool = True
    batch_size: Optional[int] = None
    eval: list[str] = Field(default_factory=list)
    eval_max_windows: Optional[int] = None
    eval_seqlen: Optional[int] = None
    out: Optional[str] = None
    overwrite: bool = False
    save_format: Literal["dense", "compressed"] = Field(
        "dense", description="dense: a plain HF folder with exact zeros; compressed: kept values + packed masks "
                             "(load with prunekit.load_pretrained)")

    @field_validator("sparsity")
    @classmethod
    def _sparsity(cls, v):
        vals = v if isinstance(v, list) else [v]
        if not vals:
            raise ValueError("sparsity list is empty")
        for s in vals:
            if not 0.0 <= float(s) < 1.0:
                raise ValueError(f"sparsity must be in [0, 1), got {s}")
        return v

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, v):
        parse_pattern(v)
        return v

    @field_validator("nsamples")
    @classmethod
    def _nsamples(cls, v):
        if v < 1:
            raise ValueError("nsamples must be >= 1")
        return v

    @field_validator("batch_size", "eval_max_windows", "calib_pool")
    @classmethod
    def _positive(cls, v):
        if v is not None and v < 1:
            raise ValueError(f"must be >= 1 (or left out), got {v}")
        return v

    @field_validator("out")
    @classmethod
    def _out(cls, v):
        if v is not None and not v.strip():
            raise ValueError("is empty: give a folder name, or leave out to save nothing")
        return v

    @field_validator("seqlen", "eval_seqlen")
    @classmethod
    def _seqlen(cls, v):
        if v is not None and v < 2:
            raise ValueError("seqlen must be >= 2")
        return v

    @field_validator("eval")
    @classmethod
    def _eval(cls, v):
        for e in v:
            if e not in NAMED_SETS and not Path(e).is_file():
                raise ValueError(f"unknown evaluation set {e!r}; valid: {', '.join(NAMED_SETS)} or a file")
        return v

    @model_validator(mode="after")
    def _names(self):
        """Method names and parameters, and the combinations that cannot work, before any work."""
        metric = get_metric(self.metric)
        self.metric_params = _given(metric.check_params(self.metric_params, "metric_params"), self.metric_params)
        self.allocation_params = tuned_params(self.allocation, _given(check_allocation_params(
            self.allocation, self.allocation_params), self.allocation_params))
        if self.rowwise is not None:
            method = ROWWISE.get(self.rowwise)
            if self.nm is not None:
                raise ValueError("row-wise allocation changes per-row counts; it cannot be combined with an N:M pattern")
            if metric.solver is not None:
                raise ValueError(f"{self.metric} chooses its own masks; for TRIM with reconstruction use a score "
                                 "metric with reconstruct: sparsegpt")
            self.rowwise_params = _given(method.check_params(self.rowwise_params), self.rowwise_params)
        elif self.rowwise_skip:
            raise ValueError("rowwise_skip names layers to leave out of a row-wise allocation; set rowwise too")
        if self.nm is not None and (self.allocation != "uniform" or isinstance(self.sparsity, list)):
            raise ValueError(f"pattern {self.pattern} fixes every layer at N/M sparsity, so a non-uniform allocation "
                             "has nothing to move; use an unstructured pattern with non-uniform allocations")
        if self.nm is not None:
            n, m = self.nm
            if "sparsity" in self.model_fields_set and abs(float(self.sparsity) - n / m) > 1e-12:
                raise ValueError(f"pattern {self.pattern} prunes exactly {n}/{m} = {n / m:g} of every layer; sparsity "
                                 f"{self.sparsity} contradicts it (leave sparsity out or set it to {n / m:g})")
            self.sparsity = n / m
        if self.row_rounding not in ("exact", "floor"):
            raise ValueError(f"row_rounding must be 'exact' or 'floor', got {self.row_rounding!r}")
        if self.granularity not in (None, "block", "layer"):
            raise ValueError(f"granularity must be 'block' or 'layer', got {self.granularity!r}")
        if self.remove_blocks < 0:
            raise ValueError("remove_blocks must be >= 0")
        if self.removal not in REMOVALS:
            raise ValueError(f"unknown removal {self.removal!r}; valid: {', '.join(REMOVALS)}")
        BLOCK_SCORES.get(self.removal_score)
        if self.remove_experts < 0:
            raise ValueError("remove_experts must be >= 0")
        EXPERT_SCORES.get(self.expert_score)
        if self.expert_allocation != "uniform":
            EXPERT_SCORES.get(self.expert_allocation)
            if self.nm is not None:
                raise ValueError(f"pattern {self.pattern} fixes every expert at N/M sparsity; expert_allocation "
                                 f"{self.expert_allocation} has nothing to move")
        elif self.expert_allocation_params:
            raise ValueError("expert_allocation_params set without an expert_allocation score")
        self.expert_allocation_params = _given(ExpertAllocationParams.check(
            self.expert_allocation_params, "expert_allocation_params", self.expert_allocation),
            self.expert_allocation_params)
        if self.calib_select is not None:
            parse_select(self.calib_select)
            if self.calib_pool is not None and self.calib_pool < self.nsamples:
                raise ValueError(f"calib_pool ({self.calib_pool}) must be >= nsamples ({self.nsamples})")
        solvers = sorted(n for n, m in METRICS.items() if m.solver is not None)
        if self.reconstruct is not None and self.reconstruct not in solvers:
            raise ValueError(f"unknown reconstruct {self.reconstruct!r}; valid: {', '.join(solvers)}")
        if self.reconstruct and metric.solver is not None:
            raise ValueError(f"{self.metric} already reconstructs weights")
        if self.refine is not None:
            refiner = REFINERS.get(self.refine)
            self.refine_params = _given(refiner.check_params(self.refine_params), self.refine_params)
        elif self.refine_params:
            raise ValueError("refine_params set without refine")
        if self.reconstruct_params:
            if not self.reconstruct:
                raise ValueError("reconstruct_params set without reconstruct")
            self.reconstruct_params = _given(get_metric(self.reconstruct).check_params(self.reconstruct_params,
                                                                                       "reconstruct_params"),
                                             self.reconstruct_params)
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise ValueError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        return self

    @property
    def nm(self):
        return parse_pattern(self.pattern)

    def target(self) -> float:
        return float(self.sparsity) if not isinstance(self.sparsity, list) else sum(self.sparsity) / len(self.sparsity)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(), sort_keys=False)


def make_config(**kw) -> PruneConfig:
    """PruneConfig(**kw) with validation errors turned into one-line PrunekitErrors."""
    try:
        return PruneConfig(**kw)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err.get("loc", ())) or "config"
        msg = " ".join(err.get("msg", str(e)).removeprefix("Value error, ").split())
        raise PrunekitError(f"{loc}: {msg}") from None
    except PrunekitError:
        raise


def load_recipe(path: str | Path, **overrides) -> PruneConfig:
    p = Path(path)
    if p.is_dir():
        raise PrunekitError(f"recipe {path} is a folder; give the recipe's .yaml file (e.g. {p / 'recipe.yaml'})")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise PrunekitError(f"recipe not found: {path}") from None
    except UnicodeDecodeError:
        raise PrunekitError(f"recipe {path} is not a UTF-8 text file") from None
    except OSError as e:
        raise PrunekitError(f"cannot read recipe {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise PrunekitError(f"recipe {path} is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise PrunekitError(f"recipe {path} must be a mapping of config keys")
    data.update({k: v for k, v in overrides.items() if v is not None})
    return make_config(**data)
