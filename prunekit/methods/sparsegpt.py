"""SparseGPT: prune a linear layer and reconstruct the remaining weights with OBS updates.

SparseGPT is a *solver*, not only a score: it chooses the mask column block by column block and,
after each pruned column, updates the not-yet-processed columns so that the layer output on the
calibration inputs changes as little as possible (Optimal Brain Surgeon with the layer Hessian).

Algorithm (Frantar & Alistarh 2023), for W of shape (out, in) and H = (2/n) sum_t x_t x_t^T (fp32):

1. dead inputs (H_jj == 0: the feature is 0 on every calibration token) get H_jj = 1 and their weight
   column is zeroed (its value never affects the calibration output);
2. damping: H += percdamp * mean(diag H) * I;
3. Hinv = upper Cholesky factor U of H^-1 (H^-1 = U^T U; computed as J L^-1 J from the Cholesky
   factor L of the reversed J H J, ``_upper_factor_of_inverse``). Row j of U restricted to columns >= j is the
   OBS update direction for column j once the columns before j are fixed, and U_jj^2 is the matching
   diagonal of the inverse of the remaining Hessian;
4. columns are processed in blocks of ``blocksize`` (128) columns. Per block, the mask is chosen
   - unstructured: over all rows of the block, the lowest-scoring ``k_b`` weights by w^2 / U_jj^2,
     k_b chosen so that the whole layer prunes exactly ``int(sparsity * out * in)`` weights;
   - per-row ratios (``sparsity`` a tensor of length ``out``): row r prunes in each block its lowest
     ``floor(s_r * i2) - floor(s_r * i1)`` weights, so row r prunes exactly ``floor(s_r * in)``;
   - N:M: at every column i with i % M == 0 each row prunes its N lowest of columns i..i+M-1,
     scored on the weights as already updated by the earlier columns;
   - fixed mask (``mask`` given, chosen by another metric): the mask is used as is, only the OBS
     updates are done. ``mask`` takes precedence over ``sparsity`` and ``pattern``;
5. for each column j of the block: q = w with the pruned entries set to 0, err = (w - q) / U_jj,
   W[:, j:block_end] -= err * U[j, j:block_end]; after the block the remaining columns get the
   accumulated update at once: W[:, block_end:] -= Err_block @ U[block, block_end:] (lazy batch update).
   With the block's mask fixed this column recursion is, per row, a unit triangular system; on a GPU
   it is solved as such, 32 columns per batched solve (``_sweep``'s "triangular" method).

Robustness: ``torch.linalg.cholesky`` fails on Hessians that are not numerically positive-definite
(users of the reference code hit "not positive-definite"). Here every failure (an error, a non-finite
or non-positive factor) multiplies the damping by 10 (logged at WARNING) for up to ``max_damp_tries``
attempts; after that, or when H itself is not finite, the solver falls back to the diagonal of H
(no cross-column compensation, i.e. pruning by w^2 * H_jj with no update) and logs it. The result is
checked for NaN/inf; if the updates produced any, the layer is redone with the diagonal fallback.
It never raises for numerical reasons.

Memory: one (in, in) fp32 Hessian per layer is gathered (``stats.hessian``); while solving, the
solver holds one damped working copy of H (through the engine's adapter this is the fresh
``hessian_mean()``, damped in place: ``overwrite_h``), the Cholesky factor L of its reversed copy and
L^-1, i.e. with ``stats.hessian`` four (in, in) fp32 matrices at the peak (L and L^-1 are released
before the column sweep, which keeps U only), plus two fp32 copies of W and a bool mask of its size (the
"triangular" sweep adds one (out, 32, 32) fp32 batch per sub-block: 45 MB for 11008 rows). For a
4096 x 11008 MLP projection one such matrix is 11008^2 * 4 B = 485 MB. Layers that read the same
input (q/k/v, gate/up) share one ``LayerStats``, and the engine's adapter keeps the factor U (with the
dead inputs and H's diagonal: ``HessianFactor``) in its cache until the last of them is solved, so a
LLaMA block factors 4 Hessians, not 7, at the cost of holding that U between those layers.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from pydantic import Field

from ..core.errors import PrunekitError
from ..core.lsq import all_finite, check_solver_inputs, nothing_to_prune
from ..core.masks import _lowest_k_mask
from ..core.metric import register_metric
from ..core.registry import Int, Params
from ..core.stats import LayerStats, float32_matmul_precision

log = logging.getLogger(__name__)

DEFAULT_BLOCKSIZE = 128
DEFAULT_PERCDAMP = 0.01
DEFAULT_MAX_DAMP_TRIES = 8
SUB_BLOCK = 16  # columns per rank-1 sub-block inside a 128-column block (``_sweep``, method "columns")
INVERSE_BASE = 256  # blocks solved directly in the recursive triangular inverse (``_lower_inverse_into``)
INVERSE_CHUNK = 1024  # columns per GEMM pair there (bounds its temporary)
TRIANGULAR_SUB = 32  # columns per batched triangular solve (``_sweep``, method "triangular")
SWEEP_METHODS = ("columns", "triangular")


def _diagonal_factor(H: torch.Tensor, damp: float) -> torch.Tensor:
    """U for a diagonal Hessian: U = diag(1 / sqrt(H_jj + damp)); no cross-column updates.
    ``H``: the (in, in) Hessian or just its diagonal (a vector)."""
    d = torch.nan_to_num((H.diagonal() if H.dim() == 2 else H).clone(), nan=1.0, posinf=1.0, neginf=1.0)
    d = torch.where(d > 0, d, torch.ones_like(d)) + max(float(damp), 0.0)
    return torch.diag(d.rsqrt())


def _finite_factor(U: torch.Tensor) -> bool:
    return all_finite(U) and bool((U.diagonal() > 0).all())


def _lower_inverse_into(L: torch.Tensor, out: torch.Tensor) -> None:
    """``out`` = L^-1 for a lower-triangular L, by recursive halving: for L = [[A, 0], [B, C]],
    L^-1 = [[A^-1, 0], [-C^-1 B A^-1, C^-1]]. The off-diagonal block is two GEMMs per ``INVERSE_CHUNK``
    columns (a (n/2, INVERSE_CHUNK) temporary), so the inverse costs about n^3/3 multiply-adds, mostly
    in GEMMs, and no (n, n) memory beyond ``out``. Blocks of at most ``INVERSE_BASE`` rows are solved
    against the identity."""
    n = L.shape[0]
    if n <= INVERSE_BASE:
        out.copy_(torch.linalg.solve_triangular(L, torch.eye(n, dtype=L.dtype, device=L.device), upper=False))
        return
    h = n // 2
    _lower_inverse_into(L[:h, :h], out[:h, :h])
    _lower_inverse_into(L[h:, h:], out[h:, h:])
    out[:h, h:].zero_()
    for c1 in range(0, h, INVERSE_CHUNK):
        c2 = min(c1 + INVERSE_CHUNK, h)
        # columns c1:c2 of A^-1 are zero above row c1 (lower triangular), so B A^-1 needs B[:, c1:] only
        t = L[h:, c1:h] @ out[c1:h, c1:c2]
        torch.matmul(out[h:, h:], t, out=out[h:, c1:c2])
        out[h:, c1:c2].neg_()


def _upper_factor_of_inverse(Hd: torch.Tensor) -> torch.Tensor | None:
    """The upper Cholesky factor U of Hd^-1 (U^T U = Hd^-1), or None if Hd is not numerically positive
    definite; Hd is not modified.

    With J the reversal of rows and columns and J Hd J = L L^T (lower Cholesky factor L):
    Hd^-1 = J L^-T L^-1 J = (J L^-1 J)^T (J L^-1 J), and J L^-1 J is upper triangular with a positive
    diagonal, so U = J L^-1 J. One Cholesky and one triangular inverse (about 2/3 n^3 multiply-adds);
    the textbook chain (Cholesky of Hd, its inverse, Cholesky of that) takes twice as many, and its
    second Cholesky can fail on an ill-conditioned inverse. CPU (bench/results/sparsegpt_factor.md, through
    ``inverse_cholesky_upper``): 4096 x 4096 1.33 -> 0.80 s, 11008 x 11008 17.5 -> 11.1 s, the same or a
    smaller error against float64; at 576 x 576 the recursion costs more than it saves (0.009 -> 0.013 s).
    Memory: besides Hd, the reversed copy and L, then L and L^-1, then L^-1 and U: two (n, n) matrices at
    once, as in the textbook chain (L and the inverse, then the inverse and U). Measured through the engine's
    adapter on a 4096 x 11008 layer: 3.49 Hessians of extra RSS for the whole solve, 5.13 with the chain
    (bench/results/sparsegpt_memory.md)."""
    F = Hd.flip(0, 1)
    L, info = torch.linalg.cholesky_ex(F)
    del F  # before L^-1 is allocated: at most three (n, n) matrices with Hd
    if int(info) != 0 or not all_finite(L):
        return None
    Li = torch.empty_like(L)
    with float32_matmul_precision("highest"):  # full float32 GEMMs even where the caller allows TF32
        _lower_inverse_into(L, Li)
    del L
    return Li.flip(0, 1)


def inverse_cholesky_upper(H: torch.Tensor, percdamp: float = DEFAULT_PERCDAMP,
                           max_damp_tries: int = DEFAULT_MAX_DAMP_TRIES, name: str = "layer",
                           overwrite: bool = False) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damp I)^-1, raising the damping on failure (never raises).

    H must already have its dead diagonal entries replaced. The first attempt uses
    damp = percdamp * mean(diag H); each failure multiplies it by 10 (a zero damping is first raised
    to 1e-6 * mean(diag H)). After ``max_damp_tries`` failures the diagonal of H is used instead.
    ``overwrite=True`` damps H in place (one (in, in) copy less; H then holds the last damped matrix);
    by default H is left as it was.
    """
    if not all_finite(H):
        log.warning("%s: the Hessian has NaN/inf entries; SparseGPT falls back to its diagonal (no OBS compensation)", name)
        return _diagonal_factor(H, 0.0)
    diag = H.diagonal().clone()
    mean_diag = float(diag.mean())
    if not mean_diag > 0:
        mean_diag = 1.0
    damp = percdamp * mean_diag
    for attempt in range(max(int(max_damp_tries), 0)):
        Hd = H if overwrite else H.clone()
        Hd.diagonal().copy_(diag + damp)
        try:
            U = _upper_factor_of_inverse(Hd)
        except RuntimeError as exc:  # torch.linalg.LinAlgError and friends
            log.warning("%s: SparseGPT factorisation raised %s: %s", name, type(exc).__name__, exc)
            U = None
        if U is not None and _finite_factor(U):
            if attempt:
                log.warning("%s: SparseGPT Cholesky succeeded with damping %.3g (%.3g x mean diag H)",
                            name, damp, damp / mean_diag)
            return U
        new_damp = damp * 10.0 if damp > 0 else 1e-6 * mean_diag
        log.warning("%s: SparseGPT Cholesky failed with damping %.3g (%.3g x mean diag H); retrying with %.3g",
                    name, damp, damp / mean_diag, new_damp)
        damp = new_damp
    log.warning("%s: SparseGPT Cholesky failed %d times; falling back to the diagonal Hessian (no OBS compensation)",
                name, max_damp_tries)
    return _diagonal_factor(diag, percdamp * mean_diag)


