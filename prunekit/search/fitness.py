"""The cost model shared by every search: prune the model to candidate ratios, measure held-out perplexity.

Everything that does not depend on the candidate is computed once:
  - the dense weights and biases of every prunable layer are snapshotted (restored before a candidate);
  - ``mode="cached"`` (default): the metric's input statistics of the *dense* model are gathered in one
    calibration pass and kept; a candidate then re-prunes *only the layers whose ratio changed* since
    the previous candidate, from those statistics: no calibration forward pass per candidate. This is a
    proxy: ``prunekit.prune`` feeds each block the outputs of the already *pruned* blocks before it,
    here every layer sees dense inputs (identical for weight-only metrics such as magnitude).
  - ``mode="full"``: each candidate is pruned exactly as ``prunekit.prune`` would (block by block,
    sequential calibration on ``calib_ids``): slower, for when the search must see the final protocol.
Candidates are scored on *held-out* windows (a different draw than calibration, never the final
evaluation set), short ones by default: PPL = exp(mean token NLL). Non-finite -> inf. Results are
memoised by (rounded ratios, kv bits).

The model is moved to ``device`` for the search and left *dense* (restored) by :meth:`close`.
"""
from __future__ import annotations

import contextlib
import hashlib
import math

import torch

from ..core.blocks import iterate_blocks
from ..core.errors import PrunekitError
from ..core.families import block_linears, get_blocks
from ..core.metric import configured_metric
from ..core.nll import nll_of_windows
from ..core.offload import on_device, resolve_device
from ..core.snapshot import WeightSnapshot
from ..pruning.config import make_config
from ..pruning.layer_pruner import LayerPruner, prune_all
from ..pruning.plan import stats_needs, stats_options
from ..pruning.run import check_layer_patterns
from .kvquant import kv_quant_hooks


def ids_digest(t: torch.Tensor | None) -> str | None:
    if t is None:
        return None
    return hashlib.sha256(t.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]


