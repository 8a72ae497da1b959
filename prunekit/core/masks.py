"""Masks from scores. Convention: a mask is a bool tensor, True where the weight is *pruned*.

- per row   (``group='row'``): the layer drops exactly ``floor(numel * s)`` weights, ``floor(d_in * s)`` or
  one more in each row, every row its lowest scores (:func:`row_counts` says which rows take one more);
  ``exact=False`` is the reference codes' rule, ``floor(d_in * s)`` in every row, which falls short of
  ``s`` by up to one weight per row;
- per layer (``group='layer'``): the matrix drops its ``floor(numel * s)`` lowest scores;
- row-wise ratios: row r drops ``floor(d_in * s_r)`` (TRIM and other row allocators);
- N:M: in every group of M consecutive input columns of every row, the N lowest are dropped.
Ties are broken by position (stable sort), so masks are deterministic.
"""
from __future__ import annotations

import re
from typing import Callable, Sequence

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


def _has_nan(scores: torch.Tensor) -> bool:
    """Whether ``scores`` may hold a NaN: its sum is NaN whenever it does (also for +inf and -inf together,
    which then takes the caller's general path too). One reduction instead of a boolean copy of the matrix."""
    return bool(torch.isnan(scores.sum()))


def _lowest_k_mask(scores: torch.Tensor, k: torch.Tensor | int) -> torch.Tensor:
    """Mask of the k lowest entries of each row of a 2-D tensor (k may differ per row); ties are taken in
    index order (what a stable sort gives)."""
    rows, cols = scores.shape
    if scores.device.type == "cpu" and isinstance(k, int) and 0 < k < cols and not _has_nan(scores):
        # selection, not a sort: the k-th value per row, everything at or below it, then, in the rows where
        # ties at it give more than k, only the first ties in index order (identical to the stable sort
        # below; 2.5-6x faster on the CPU for SparseGPT's 128-column blocks and per-row Wanda masks). CPU
        # only: CUDA's kthvalue gives each row one thread block, and SparseGPT selects over one long row per
        # block (11008 x 128 = 1.4 M entries for LLaMA-7B's gate/up), so GPUs keep the sort
        if rows == 1 and cols >= LONG_ROW:  # one layer-wide comparison: bounded memory, same mask
            row = scores[0]
            return lowest_k_by_slices(lambda a, b: row[a:b], [(0, cols)], cols, k).reshape(1, cols)
        t = scores.kthvalue(k, dim=1, keepdim=True).values
        mask = scores <= t
        over = torch.nonzero(mask.sum(1) > k).flatten()  # rows with surplus ties at t (usually none)
        if over.numel():
            sub, ts = scores[over], t[over]
            below, tied = sub < ts, sub == ts
            mask[over] = below | (tied & (tied.cumsum(1) <= k - below.sum(1, keepdim=True)))
        return mask
    order = torch.sort(scores, dim=1, stable=True).indices
    if isinstance(k, int):
        take = torch.zeros(rows, cols, dtype=torch.bool, device=scores.device)
        take[:, :k] = True
    else:
        take = torch.arange(cols, device=scores.device)[None, :] < k.to(scores.device)[:, None]
    mask = torch.zeros_like(take)
    mask.scatter_(1, order, take)
    return mask


LONG_ROW = 1 << 20  # rows at least this long select through a sample (lowest_k_by_slices)
_SAMPLE = 1 << 16


def _whole(score: Callable[[int, int], torch.Tensor], bounds: Sequence[tuple[int, int]]) -> torch.Tensor:
    """The whole row of scores given by slices (the fallbacks below that need it at once)."""
    return score(*bounds[0]) if len(bounds) == 1 else torch.cat([score(a, b) for a, b in bounds])


