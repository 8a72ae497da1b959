"""The layer least-squares problem that weight-update solvers share, in normalised coordinates.

A linear layer with dense weight W (out, in) and calibration inputs X (n, in) is pruned to Ŵ with a prune mask M
(True = pruned, Ŵ[M] = 0). Its output error on the calibration tokens is, row by row,

    E(Ŵ) = sum_r (w_r - ŵ_r)^T H (w_r - ŵ_r),   H = X^T X (any positive multiple of it; the engine's
                                                 ``hessian_mean()`` is (2/n) X^T X).

For a fixed mask the rows are independent least-squares problems: row r keeps the columns K_r and its optimum
solves H[K_r, K_r] ŵ_K = (H w_r)[K_r], ŵ on the other columns 0. Every solver here works on the same damped and
normalised H (:class:`Problem`):

1. dead inputs (H_jj <= 0: the feature is 0 on every calibration token) get H_jj = 1; their weight is 0 in every
   solution (it never changes the calibration output, as in SparseGPT);
2. damping: H_d = H + percdamp * mean(diag H) * I (SparseGPT's and ALPS's convention; it keeps H_d positive
   definite and pulls the kept weights gently towards the dense ones);
3. normalisation: D = sqrt(diag H_d), Hn = D^-1 H_d D^-1 (unit diagonal), Wn = W D. The objective is the same
   in these coordinates, a mask is the same mask, and a penalty rho * I on Hn is a per-feature penalty scaled like
   the feature (Boža 2024 and ALPS both solve in these coordinates); it also is the Jacobi preconditioner of the
   conjugate-gradient solve below.

:func:`masked_cg` finds the exact optimum on a fixed support (conjugate gradients on every row at once, one GEMM
per iteration); :func:`damped_inverse` gives (Hn + rho I)^-1 with SparseGPT's guard (damping raised on failure,
the diagonal as the last resort, never NaN). Memory: a Problem holds Hn (in x in, float32) and two vectors;
``damped_inverse`` one more (in, in) matrix (factor and inverse are computed in place in it).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from .errors import PrunekitError
from .masks import check_nm_shape, check_sparsity

log = logging.getLogger(__name__)

DEFAULT_PERCDAMP = 0.01
DEFAULT_MAX_DAMP_TRIES = 8


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or +-inf in t, from one min/max pass (``aminmax`` propagates NaN): no bool copy of t, 0.02 s
    instead of 0.6 s for ``isfinite(t).all()`` on an 11008 x 11008 matrix on this CPU."""
    return t.numel() == 0 or bool(torch.isfinite(torch.stack(torch.aminmax(t))).all())


def check_solver_inputs(W: torch.Tensor, h_shape, sparsity, pattern, mask, who: str):
    """A solver's arguments checked (``who`` names the solver in the messages): W 2-D, H (``h_shape``, None when
    not given) (in, in), a mask of W's shape, a valid N:M pattern that divides ``in``, a sparsity in [0, 1) or one
    per row. Returns the sparsity (a float or a float64 per-row tensor; None with a mask or a pattern)."""
    if W.dim() != 2:
        raise PrunekitError(f"{who} expects a 2-D weight, got shape {tuple(W.shape)}")
    rows, cols = W.shape
    if h_shape is not None and tuple(h_shape) != (cols, cols):
        raise PrunekitError(f"{who}: Hessian shape {tuple(h_shape)} does not match the weight's input dimension {cols}")
    if mask is not None:
        if tuple(mask.shape) != (rows, cols):
            raise PrunekitError(f"{who}: mask shape {tuple(mask.shape)} != weight shape {(rows, cols)}")
        return None
    if pattern is not None:
        n, m = int(pattern[0]), int(pattern[1])
        if not 0 < n < m:
            raise PrunekitError(f"N:M pattern needs 0 < N < M, got {n}:{m}")
        check_nm_shape((n, m), cols)
        return None
    if isinstance(sparsity, torch.Tensor) and sparsity.numel() > 1:
        s = sparsity.reshape(-1).double()
        if s.numel() != rows:
            raise PrunekitError(f"{who}: {s.numel()} row ratios for {rows} rows")
        if not bool(((s >= 0) & (s < 1)).all()):
            raise PrunekitError(f"{who}: row sparsities must be in [0, 1)")
        return s
    return check_sparsity(sparsity)


