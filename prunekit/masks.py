"""Masks from scores. Convention: a mask is a bool tensor, True where the weight is *pruned*.

- per row   (``group='row'``): every output row drops its ``floor(d_in * s)`` lowest scores (the
  orchestrator first makes ``d_in * s`` an integer for each layer with :func:`exact_row_ratios`, so that the
  model's total comes out exact instead of up to one weight per row short);
- per layer (``group='layer'``): the matrix drops its ``floor(numel * s)`` lowest scores;
- row-wise ratios: row r drops ``floor(d_in * s_r)`` (TRIM and other row allocators);
- N:M: in every group of M consecutive input columns of every row, the N lowest are dropped.
Ties are broken by position (stable sort), so masks are deterministic.
"""
from __future__ import annotations

import math
import re

import torch

from .errors import PrunekitError

_NM = re.compile(r"^(\d+):(\d+)$")


def parse_pattern(pattern: str | None) -> tuple[int, int] | None:
    """None for unstructured, (N, M) for 'N:M'."""
    if pattern in (None, "", "unstructured"):
        return None
    m = _NM.match(str(pattern).strip())
    if not m:
        raise PrunekitError(f"unknown pattern {pattern!r}; use 'unstructured' or 'N:M' such as 2:4 or 4:8")
    n, mm = int(m.group(1)), int(m.group(2))
    if not 0 < n < mm:
        raise PrunekitError(f"N:M pattern needs 0 < N < M, got {n}:{mm}")
    return n, mm


def check_nm_shape(nm: tuple[int, int], d_in: int, name: str = "layer") -> None:
    if d_in % nm[1]:
        raise PrunekitError(f"{name}: input dimension {d_in} is not divisible by M={nm[1]} of pattern {nm[0]}:{nm[1]}")


def _lowest_k_mask(scores: torch.Tensor, k: torch.Tensor | int) -> torch.Tensor:
    """Mask of the k lowest entries of each row of a 2-D tensor (k may differ per row); ties are taken in
    index order (what a stable sort gives)."""
    rows, cols = scores.shape
    if scores.device.type == "cpu" and isinstance(k, int) and 0 < k < cols and not bool(torch.isnan(scores).any()):
        # selection, not a sort: the k-th value per row, everything below it, then the ties at it in index
        # order (identical to the stable sort below; 2.5-6x faster on the CPU for SparseGPT's 128-column
        # blocks and per-row Wanda masks). CPU only: CUDA's kthvalue gives each row one thread block, and
        # SparseGPT selects over one long row per block (11008 x 128 = 1.4 M entries for LLaMA-7B's
        # gate/up), so GPUs keep the sort (the path timed on the H200 in session 8)
        t = scores.kthvalue(k, dim=1, keepdim=True).values
        below = scores < t
        tied = scores == t
        return below | (tied & (tied.cumsum(1) <= k - below.sum(1, keepdim=True)))
    order = torch.sort(scores, dim=1, stable=True).indices
    if isinstance(k, int):
        take = torch.zeros(rows, cols, dtype=torch.bool, device=scores.device)
        take[:, :k] = True
    else:
        take = torch.arange(cols, device=scores.device)[None, :] < k.to(scores.device)[:, None]
    mask = torch.zeros_like(take)
    mask.scatter_(1, order, take)
    return mask


def unstructured_mask(scores: torch.Tensor, sparsity: float, group: str = "row") -> torch.Tensor:
    if not 0.0 <= sparsity < 1.0:
        raise PrunekitError(f"sparsity must be in [0, 1), got {sparsity}")
    if group == "row":
        return _lowest_k_mask(scores, int(scores.shape[1] * sparsity))
    if group == "layer":
        flat = scores.reshape(1, -1)
        return _lowest_k_mask(flat, int(flat.shape[1] * sparsity)).reshape(scores.shape)
    raise ValueError(f"unknown comparison group {group!r}")


def rowwise_mask(scores: torch.Tensor, row_sparsity: torch.Tensor) -> torch.Tensor:
    k = torch.floor(row_sparsity.double() * scores.shape[1]).long().clamp(0, scores.shape[1])
    return _lowest_k_mask(scores, k)