def _kth_by_slices(score: Callable[[int, int], torch.Tensor], bounds: Sequence[tuple[int, int]], n: int,
                   k: int) -> torch.Tensor | None:
    """The k-th smallest value (1-based) of a long 1-D row of ``n`` scores given by slices: ``score(a, b)`` is
    entries a..b-1 (``bounds`` cover 0..n in order). The same value as ``kthvalue(k)`` of the whole row, without
    the row (the slices may be computed on demand) and without kthvalue's copy of it and int64 index per entry
    (3 x the scores' bytes, 48 MiB for a 1024 x 4096 layer compared as a whole, as ADMM's gradual mask and ALPS's
    projection do every iteration). None when a score is NaN (the caller then sorts, NaN last).

    A strided sample of about 65 k entries brackets the k-th value between two of its order statistics (the
    expected rank +- 4 standard deviations and a margin); one more pass counts the entries below the bracket and
    gathers those inside it, and the k-th value is selected among them. A bracket that misses (scores in an order
    the sample does not represent) falls back to ``kthvalue`` on the whole row. Extra memory: a slice's bool
    vectors and the entries in the bracket."""
    stride = max(n // _SAMPLE, 1)
    parts = []
    for a, b in bounds:
        x = score(a, b)
        if _has_nan(x):
            return None
        # the whole row's x[::stride] in this slice, copied (a view would keep the slice's scores alive)
        parts.append(x[(-a) % stride::stride].clone())
    sample = torch.sort(torch.cat(parts)).values
    m = sample.numel()
    centre = k / n * m
    slack = 4.0 * (centre * (1.0 - k / n)) ** 0.5 + 32.0
    lo_rank, hi_rank = int(centre - slack), int(centre + slack) + 1
    lo = float(sample[lo_rank - 1]) if lo_rank >= 1 else None
    hi = float(sample[hi_rank - 1]) if hi_rank <= m else None
    del parts, sample
    below, inside = 0, []
    for a, b in bounds:
        x = score(a, b)
        keep = torch.ones_like(x, dtype=torch.bool) if lo is None else x >= lo
        if lo is not None:
            below += int(x.numel() - torch.count_nonzero(keep))
        if hi is not None:
            keep &= x <= hi
        inside.append(x[keep])
    if below < k and below + sum(v.numel() for v in inside) >= k:
        return torch.cat(inside).kthvalue(k - below).values
    del inside
    return _whole(score, bounds).kthvalue(k).values


def lowest_k_by_slices(score: Callable[[int, int], torch.Tensor], bounds: Sequence[tuple[int, int]], n: int,
                       k: int) -> torch.Tensor:
    """:func:`_lowest_k_mask` of one long row of ``n`` scores given by slices (see :func:`_kth_by_slices`):
    a bool vector, True at the entries at or below the k-th smallest value, of the ties at it only the first
    in index order; NaN scores sort last. Scores are computed slice by slice (three passes, a fourth over the
    last slices when ties at the k-th value exceed k), so a layer-wide mask of a score that is not stored (|V|
    of a solver's iterate) needs no score matrix."""
    if k <= 0 or k >= n:
        first = score(*bounds[0])
        return torch.full((n,), k > 0, dtype=torch.bool, device=first.device)
    t = _kth_by_slices(score, bounds, n, k)
    if t is None:  # NaN: the stable sort's order, NaN last
        return _lowest_k_mask(_whole(score, bounds)[None], k)[0]
    mask, count = None, 0
    for a, b in bounds:
        x = score(a, b)
        if mask is None:
            mask = torch.empty(n, dtype=torch.bool, device=x.device)
        torch.le(x, t, out=mask[a:b])
        count += int(torch.count_nonzero(mask[a:b]))
    surplus = count - k
    for a, b in reversed(bounds):  # too many ties at t: drop the last ones in index order
        if surplus <= 0:
            break
        tied = torch.nonzero(score(a, b) == t).flatten()
        drop = tied[max(tied.numel() - surplus, 0):]
        mask[a + drop] = False
        surplus -= drop.numel()
    return mask


def mask_by_row_slices(score: Callable[[int, int], torch.Tensor], shape: tuple[int, int], sparsity,
                       pattern: tuple[int, int] | None, bounds: Sequence[tuple[int, int]]) -> torch.Tensor:
    """``make_mask(S, sparsity, pattern, group='layer')`` of a score matrix S of ``shape`` given by slices of rows
    (``score(r0, r1)`` = S[r0:r1], computed on demand for the (r0, r1) in ``bounds``, which cover the rows in
    order): N:M and per-row ratios slice by slice, one ratio over the whole layer by :func:`lowest_k_by_slices`.
    The same mask, without S: what a solver that compares its iterate over the whole layer every iteration needs
    (ADMM's gradual mask, ALPS's projection)."""
    rows, cols = shape
    if pattern is not None or isinstance(sparsity, torch.Tensor):
        out = None
        for a, b in bounds:
            part = make_mask(score(a, b), sparsity if pattern is not None else sparsity[a:b], pattern)
            if out is None:
                out = torch.empty(shape, dtype=torch.bool, device=part.device)
            out[a:b] = part
        return out
    s = check_sparsity(sparsity)
    n = rows * cols
    flat = lowest_k_by_slices(lambda a, b: score(a // cols, b // cols).reshape(-1),
                              [(a * cols, b * cols) for a, b in bounds], n, int(n * s))
    return flat.view(rows, cols)


def _kth_smallest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Per row, the value of rank ``k`` (0-based) in ascending order (NaN sorts last, as in the masks)."""
    if scores.device.type == "cpu" and not _has_nan(scores):
        return scores.kthvalue(k + 1, dim=1).values
    return torch.sort(scores, dim=1).values[:, k]


def row_counts(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Per-row prune counts (int64, on the CPU) for a per-row mask whose layer total is exactly
    ``floor(numel * s)``: every row prunes ``b = total // rows``, and the ``total - b * rows`` rows whose
    next weight in line (their ``b + 1``-th lowest score) is the smallest prune one more (ties by row index).
    So the layer hits its ratio to one weight, as a per-matrix mask does, while the choice inside each row
    stays the metric's per-row comparison."""
    rows, cols = scores.shape
    total = int(rows * cols * sparsity)
    base, extra = divmod(total, rows)
    counts = torch.full((rows,), base, dtype=torch.int64)
    if extra:
        nxt = _kth_smallest(scores, base).float().cpu()
        counts[torch.sort(nxt, stable=True).indices[:extra]] += 1
    return counts


def check_sparsity(sparsity) -> float:
    """One sparsity ratio as a float, checked to be in [0, 1) (one clear error otherwise)."""
    s = float(sparsity)
    if not 0.0 <= s < 1.0:
        raise PrunekitError(f"sparsity must be in [0, 1), got {s}")
    return s


def unstructured_mask(scores: torch.Tensor, sparsity: float, group: str = "row", exact: bool = True) -> torch.Tensor:
    sparsity = check_sparsity(sparsity)
    if group == "row":
        if not exact:
            return _lowest_k_mask(scores, int(scores.shape[1] * sparsity))
        counts = row_counts(scores, sparsity)
        base = int(counts.min())
        mask = _lowest_k_mask(scores, base)
        more = torch.nonzero(counts > base).flatten().to(scores.device)
        if more.numel():
            mask[more] = _lowest_k_mask(scores[more], base + 1)
        return mask
    if group == "layer":
        flat = scores.reshape(1, -1)
        return _lowest_k_mask(flat, int(flat.shape[1] * sparsity)).reshape(scores.shape)
    raise ValueError(f"unknown comparison group {group!r}")


def rowwise_mask(scores: torch.Tensor, row_sparsity: torch.Tensor) -> torch.Tensor:
    k = torch.floor(row_sparsity.double() * scores.shape[1]).long().clamp(0, scores.shape[1])
    return _lowest_k_mask(scores, k)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    rows, cols = scores.shape
    check_nm_shape((n, m), cols)
    groups = scores.reshape(rows * cols // m, m)
    return _lowest_k_mask(groups, n).reshape(rows, cols)


def make_mask(scores: torch.Tensor, sparsity, pattern: tuple[int, int] | None = None, group: str = "row",
              exact: bool = True):
    """Dispatch: N:M pattern, per-row ratios (tensor), or one ratio per row/layer (``exact``: see
    :func:`row_counts`)."""
    if pattern is not None:
        return nm_mask(scores, *pattern)
    if isinstance(sparsity, torch.Tensor):
        return rowwise_mask(scores, sparsity)
    return unstructured_mask(scores, float(sparsity), group, exact)


_BIT_WEIGHTS = (128, 64, 32, 16, 8, 4, 2, 1)


def pack_mask(mask: torch.Tensor):
    """Bit-pack a bool mask (8 weights per byte, row-major, first weight in the high bit: numpy's
    ``packbits`` layout) for storage; returns a CPU uint8 tensor. A mask on a GPU is packed there
    (8x less to copy, and no single-threaded numpy pass over the 200 M weights of a 7B block)."""
    import numpy as np

    flat = mask.reshape(-1)
    if flat.device.type == "cpu":
        return off_heap(torch.from_numpy(np.packbits(flat.numpy().astype(bool))))
    return off_heap(pack_bits(flat).cpu())


def off_heap(t: torch.Tensor) -> torch.Tensor:
    """A copy of the CPU tensor ``t`` in its own anonymous memory map, outside malloc's heap.

    For the small results that live until the end of a prune and are made in the middle of a block pass (the
    packed masks): from the heap, each would settle in a hole that the pass's freed activations leave and split
    it, so the next block's activations no longer fit and the heap grows (by about 0.3 GB a block in a 64 x 512
    SmolLM2 prune: a trim and the page faults of a whole pass every few blocks, bench/results/engine_profile.md).
    """
    n = t.numel() * t.element_size()
    if n == 0 or t.device.type != "cpu":
        return t
    import mmap

    out = torch.frombuffer(mmap.mmap(-1, n), dtype=t.dtype, count=t.numel()).view(t.shape)
    out.copy_(t)
    return out


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
