"""Protocol G's screening proxy: the statistics of every prunable layer gathered once from the dense model,
every pipeline pruned from them.

A prune under a benchmark protocol costs a sequential calibration pass per pipeline; here one pass on the dense
model (``iterate_blocks`` with ``sequential=False``) keeps each layer's input statistics (norms, means, Hessian,
TRIM's last-token inputs, ``TOKENS_PER_SAMPLE`` rows per sequence), and a pipeline restores the dense weights
(:class:`prunekit.core.snapshot.WeightSnapshot`) and prunes every layer from the kept statistics with the
engine's own per-layer handler (:class:`prunekit.pruning.layer_pruner.LayerPruner`, configured from the run as
``prunekit.prune`` configures it). Layers therefore see dense inputs, not the outputs of already-pruned layers:
the same proxy as a search's cached fitness (:mod:`prunekit.search.fitness`), which serves one configuration,
where this serves many (metric, pattern, row-wise method and reconstruction change per run).
"""
from __future__ import annotations

import dataclasses
import time

from prunekit.core.allocation import allocate, get_allocator
from prunekit.core.blocks import iterate_blocks
from prunekit.core.families import block_linears, get_blocks, weight_view
from prunekit.core.metric import configured_metric
from prunekit.core.snapshot import WeightSnapshot
from prunekit.methods.wanda import wanda
from prunekit.pruning.allocator_inputs import model_summary, outlier_ratios
from prunekit.pruning.config import make_config
from prunekit.pruning.layer_pruner import LayerPruner

TOKENS_PER_SAMPLE = 8  # TRIM rows gathered per calibration sequence; each run uses the subset it asks for
NEEDS = frozenset({"sq_sum", "sum", "hessian", "last_tokens"})  # what every grid metric, TRIM and SparseGPT read


class DenseStats:
    """Dense-model statistics of every prunable layer, gathered once, and the dense weights to restore."""

    def __init__(self, model, calib_ids, device, batch_size=8, tokens_per_sample=TOKENS_PER_SAMPLE):
        self.block_layers = block_linears(model)
        self.layers = {n: m for d in self.block_layers for n, m in d.items()}
        self.snapshot = WeightSnapshot(self.layers)
        self.stats: dict = {}
        t = time.time()
        iterate_blocks(model, get_blocks(model), self.block_layers, calib_ids, NEEDS,
                       lambda name, module, st: self.stats.__setitem__(name, st), device,
                       batch_size=batch_size, sequential=False, desc="grid: dense statistics",
                       tokens_per_sample=tokens_per_sample)
        self.seconds = time.time() - t
        self.seqlen = calib_ids.shape[1]
        self.summaries: dict = {}

    def restore(self) -> None:
        self.snapshot.restore()

    def outliers(self, ms=(3.0, 5.0, 7.0, 10.0)) -> dict:
        """OWL's per-block outlier ratios from the cached dense statistics (as the engine's outlier profile)."""
        out = {float(m): [] for m in ms}
        for d in self.block_layers:
            scores = [wanda(self.snapshot.weights[n].float(), self.stats[n]).flatten() for n in d]
            for m, v in outlier_ratios(scores, ms).items():
                out[m].append(v)
        return out

    def ratios(self, allocation: str, target: float) -> dict[str, float]:
        alloc = get_allocator(allocation)
        if allocation not in self.summaries:  # one summary per allocator: ESD fits are cached in it
            summary = model_summary(self.block_layers)
            if "weights" in alloc.needs:
                summary.weights = {n: weight_view(m) for n, m in self.layers.items()}
            if "outliers" in alloc.needs:
                summary.outliers = self.outliers()
            self.summaries[allocation] = summary
        return allocate(allocation, self.summaries[allocation], target)

    def prune(self, run: dict, ratios: dict[str, float]) -> dict:
        """Restore the dense weights, prune every layer from the cached statistics as the pipeline ``run`` (a
        prunekit config's fields) says, to ``ratios``; per-layer records."""
        self.restore()
        cfg = make_config(**run)
        pruner = LayerPruner.from_config(cfg, configured_metric(cfg.metric, cfg.metric_params), ratios)
        k = int(cfg.rowwise_params.get("tokens_per_sample", 1))
        for n, m in self.layers.items():
            pruner(n, m, self.with_tokens(self.stats[n], k))
        return pruner.records

    def with_tokens(self, st, k: int):
        """A copy of ``st`` whose TRIM rows are those ``LayerStats(tokens_per_sample=k)`` would have kept
        (k's positions are a subset of the K gathered ones when k divides K)."""
        if st.tokens_per_sample == k or not st.last_tokens:
            return st
        seq = self.seqlen
        big = st.token_positions(seq)
        want = dataclasses.replace(st, tokens_per_sample=k, last_tokens=[]).token_positions(seq)
        idx = [big.index(p) for p in want]  # ValueError if not a subset
        X = st.last_token_inputs().view(-1, len(big), st.d_in)[:, idx].reshape(-1, st.d_in)
        return dataclasses.replace(st, tokens_per_sample=k, last_tokens=[X])