def _count_ratio(k: int, d_in: int) -> float:
    """``k / d_in``, one ulp higher where float rounding would make ``int(d_in * r)`` fall one short."""
    r = k / d_in
    return r if int(r * d_in) >= k else float(torch.nextafter(torch.tensor(r, dtype=torch.float64),
                                                               torch.tensor(2.0, dtype=torch.float64)))


def exact_row_ratios(ratios: dict[str, float], shapes: dict[str, tuple[int, int]],
                     max_ratio: float = 0.99) -> dict[str, float]:
    """Per-layer ratios for per-row masks whose pruned total is the requested one.

    A per-row mask prunes ``floor(d_in * s)`` weights in every row, so a layer falls short of ``s`` by up
    to one weight per row, and the model's total by up to ``sum(rows)`` weights (SmolLM2 at 70%: 0.69927
    instead of 0.7 with AlphaPruning, 0.69971 uniform). Here every layer gets an integer per-row count
    ``k`` that is the floor or the ceiling of ``d_in * s`` (never above ``max_ratio * d_in`` unless ``s``
    is, and always below ``d_in``), chosen by error diffusion in layer order: the running difference
    between the requested and the assigned number of pruned weights is carried to the next layer, and
    each layer takes the count that brings it closest to zero. The total then misses the requested
    ``round(sum(s * numel))`` by at most about one layer's row count (at most ``max(rows)``), and a layer
    whose ``d_in * s`` is already an integer keeps it (50% on even widths changes nothing). The extra
    weights are spread over the depth, not piled on one end. Returns ``k / d_in`` per layer (a float for
    which ``int(d_in * r) == k``)."""
    out: dict[str, float] = {}
    carry = 0.0  # requested minus assigned pruned weights so far
    for name, s in ratios.items():
        rows, d_in = shapes[name]
        s = float(s)
        y = s * d_in
        c = int(math.floor(y + 1e-9))
        cap = min(d_in - 1, max(c, int(math.floor(max(max_ratio, s) * d_in + 1e-9))))
        want = y * rows + carry
        k = c + 1 if (c + 1 <= cap and y - c > 1e-9 and abs(want - (c + 1) * rows) < abs(want - c * rows)) else c
        carry = want - k * rows
        out[name] = _count_ratio(k, d_in)
    return out


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    rows, cols = scores.shape
    check_nm_shape((n, m), cols)
    groups = scores.reshape(rows * cols // m, m)
    return _lowest_k_mask(groups, n).reshape(rows, cols)


def make_mask(scores: torch.Tensor, sparsity, pattern: tuple[int, int] | None = None, group: str = "row"):
    """Dispatch: N:M pattern, per-row ratios (tensor), or one ratio per row/layer."""
    if pattern is not None:
        return nm_mask(scores, *pattern)
    if isinstance(sparsity, torch.Tensor):
        return rowwise_mask(scores, sparsity)
    return unstructured_mask(scores, float(sparsity), group)


_BIT_WEIGHTS = (128, 64, 32, 16, 8, 4, 2, 1)


def pack_mask(mask: torch.Tensor):
    """Bit-pack a bool mask (8 weights per byte, row-major, first weight in the high bit: numpy's
    ``packbits`` layout) for storage; returns a CPU uint8 tensor. A mask on a GPU is packed there
    (8x less to copy, and no single-threaded numpy pass over the 200 M weights of a 7B block)."""
    import numpy as np

    flat = mask.reshape(-1)
    if flat.device.type == "cpu":
        return torch.from_numpy(np.packbits(flat.numpy().astype(bool)))
    return pack_bits(flat).cpu()


def pack_bits(flat: torch.Tensor) -> torch.Tensor:
    """``np.packbits`` in torch, on the tensor's own device (a 1-D bool tensor -> uint8, zero-padded)."""
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    bits = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=flat.device)
    return (flat.view(-1, 8).to(torch.uint8) * bits).sum(1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, shape) -> torch.Tensor:
    import numpy as np

    n = 1
    for s in shape:
        n *= int(s)
    bits = np.unpackbits(packed.cpu().numpy(), count=n).astype(bool)
    return torch.from_numpy(bits).reshape(tuple(shape))