def nothing_to_prune(shape, sparsity, pattern, mask) -> bool:
    """Whether a solver has nothing to do: no mask and no pattern given, and ``sparsity`` (as returned by
    :func:`check_solver_inputs`) rounds to zero weights."""
    rows, cols = shape
    return mask is None and pattern is None and (
        (isinstance(sparsity, float) and int(sparsity * rows * cols) == 0)
        or (isinstance(sparsity, torch.Tensor) and int(torch.floor(sparsity * cols).sum()) == 0))


def unpruned(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What a solver returns when it has nothing to prune: W as a new float32 tensor and an all-False mask."""
    return W.detach().float().clone(), torch.zeros(W.shape, dtype=torch.bool, device=W.device)


@dataclass
class Problem:
    """A layer's damped, normalised Hessian (see the module docstring)."""

    Hn: torch.Tensor  # (in, in) float32, unit diagonal
    scale: torch.Tensor  # (in,) D = sqrt(diag H_d): Wn = W * scale, W = Wn / scale
    dead: torch.Tensor  # (in,) bool: inputs that are 0 on every calibration token
    live: torch.Tensor | None = field(default=None, repr=False)  # scale with the dead inputs 0 (made on first use)

    def normalise(self, W: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Wn = W D with the dead columns 0: a new float32 tensor, or written into ``out`` (float32, W's shape)."""
        Wn = torch.mul(W.to(device=self.Hn.device, dtype=torch.float32), self.scale, out=out)
        Wn[:, self.dead] = 0.0
        return Wn

    def add_normalised(self, X: torch.Tensor, W: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        """X += alpha Wn in place (W's rows matching X's; no Wn tensor): for the solvers that need Wn once per
        iteration and take it from W rather than keep it."""
        if self.live is None:
            self.live = self.scale.masked_fill(self.dead, 0.0)
        return X.addcmul_(W.to(device=X.device), self.live, value=alpha)

    def restore(self, Wn: torch.Tensor) -> torch.Tensor:
        """W = Wn D^-1 in place of Wn (a solver's own result), non-finite entries 0 (only reachable from a W that
        held them)."""
        return Wn.div_(self.scale).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)

    def finite_or_dense(self, Xn: torch.Tensor, W: torch.Tensor, mask: torch.Tensor, who: str,
                        name: str = "layer") -> torch.Tensor:
        """A solver's normalised result Xn, or, if it holds NaN/inf, the dense weights on the mask (no update;
        logged): the guard every weight-update solver ends with, so that a prune never writes NaN."""
        if all_finite(Xn):
            return Xn
        log.warning("%s: %s produced NaN/inf; keeping the dense weights on the mask (no update)", name, who)
        return self.normalise(W).masked_fill_(mask, 0.0)

    def error(self, Wn: torch.Tensor, Vn: torch.Tensor) -> torch.Tensor:
        """Per-row error (w - v)^T Hn (w - v) of Vn against Wn, float64 (the damped objective)."""
        R = Wn - Vn
        return ((R @ self.Hn) * R).sum(1, dtype=torch.float64)


@torch.no_grad()
def make_problem(H: torch.Tensor, device=None, percdamp: float = DEFAULT_PERCDAMP, overwrite: bool = False,
                 name: str = "layer") -> Problem:
    """The :class:`Problem` of Hessian H (in, in). ``overwrite=True`` uses H (float32, already on the device) as
    the storage of Hn. A non-finite H is replaced by its finite diagonal (the solvers then make no cross-column
    updates), with a warning."""
    device = H.device if device is None else torch.device(device)
    Hd = H.detach().to(device=device, dtype=torch.float32)
    if Hd.data_ptr() == H.data_ptr() and not overwrite:
        Hd = Hd.clone()
    if not all_finite(Hd):
        log.warning("%s: the Hessian has NaN/inf entries; falling back to its diagonal (no cross-column updates)", name)
        d = torch.nan_to_num(Hd.diagonal().clone(), nan=0.0, posinf=0.0, neginf=0.0)
        Hd = torch.diag(d)
    diag = Hd.diagonal()
    dead = ~(diag > 0)
    if bool(dead.any()):
        Hd[dead, :] = 0.0
        Hd[:, dead] = 0.0
        diag[dead] = 1.0
    mean = float(diag.mean()) if diag.numel() else 1.0
    diag += max(float(percdamp), 0.0) * (mean if mean > 0 else 1.0)
    scale = diag.sqrt()
    inv = scale.reciprocal()
    Hd.mul_(inv[:, None]).mul_(inv[None, :])
    Hd.diagonal().fill_(1.0)
    return Problem(Hd, scale, dead)


def solver_problem(W: torch.Tensor, H: torch.Tensor | None, problem, percdamp: float, who: str,
                   name: str = "layer") -> Problem:
    """A solver's :class:`Problem`: ``problem`` (a Problem, or a function returning one: the engine's cached one)
    or, when it is None, one made from H on W's device; checked against W's input dimension."""
    if problem is None:
        P = make_problem(H, W.device, percdamp, name=name)
    else:
        P = problem() if callable(problem) else problem
    if tuple(P.Hn.shape) != (W.shape[1], W.shape[1]):
        raise PrunekitError(f"{who}: Hessian shape {tuple(P.Hn.shape)} does not match the weight's input dimension "
                            f"{W.shape[1]}")
    return P


def _diagonal_inverse(n: int, rho: float, device) -> torch.Tensor:
    """(I + rho I)^-1 = I / (1 + rho): the inverse if Hn were its unit diagonal (no cross-column terms)."""
    return torch.eye(n, device=device, dtype=torch.float32) / (1.0 + rho)


@torch.no_grad()
def damped_inverse(Hn: torch.Tensor, rho: float, max_damp_tries: int = DEFAULT_MAX_DAMP_TRIES,
                   name: str = "layer") -> torch.Tensor:
    """(Hn + rho I)^-1 from one Cholesky factorisation; never raises for numerical reasons.

    Hn has a unit diagonal, so rho is relative to it. A failed factorisation (an error, or a non-finite or
    non-positive factor) is retried with rho + extra, extra = 1e-6 first and then x10 each time (logged at
    WARNING), for up to ``max_damp_tries`` attempts; after that the diagonal (I / (1 + rho)) is used and logged."""
    n = Hn.shape[0]
    extra = 0.0
    for attempt in range(max(int(max_damp_tries), 0)):
        # the factor, then the inverse, in place in one (in, in) matrix: At is Hn + (rho + extra) I in the
        # column-major layout LAPACK works in (A holds Hn transposed). Given a row-major matrix, torch factors a
        # column-major copy of it (one more (in, in) matrix at the peak, measured). Hn is symmetric only to
        # rounding, so the transposed copy keeps the factor bit-identical to factoring Hn itself
        A = torch.empty_like(Hn).copy_(Hn.mT)
        A.diagonal().add_(rho + extra)
        At = A.mT
        info = torch.empty((), dtype=torch.int32, device=A.device)
        torch.linalg.cholesky_ex(At, out=(At, info))
        if int(info) == 0 and all_finite(A) and bool((A.diagonal() > 0).all()):
            inv = torch.cholesky_inverse(At, out=At).mT
            if all_finite(inv):
                if attempt:
                    log.warning("%s: Cholesky of Hn + rho I succeeded with %.3g extra damping", name, extra)
                return inv
        new = 1e-6 if extra == 0 else extra * 10.0
        log.warning("%s: Cholesky of Hn + rho I failed with extra damping %.3g; retrying with %.3g", name, extra, new)
        extra = new
    log.warning("%s: Cholesky of Hn + rho I failed %d times; using the diagonal (no cross-column updates)", name,
                max_damp_tries)
    return _diagonal_inverse(n, rho, Hn.device)


@torch.no_grad()
def masked_cg(Hn: torch.Tensor, target: torch.Tensor, keep: torch.Tensor, X0: torch.Tensor, iters: int,
              rtol: float = 1e-6, overwrite: bool = False) -> torch.Tensor:
    """The kept weights that minimise the error on a fixed support: for every row r, the solution of
    Hn[K_r, K_r] x_K = target_r[K_r] with x = 0 off K_r, by conjugate gradients on all rows at once.

    ``target`` is Wn @ Hn (the right side of the normal equations), ``keep`` the bool support (True = kept),
    ``X0`` the start (its pruned entries are ignored; ``overwrite=True`` iterates in X0 itself, one (out, in)
    matrix less). Each iteration costs one (out, in) x (in, in) GEMM. CG on a
    row stops improving once its residual is below ``rtol`` times its target's norm (that row's step is then 0);
    the loop ends when every row is there or after ``iters`` iterations. Steps whose curvature is not positive (a
    singular restricted Hn) or not finite are skipped for that row, so the result is finite whenever X0 is.
    Memory: four (out, in) float32 matrices (X, the residual, the direction and its product with Hn)."""
    drop = ~keep
    X = X0.masked_fill_(drop, 0.0) if overwrite else X0.masked_fill(drop, 0.0)
    stop = (rtol * torch.linalg.vector_norm(target.masked_fill(drop, 0.0), dim=1)).square_()  # before R, P, AP
    R = torch.matmul(X, Hn).neg_().add_(target).masked_fill_(drop, 0.0)
    P, AP = R.clone(), torch.empty_like(R)
    rr = torch.linalg.vector_norm(R, dim=1).square_()
    for _ in range(max(int(iters), 0)):
        active = rr > stop
        if not bool(active.any()):
            break
        torch.matmul(P, Hn, out=AP).masked_fill_(drop, 0.0)
        pap = (P * AP).sum(1)
        ok = active & (pap > 0) & torch.isfinite(pap)
        alpha = torch.where(ok, rr / torch.where(ok, pap, torch.ones_like(pap)), torch.zeros_like(pap))
        X.addcmul_(alpha[:, None], P)
        R.addcmul_(alpha[:, None], AP, value=-1.0)
        rr_new = torch.linalg.vector_norm(R, dim=1).square_()
        beta = torch.where(ok & (rr > 0), rr_new / torch.where(rr > 0, rr, torch.ones_like(rr)), torch.zeros_like(rr))
        P.mul_(beta[:, None]).add_(R)
        rr = torch.where(ok, rr_new, torch.zeros_like(rr))  # a row whose step failed stops there
    return X


def row_slices(rows: int, cols: int, min_rows: int = 32) -> list[tuple[int, int]]:
    """The slices of rows (start, stop) a solver works on: max(``min_rows``, cols / 8) rows each, so a slice's
    (rows, in) work matrices are at most an eighth of the (in, in) Hessian while its GEMMs against the Hessian
    still have hundreds of rows. On a fixed mask the rows are independent problems; a solver that compares its
    iterate over the whole layer (a layer-wide mask) still computes each iteration slice by slice."""
    step = max(int(min_rows), cols // 8)
    return [(r, min(r + step, rows)) for r in range(0, rows, step)]


def layer_problem(stats, device, percdamp: float = DEFAULT_PERCDAMP, name: str = "layer") -> Problem:
    """The :class:`Problem` of a layer's statistics (``LayerStats`` with the ``hessian``), made once and kept in
    ``stats.cache``: the layers that read the same input (q/k/v, gate/up) share it, and a refiner and the
    reconstruction that follows it on one layer use the same one. The engine empties the cache after the last of
    those layers."""
    key = ("lsq_problem", str(device), float(percdamp))
    if key not in stats.cache:
        stats.cache[key] = make_problem(stats.hessian_mean(), device, percdamp, overwrite=True, name=name)
    return stats.cache[key]