def sweep_method(device) -> str:
    """The within-block solve used on ``device`` when the ``sweep`` parameter is "auto": "triangular" on CUDA,
    "columns" elsewhere.

    Both give the same masks and weights up to float rounding (tests compare both with a textbook float64
    OBS sweep). On a 2-core CPU they take about the same time (bench/results/sweep_speed.md), so the CPU keeps
    the column loop; on a GPU the column loop is bound by kernel launches (two kernels per column), while the
    triangular solve needs about 4 kernels per ``TRIANGULAR_SUB`` columns."""
    return "triangular" if torch.device(device).type == "cuda" else "columns"


def _block_columns(W1t, U1, S1t, M1, nm, sub):
    """The column loop on one block (``W1t``: the block transposed, one row per column; modified in
    place). Returns the block's errors, transposed like W1t. For N:M, ``M1``/``S1t`` are filled here."""
    count = W1t.shape[0]
    d = U1.diagonal()
    Err1t = torch.empty_like(W1t)
    # views made once per block (per-column indexing is a visible part of the cost on a GPU)
    w, s, e, u = W1t.unbind(0), S1t.unbind(0), Err1t.unbind(0), U1.unbind(0)
    for j1 in range(0, count, sub):
        j2 = min(j1 + sub, count)
        for i in range(j1, j2):
            if nm is not None and i % nm[1] == 0:
                j = slice(i, i + nm[1])
                tmp = W1t[j].t().pow(2) / d[j].pow(2)[None, :]
                M1[:, j] = _lowest_k_mask(tmp, nm[0])
                S1t[j] = M1[:, j].t().to(W1t.dtype) / d[j, None]
            torch.mul(w[i], s[i], out=e[i])
            if i + 1 < j2:
                W1t[i + 1:j2].addr_(u[i][i + 1:j2], e[i], alpha=-1.0)
        if j2 < count:  # the sub-block's updates of the block's later columns, as one GEMM
            W1t[j2:].addmm_(U1[j1:j2, j2:].t(), Err1t[j1:j2], alpha=-1.0)
    return Err1t