class Fitness:
    def __init__(self, model, calib_ids: torch.Tensor, heldout_ids: torch.Tensor, metric: str = "wanda",
                 device="auto", batch_size: int | None = None, eval_batch_size: int = 8, mode: str = "cached",
                 prune_kwargs: dict | None = None, seed: int = 0, extra_needs=()):
        if mode not in ("cached", "full"):
            raise PrunekitError(f"fitness mode must be 'cached' or 'full', got {mode!r}")
        if heldout_ids is None or len(heldout_ids) == 0:
            raise PrunekitError("the search needs held-out windows (heldout_ids)")
        self.model, self.mode = model, mode
        self.device = resolve_device(device) if isinstance(device, str) else torch.device(device)
        self.cfg = make_config(metric=metric, batch_size=batch_size, seed=seed, **(prune_kwargs or {}))
        if self.cfg.nm is not None:
            raise PrunekitError("searched allocations need an unstructured pattern")
        self.metric = configured_metric(metric, self.cfg.metric_params)  # the user's metric_params bound in
        self.calib_ids, self.heldout_ids = calib_ids, heldout_ids
        self.eval_batch_size = eval_batch_size
        check_layer_patterns(model, self.cfg)
        self.blocks = get_blocks(model)
        self.block_layers = block_linears(model, self.cfg.ignore)
        self.layers = {n: m for d in self.block_layers for n, m in d.items()}
        self.block_of = {n: b for b, d in enumerate(self.block_layers) for n in d}
        self._on_device = contextlib.ExitStack()  # the model stays on the device for the search (close() ends it)
        self._on_device.enter_context(on_device(model, self.device))
        self.snapshot = WeightSnapshot(self.layers)
        self.applied: dict[str, tuple | None] = {n: None for n in self.layers}  # (metric key, ratio); None = dense
        self.needs = stats_needs(self.metric, self.cfg) | frozenset(extra_needs)
        self.stats: dict = {}
        if mode == "cached" and self.needs:
            if calib_ids is None:
                raise PrunekitError(f"{metric} needs calibration windows (calib_ids)")
            def keep(name, module, st):
                self.stats[name] = st

            iterate_blocks(model, self.blocks, self.block_layers, calib_ids, self.needs, keep, self.device,
                           batch_size=batch_size, sequential=False, desc="search: dense statistics",
                           **stats_options(self.cfg))
        self.memo: dict = {}
        self.n_evaluations = 0  # fresh (non-memoised) evaluations
        self.kv_hooks: list = []

    # ------------------------------------------------------------------------------------------
    def _restore(self, names) -> None:
        names = list(names)
        self.snapshot.restore(names)
        for n in names:
            self.applied[n] = None

    def restore(self) -> None:
        """Back to the dense model."""
        self._restore([n for n, r in self.applied.items() if r is not None])

    def apply(self, ratios: dict[str, float], metric=None, metric_key=None) -> None:
        """Prune the model in place to ``ratios`` (per layer), starting from the dense weights.
        ``metric``: a :class:`prunekit.metrics.Metric` other than the configured one (OptiShear's meta
        metric), identified by the hashable ``metric_key``."""
        missing = [n for n in self.layers if n not in ratios]
        if missing:
            raise PrunekitError(f"no ratio for layer(s) {missing[:3]}...")
        metric = metric or self.metric
        pruner = LayerPruner.from_config(self.cfg, metric, {n: float(ratios[n]) for n in self.layers})
        if self.mode == "full":
            self.restore()
            prune_all(pruner, metric, self.model, self.blocks, self.block_layers, self.calib_ids,
                      self.device, self.cfg, "search: pruning")
            for n in self.layers:
                self.applied[n] = (metric_key, float(ratios[n]))
            return
        changed = [n for n in self.layers if self.applied[n] != (metric_key, float(ratios[n]))]
        self._restore(changed)
        for n in changed:
            pruner(n, self.layers[n], self.stats.get(n))
            self.applied[n] = (metric_key, float(ratios[n]))

    @torch.no_grad()
    def heldout_ppl(self) -> float:
        nll = nll_of_windows(self.model, self.heldout_ids, self.device, batch_size=self.eval_batch_size,
                             desc="search: held-out")
        v = float(nll.mean())
        return math.exp(v) if math.isfinite(v) and v < 700 else math.inf

    @torch.no_grad()
    def _logprobs(self, windows: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for s in range(0, windows.shape[0], self.eval_batch_size):
            x = windows[s:s + self.eval_batch_size].to(self.device)
            out.append(torch.log_softmax(self.model(x, use_cache=False).logits.float(), -1))
        return out

    @torch.no_grad()
    def kl_to_dense(self) -> float:
        """Mean over tokens of KL(dense || current model) of the next-token distributions on the
        divergence windows (``set_divergence_windows``); the dense log-probabilities are computed once."""
        if self._dense_logprobs is None:
            raise PrunekitError("call set_divergence_windows first")
        total, count = 0.0, 0
        for lp_d, lp in zip(self._dense_logprobs, self._logprobs(self._div_windows)):
            kl = (lp_d.exp() * (lp_d - lp)).sum(-1)
            total += float(kl.double().sum())
            count += kl.numel()
        v = total / max(count, 1)
        return v if math.isfinite(v) else math.inf

    def set_divergence_windows(self, windows: torch.Tensor) -> None:
        """Windows for :meth:`kl_to_dense` (OptiShear's cheap fitness: calibration data); the dense
        model's log-probabilities on them are kept (windows x tokens x vocab floats)."""
        self.restore()
        self._div_windows = windows
        self._dense_logprobs = self._logprobs(windows)

    _dense_logprobs = None
    _div_windows = None

    def evaluate(self, ratios: dict[str, float] | None, kv_bits: list[int] | None = None, metric=None,
                 metric_key=None, objective: str = "ppl") -> float:
        """Held-out perplexity (``objective="kl"``: KL divergence from the dense model on the divergence
        windows) of the model pruned to ``ratios`` (None: dense), with the KV cache fake-quantised to
        ``kv_bits`` per block (None: not quantised), by ``metric`` (default: the configured one). Memoised."""
        key = (None if ratios is None else tuple(round(float(ratios[n]), 10) for n in self.layers),
               None if kv_bits is None else tuple(int(b) for b in kv_bits), metric_key, objective)
        if key in self.memo:
            return self.memo[key]
        if ratios is None:
            self.restore()
        else:
            self.apply(ratios, metric, metric_key)
        if kv_bits is not None:
            hooks = kv_quant_hooks(self.model, kv_bits)
        try:
            v = self.heldout_ppl() if objective == "ppl" else self.kl_to_dense()
        finally:
            if kv_bits is not None:
                for h in hooks:
                    h.remove()
        self.n_evaluations += 1
        self.memo[key] = v
        return v

    def block_ratios_to_layers(self, block_ratios) -> dict[str, float]:
        return {n: float(block_ratios[b]) for n, b in self.block_of.items()}

    def close(self) -> None:
        """Restore the dense weights and the model's original device."""
        self.restore()
        self._on_device.close()
