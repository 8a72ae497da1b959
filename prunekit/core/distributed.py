"""Data-parallel calibration with torch.distributed (torchrun; gloo on CPU, nccl on GPU).

Each rank takes a slice of the calibration windows (``ids[rank::world]``) and runs the block-by-block
engine on it. Before a layer is pruned, its statistics (token counts, feature sums and squared sums,
Hessians, last-token inputs) are summed over ranks, so every rank decides from the statistics of the
whole calibration set; rank 0's pruned weights (and bias) are then broadcast, so the masks are decided
once and identical everywhere. Only rank 0 writes outputs.

    torchrun --nproc_per_node 2 -m prunekit.cli prune --model ... --out DIR
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from .families import weight_view
from .stats import LayerStats


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def init_from_env() -> bool:
    """Initialise the process group when launched by torchrun (WORLD_SIZE > 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return active()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return True


def shutdown() -> None:
    """Leave the process group: a barrier first, so that no rank tears down its connections while another
    still uses them, then ``destroy_process_group``. (With destroy alone, a gloo rank in the two-rank test
    aborted now and then with "terminate called without an active exception" after all its work was
    done; 30 clean runs since the barrier.)"""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def shard(ids: torch.Tensor) -> torch.Tensor:
    return ids[rank()::world()] if active() else ids


def _comm_device(t: torch.Tensor) -> torch.Tensor:
    return t if dist.get_backend() != "nccl" else t.cuda()


def all_reduce_stats(st: LayerStats) -> None:
    """Sum the statistics over the ranks, in place, once: layers that read the same input share one
    ``LayerStats`` (calibrate.run_block), and the second layer's handler must not reduce it again."""
    if st.all_reduced:
        return
    st.all_reduced = True
    counts = torch.tensor([st.count, st.samples, st.gate_sum], dtype=torch.float64)
    dist.all_reduce(counts)
    st.count, st.samples, st.gate_sum = int(counts[0]), int(counts[1]), float(counts[2])
    for k in ("sq_sum", "sum", "hessian"):
        v = getattr(st, k)
        if k in st.needs:
            if v is None:  # a rank with no tokens for this layer still joins the collective
                shape = (st.d_in, st.d_in) if k == "hessian" else (st.d_in,)
                v = torch.zeros(shape, dtype=torch.float32 if k == "hessian" else torch.float64)
            buf = _comm_device(v)
            dist.all_reduce(buf)
            setattr(st, k, buf.to(v.device))
    if "last_tokens" in st.needs:
        gathered = [None] * world()
        dist.all_gather_object(gathered, st.last_tokens)
        rows = [t for part in gathered for t in part]  # capped in rows, as LayerStats.update does
        st.last_tokens = [torch.cat(rows)[: st.max_last_tokens * st.tokens_per_sample]] if rows else []


def broadcast_layer(module) -> None:
    for t in (weight_view(module), getattr(module, "bias", None)):
        if t is not None:
            buf = _comm_device(t.data.contiguous())
            dist.broadcast(buf, src=0)
            t.data.copy_(buf.to(t.device).view_as(t))


def wrap_handle(handle):
    """The engine's per-layer handler, made collective: reduce statistics, decide, broadcast."""
    if not active():
        return handle

    def collective(name, module, stats):
        if stats is not None:
            all_reduce_stats(stats)
        handle(name, module, stats)
        broadcast_layer(module)

    return collective