def _block_triangular(W1, U1, S1, sub):
    """One block with its mask fixed, solved ``sub`` columns at a time (``W1``: rows x count, modified in
    place; ``S1 = mask / U_jj``). Returns the block's errors (rows x count).

    The column loop sets, for each column j, e_j = s_j f_j with f_j = w_j - sum_{i<j} e_i U_ij (the
    column as the earlier columns left it) and s_j = 1/U_jj where pruned, else 0. Within a sub-block
    that is, for each row r, the unit upper-triangular system e_r (I + N S_r) = w_r S_r with N the
    sub-block of U above its diagonal and S_r = diag(s_r): one batched triangular solve over the rows
    (a (rows, sub, sub) fp32 batch: 45 MB for 11008 rows and sub = 32). One GEMM then applies the
    sub-block's errors to the rest of the block; its diagonal part leaves the pruned entries at ~0
    (exact zeros are written at the block's end)."""
    count = W1.shape[1]
    Err1 = torch.empty_like(W1)
    for j1 in range(0, count, sub):
        j2 = min(j1 + sub, count)
        S = S1[:, j1:j2]
        A = U1[j1:j2, j1:j2].triu(1) * S[:, None, :]  # row r: N S_r (its diagonal is not read)
        e = torch.linalg.solve_triangular(A, (W1[:, j1:j2] * S).unsqueeze(1), upper=True, left=False,
                                          unitriangular=True).squeeze(1)
        Err1[:, j1:j2] = e
        W1[:, j1:].addmm_(e, U1[j1:j2, j1:], alpha=-1.0)
    return Err1


@torch.no_grad()
def _sweep(W: torch.Tensor, U: torch.Tensor, sparsity, pattern, mask, blocksize: int, method: str | None = None):
    """The column sweep on W (modified in place). Returns the prune mask.

    Per block of ``blocksize`` columns the mask is chosen first (except N:M, chosen per M columns on the
    way), then the block is solved by one of two methods (``sweep_method``):

    - "columns": one column at a time, two kernels per column: the block is held transposed (``W1t``:
      one row per column, contiguous), ``S1 = mask / U_jj`` is formed once per block (per M columns for
      N:M), so a column's error is one multiply (``err = w * S1[:, i]``: the pruned entries' w / U_jj,
      exactly 0 elsewhere) and its update of the later columns one rank-1 ``addr_``. The rank-1 updates
      reach only the rest of the column's sub-block of ``SUB_BLOCK`` columns; each sub-block then updates
      the block's later columns with one GEMM (CPU, SmolLM2 shapes: 576 x 1536 layer 106 -> 67 ms per
      sweep). N:M always uses this method (a group's mask depends on the updates of the group before).
    - "triangular": ``TRIANGULAR_SUB`` columns at a time by a batched triangular solve
      (``_block_triangular``), a few kernels per sub-block instead of two per column.

    The pruned entries are set to exact zeros at the block's end."""
    rows, cols = W.shape
    dev = W.device
    method = method or sweep_method(dev)
    out_mask = torch.zeros(rows, cols, dtype=torch.bool, device=dev)
    row_ratios = sparsity if isinstance(sparsity, torch.Tensor) else None
    nm = (int(pattern[0]), int(pattern[1])) if (mask is None and pattern is not None) else None
    if nm is not None and blocksize % nm[1]:
        blocksize = max(nm[1], blocksize // nm[1] * nm[1])
    # inside a block, rank-1 updates only within sub-blocks of ``SUB_BLOCK`` columns (a multiple of M for
    # N:M, so that a group's columns are up to date when its mask is chosen); the rest of the block is
    # updated by one GEMM per sub-block (the same lazy-batch idea one level down)
    sub = SUB_BLOCK if nm is None else max(nm[1], SUB_BLOCK // nm[1] * nm[1])
    triangular = nm is None and method == "triangular"
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2]
        U1 = U[i1:i2, i1:i2]
        d = U1.diagonal()
        if mask is not None:
            M1 = mask[:, i1:i2].to(device=dev, dtype=torch.bool)
        elif nm is not None:
            M1 = torch.zeros(rows, count, dtype=torch.bool, device=dev)
        else:
            score = W1.pow(2) / d.pow(2)[None, :]
            if row_ratios is not None:
                k = (torch.floor(row_ratios * i2) - torch.floor(row_ratios * i1)).long().to(dev)
                M1 = _lowest_k_mask(score, k)
            else:
                k = int(sparsity * (rows * i2)) - int(sparsity * (rows * i1))
                M1 = _lowest_k_mask(score.reshape(1, -1), k).reshape(rows, count)
        if triangular:
            W1 = W1.clone()
            Err1 = _block_triangular(W1, U1, M1.to(W1.dtype) / d[None, :], TRIANGULAR_SUB)
        else:
            W1t = W1.t().contiguous()  # (count, rows)
            S1t = M1.t().to(W1t.dtype) / d[:, None] if nm is None else torch.empty_like(W1t)
            Err1 = _block_columns(W1t, U1, S1t, M1, nm, sub).t()
            W1 = W1t.t()
        W[:, i1:i2] = W1.masked_fill_(M1, 0.0)  # exact zeros where pruned
        out_mask[:, i1:i2] = M1
        if i2 < cols:
            W[:, i2:].addmm_(Err1, U[i1:i2, i2:], alpha=-1.0)
    return out_mask


@dataclass
class HessianFactor:
    """What the column sweep needs from H, computed once per Hessian (``factor_hessian``) and shared by
    the layers that read the same input (q/k/v, gate/up: ``sparsegpt_solver`` caches it on their shared
    ``LayerStats``)."""

    U: torch.Tensor  # upper Cholesky factor of (H + damp I)^-1 (dead diagonal entries set to 1 first)
    dead: torch.Tensor  # bool (in,): inputs that are 0 on every calibration token (H_jj == 0)
    diag: torch.Tensor  # H's diagonal with the dead entries 1 (the diagonal fallback's Hessian)


@torch.no_grad()
def factor_hessian(H: torch.Tensor, device=None, percdamp: float = DEFAULT_PERCDAMP,
                   max_damp_tries: int = DEFAULT_MAX_DAMP_TRIES, name: str = "layer",
                   overwrite_h: bool = False) -> HessianFactor:
    """Steps 1-3 of the algorithm for H (in, in), on ``device`` (default H's). ``overwrite_h=True``: H
    (fp32, already on the device) is used as the scratch copy, its contents undefined afterwards."""
    device = H.device if device is None else torch.device(device)
    Hf = H.detach().to(device=device, dtype=torch.float32)
    if Hf.data_ptr() == H.data_ptr() and not overwrite_h:
        Hf = Hf.clone()  # .to() made no copy, and the caller's H must stay as it was
    diag = Hf.diagonal()
    dead = ~(diag > 0) & torch.isfinite(diag)  # zero (or negative) diagonal: the feature never fires
    if bool(dead.any()):
        diag[dead] = 1.0
    diag = diag.clone()
    U = inverse_cholesky_upper(Hf, percdamp, max_damp_tries, name=name, overwrite=True)  # Hf is our copy
    return HessianFactor(U, dead, diag)


@torch.no_grad()
def sparsegpt_solve(W: torch.Tensor, H: torch.Tensor | None, sparsity=0.5, pattern: tuple[int, int] | None = None,
                    mask: torch.Tensor | None = None, blocksize: int = DEFAULT_BLOCKSIZE,
                    percdamp: float = DEFAULT_PERCDAMP, max_damp_tries: int = DEFAULT_MAX_DAMP_TRIES,
                    name: str = "layer", overwrite_h: bool = False,
                    factor: HessianFactor | Callable[[], HessianFactor] | None = None,
                    sweep: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Prune W (out, in) with SparseGPT; returns (new fp32 weight, bool prune mask, True = pruned).

    ``H`` is (2/n) sum x x^T (``LayerStats.hessian_mean()``); ``sparsity`` a float in [0, 1) or a
    per-row tensor of ratios; ``pattern`` (N, M) or None; ``mask`` an optional fixed prune mask (then
    only the OBS updates are done). W and H are not modified; the caller writes the result back.
    ``overwrite_h=True`` lets the solver use H (fp32, on W's device) as its scratch copy: two (in, in)
    matrices less at the peak, H's contents undefined afterwards (the engine's adapter passes a fresh
    ``hessian_mean()``). ``factor``: H's ``factor_hessian``, or a function returning it (called only when
    there is something to prune); then H is not read and may be None, and percdamp and max_damp_tries
    are the factor's. ``sweep``: "columns" or "triangular" (how a block is solved, see ``_sweep``);
    None or "auto": ``sweep_method(W.device)``.
    Dead input columns (H_jj == 0) are zeroed in the result even where the mask keeps them (their
    input is 0 on every calibration token); the returned mask lists only the pruned positions.
    """
    if factor is None and H is None:
        raise PrunekitError("SparseGPT needs the Hessian H or its factor")
    s = check_solver_inputs(W, H.shape if factor is None else None, sparsity, pattern, mask, "SparseGPT")
    Wf = W.detach().to(torch.float32).clone()
    rows, cols = Wf.shape
    if nothing_to_prune((rows, cols), s, pattern, mask):
        return Wf, torch.zeros(rows, cols, dtype=torch.bool, device=Wf.device)
    check_solver_params({"blocksize": blocksize, "sweep": sweep or "auto"})
    sweep = None if sweep == "auto" else sweep
    if factor is None:
        factor = factor_hessian(H, Wf.device, percdamp, max_damp_tries, name=name, overwrite_h=overwrite_h)
    elif callable(factor):
        factor = factor()
    if tuple(factor.U.shape) != (cols, cols):
        raise PrunekitError(f"SparseGPT: factor shape {tuple(factor.U.shape)} does not match the weight's input "
                            f"dimension {cols}")
    if bool(factor.dead.any()):
        Wf[:, factor.dead] = 0.0
    if isinstance(s, torch.Tensor):
        s = s.to(Wf.device)
    W0 = Wf.clone()
    out_mask = _sweep(Wf, factor.U, s, pattern, mask, blocksize, sweep)
    if not all_finite(Wf):
        log.warning("%s: SparseGPT updates produced NaN/inf; redoing the layer with the diagonal Hessian", name)
        U = _diagonal_factor(factor.diag, 0.0)
        Wf = W0
        out_mask = _sweep(Wf, U, s, pattern, mask, blocksize, sweep)
        Wf = torch.nan_to_num(Wf, nan=0.0, posinf=0.0, neginf=0.0)  # only if W itself held NaN/inf
    return Wf, out_mask


class SparseGPTParams(Params):
    blocksize: Int = Field(DEFAULT_BLOCKSIZE, ge=1, description="columns per lazy-update block")
    percdamp: float = Field(DEFAULT_PERCDAMP, ge=0, description="damping, a fraction of the mean Hessian diagonal")
    max_damp_tries: Int = Field(DEFAULT_MAX_DAMP_TRIES, ge=0, description="damping increases before the diagonal fallback")
    sweep: Literal["auto", "columns", "triangular"] = "auto"


def check_solver_params(params: dict) -> None:
    """The parameters users may set (``metric_params`` / ``reconstruct_params``), for direct calls."""
    SparseGPTParams.check(params, "SparseGPT", "sparsegpt")


def sparsegpt_solver(W: torch.Tensor, stats: LayerStats, sparsity, pattern=None, mask=None, name: str = "layer",
                     percdamp: float = DEFAULT_PERCDAMP, max_damp_tries: int = DEFAULT_MAX_DAMP_TRIES, **kw):
    """Adapter with the engine's solver signature: solver(W, stats, sparsity, pattern, mask).

    The Hessian's factor is computed once per ``stats`` and kept in ``stats.cache``: layers that read
    the same input share their statistics (calibrate.run_block), so q/k/v factor one Hessian, not
    three (on LLaMA-7B shapes, 3 of the 7 (in, in) factorisations per block). The
    engine empties the cache once the last of those layers is handled."""
    if stats is None or stats.hessian is None:
        raise PrunekitError("SparseGPT needs the layer Hessian: gather statistics with needs=('hessian',)")
    check_solver_params({"percdamp": percdamp, "max_damp_tries": max_damp_tries})
    key = ("sparsegpt_factor", str(W.device), float(percdamp), int(max_damp_tries))

    def factor() -> HessianFactor:
        if key not in stats.cache:
            stats.cache[key] = factor_hessian(stats.hessian_mean(), W.device, percdamp, max_damp_tries, name=name,
                                              overwrite_h=True)
        return stats.cache[key]

    return sparsegpt_solve(W, None, sparsity, pattern=pattern, mask=mask, name=name, factor=factor, **kw)


register_metric(
    "sparsegpt", needs=("hessian",), group="layer",  # mask chosen per block over all rows
    description="SparseGPT solver: OBS reconstruction with H=(2/n) sum x x^T; mask per 128-column block "
                "over all rows by w^2/Hinv_jj^2 (one (in,in) fp32 Hessian per layer)",
    solver=sparsegpt_solver, params=SparseGPTParams,
)(None)
