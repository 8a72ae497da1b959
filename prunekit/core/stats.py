"""Streaming input statistics of one linear layer, gathered once per layer in a single pass.

Only the statistics a chosen method declares it needs are accumulated, so memory stays bounded:
  - ``sq_sum``/``sum``/``count``: O(d_in) floats per layer (Wanda, RIA, STADE, OWL);
  - ``hessian``: O(d_in^2) fp32 per input, only for solvers (SparseGPT), on the compute device (how it
    is computed on a GPU: ``gram``); layers that read one input tensor (q/k/v, gate/up) share one
    ``LayerStats`` (calibrate.run_block), so a LLaMA block accumulates and holds 4 Hessians, not 7;
  - ``last_tokens``: the inputs of the last token of each sequence (TRIM's X), or of ``tokens_per_sample``
    evenly spaced positions ending at the last one, for at most ``max_last_tokens`` sequences, so at most
    ``max_last_tokens * tokens_per_sample`` rows of d_in, kept on CPU.
All accumulation is in float32 (float64 for sums over many tokens), whatever the model dtype.

The inputs of one expert of a mixture-of-experts layer are the tokens the router sends to it, handed over as a
2-D tensor with their :class:`Routed` record (routing weights, positions in their sequences): ``count`` is then
the expert's token count, ``gate_sum`` the sum of its routing weights, and ``last_tokens`` keeps the routed tokens
that sit at the kept positions of their sequences.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)

KNOWN_STATS = frozenset({"sq_sum", "sum", "hessian", "last_tokens"})


SUM_CHUNK_ELEMENTS = 1 << 27  # 512 MB of float32 per temporary (feature sums, Hessian chunks)
CPU_SUM_ROWS = 1024  # rows per chunk of the feature sums on a CPU
_LOW_PRECISION = (torch.bfloat16, torch.float16)
DIAG_TOL = 4e-4  # the fast Hessian's worst relative error on its diagonal before it is abandoned
FAST_GRAM_FAILED: list[float] = []  # the error seen, once the fast path failed its check (then: float32)


def row_chunks(x: torch.Tensor, elements: int | None = None):
    """x (tokens, d) split into row chunks of at most ``elements`` values (default SUM_CHUNK_ELEMENTS, read
    at call time; at least one row each)."""
    elements = SUM_CHUNK_ELEMENTS if elements is None else elements
    return x.split(max(1, elements // max(x.shape[-1], 1)))


def gram(x: torch.Tensor) -> torch.Tensor:
    """x^T x in float32 for x of shape (tokens, d).

    On a CUDA device with bf16/fp16 inputs: TF32 tensor-core GEMMs on float32 copies of row chunks,
    accumulated into a float32 result (``_gram_tf32``). A bf16 or fp16 number is exact in TF32 (8 or 10
    significand bits of TF32's 10), and products of two are exact in float32, so TF32 loses nothing on
    these inputs; the sums are float32. Every result is checked: its diagonal against the exact float64
    sums of squares (``checked``); if the worst relative error exceeds ``DIAG_TOL``, this and every later
    call uses the float32 path and a warning says so. (A bf16 x bf16 GEMM with float32 output,
    ``torch.mm(..., out_dtype=torch.float32)``, is about 12x faster on a GPU but its relative error, 1.4e-3
    against 5e-5, is the size of a rounding to bf16 (bench/results/hessian_gemm.json): it is not used.)
    Elsewhere: float32 GEMMs on ``x.float()``.

    Either way only the upper triangle is computed, in column blocks (``_add_upper_``), and mirrored:
    about 5/8 of a full GEMM's work (about 30% less time on a CPU), an exactly symmetric result, equal to the
    full GEMM to the bit."""
    if x.is_cuda and x.dtype in _LOW_PRECISION and not FAST_GRAM_FAILED:
        h = checked(x, _gram_tf32(x))
        if h is not None:
            return h
    d = x.shape[-1]
    h = torch.zeros(d, d, dtype=torch.float32, device=x.device)
    _add_upper_(h, x.float())
    return _mirror_upper(h)


GRAM_BLOCK = {"cpu": 384, "cuda": 1024}  # column-block width of the upper-triangle X^T X (per device type)


def _blocks(d: int, device: torch.device) -> list[tuple[int, int]]:
    k = max(1, round(d / GRAM_BLOCK.get(device.type, 1024)))
    edges = [round(i * d / k) for i in range(k + 1)]
    return list(zip(edges, edges[1:]))


def _add_upper_(h: torch.Tensor, xf: torch.Tensor) -> None:
    """h[:j2, j1:j2] += xf[:, :j2]^T xf[:, j1:j2] for each column block [j1, j2): the upper block
    triangle of xf^T xf (diagonal blocks whole) added into h; the rest of h is not touched."""
    for j1, j2 in _blocks(h.shape[0], h.device):
        h[:j2, j1:j2].addmm_(xf[:, :j2].t(), xf[:, j1:j2])


def _mirror_upper(h: torch.Tensor) -> torch.Tensor:
    """Fill h's lower block triangle from its upper one (``_add_upper_``'s blocks), in place; h."""
    for j1, j2 in _blocks(h.shape[0], h.device):
        h[j1:j2, :j1] = h[:j1, j1:j2].t()
    return h


def _gram_tf32(x: torch.Tensor) -> torch.Tensor:
    """sum over row chunks of chunk^T chunk with TF32 matmuls, accumulated in a float32 (d, d) result."""
    d = x.shape[-1]
    h = torch.zeros(d, d, dtype=torch.float32, device=x.device)
    with float32_matmul_precision("high"):  # TF32 for float32 matmuls
        for part in row_chunks(x):
            _add_upper_(h, part.float())
    return _mirror_upper(h)


@contextlib.contextmanager
def float32_matmul_precision(precision: str):
    """``torch.set_float32_matmul_precision(precision)`` inside the block, the caller's setting after it."""
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(prev)


def sq_sums64(x: torch.Tensor) -> torch.Tensor:
    """Exact (float64) sum of squares of each column of x, in row chunks (the diagonal of x^T x)."""
    out = torch.zeros(x.shape[-1], dtype=torch.float64, device=x.device)
    for part in row_chunks(x, SUM_CHUNK_ELEMENTS // 2):  # float64: half as many values per chunk
        xd = part.double()
        out.add_((xd * xd).sum(0))
    return out


def checked(x: torch.Tensor, h: torch.Tensor) -> torch.Tensor | None:
    """``h`` if its diagonal matches the exact sums of squares of x within DIAG_TOL (relative, worst
    entry), else None (and the fast path is switched off for the rest of the process, with a warning)."""
    exact = sq_sums64(x)
    live = exact > 0
    err = float(((h.diagonal().double() - exact).abs()[live] / exact[live]).max()) if bool(live.any()) else 0.0
    if err <= DIAG_TOL:
        return h
    FAST_GRAM_FAILED.append(err)
    log.warning("fast X^T X (TF32) is off by %.2e (relative, on its diagonal) on this device; using float32 "
                "GEMMs from now on", err)
    return None


@dataclass
class Routed:
    """The routing of the tokens handed to one expert (rows of its 2-D input, in order): their routing weights
    (the router's normalised top-k values), their positions in their sequences, and the sequence length (None when
    the experts module saw flattened tokens of unknown sequence structure)."""

    weights: torch.Tensor
    positions: torch.Tensor
    seq_len: int | None


@dataclass
class LayerStats:
    needs: frozenset[str]
    d_in: int
    count: int = 0  # tokens seen
    samples: int = 0  # sequences seen
    sq_sum: torch.Tensor | None = None
    sum: torch.Tensor | None = None
    hessian: torch.Tensor | None = None
    last_tokens: list[torch.Tensor] = field(default_factory=list)
    max_last_tokens: int = 256
    tokens_per_sample: int = 1
    all_reduced: bool = False  # summed over data-parallel ranks already (prunekit.distributed)
    gate_sum: float = 0.0  # experts: sum of the routing weights of the tokens seen (see Routed)
    # results derived from these statistics by a handler and reused by the next layer that shares them
    # (SparseGPT's factor of H^-1); the engine empties it once the last of those layers is handled
    cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        if int(self.tokens_per_sample) < 1:
            raise ValueError(f"tokens_per_sample must be >= 1, got {self.tokens_per_sample}")
        unknown = set(self.needs) - KNOWN_STATS
        if unknown:
            raise ValueError(f"unknown statistics {sorted(unknown)}; known: {sorted(KNOWN_STATS)}")

    @torch.no_grad()
    def update(self, x: torch.Tensor, routed: Routed | None = None) -> None:
        """x: the layer input, shape (..., seq, d_in) or (..., d_in); ``routed``: for an expert, the routing of
        the rows of its 2-D input."""
        if routed is not None:
            self._update_routed(x, routed)
            return
        if x.dim() >= 3 and "last_tokens" in self.needs:
            room = self.max_last_tokens * self.tokens_per_sample - sum(t.shape[0] for t in self.last_tokens)
            if room > 0:
                self.last_tokens.append(x[..., self.token_positions(x.shape[-2]), :].reshape(-1, self.d_in)[:room]
                                        .float().cpu())
        if x.dim() >= 3:
            self.samples += x[..., 0, 0].numel()
        else:
            self.samples += 1
        self._accumulate(x.reshape(-1, self.d_in))

    def _update_routed(self, x: torch.Tensor, routed: Routed) -> None:
        """An expert's routed tokens: one sample per call; the tokens at the kept positions of their sequences
        (the last one, or ``tokens_per_sample`` of them) are its ``last_tokens``."""
        if "last_tokens" in self.needs and routed.seq_len:
            room = self.max_last_tokens * self.tokens_per_sample - sum(t.shape[0] for t in self.last_tokens)
            keep = torch.isin(routed.positions, torch.tensor(self.token_positions(routed.seq_len),
                                                             device=routed.positions.device))
            if room > 0 and bool(keep.any()):
                self.last_tokens.append(x[keep][:room].float().cpu())
        self.samples += 1
        self.gate_sum += float(routed.weights.double().sum())
        self._accumulate(x)

    def _accumulate(self, x: torch.Tensor) -> None:
        """Token count, feature sums and X^T X of x (tokens, d_in)."""
        self.count += x.shape[0]
        if "sq_sum" in self.needs or "sum" in self.needs:
            # in row chunks: float32 temporaries of at most SUM_CHUNK_ELEMENTS (not two float32 copies of x:
            # 2 x 11.5 GB for the down_proj input of 128 x 2048 LLaMA-7B tokens); on a CPU chunks of
            # CPU_SUM_ROWS rows: ``sum(0, dtype=float64)`` first copies its input to float64, and a small
            # chunk's copy stays in cache (10x faster than one chunk on a CPU, the same values to 6e-16)
            parts = x.split(CPU_SUM_ROWS) if x.device.type == "cpu" else row_chunks(x)
            for part in parts:
                xf = part.float()
                if "sq_sum" in self.needs:
                    s = (xf * xf).sum(0, dtype=torch.float64)
                    self.sq_sum = s if self.sq_sum is None else self.sq_sum.add_(s)
                if "sum" in self.needs:
                    s = xf.sum(0, dtype=torch.float64)
                    self.sum = s if self.sum is None else self.sum.add_(s)
        if "hessian" in self.needs:
            h = gram(x)
            self.hessian = h if self.hessian is None else self.hessian.add_(h)

    def token_positions(self, seq: int) -> list[int]:
        """Positions kept for ``last_tokens`` in a sequence of ``seq`` tokens: the last one, then every
        ``seq // k``-th before it (k = ``tokens_per_sample``, at most ``seq``), in increasing order."""
        k = min(int(self.tokens_per_sample), seq)
        return sorted(seq - 1 - (j * seq) // k for j in range(k))

    # ---- derived quantities -------------------------------------------------------------------
    def col_norm(self) -> torch.Tensor:
        """||X_j||_2 over all calibration tokens (Wanda's feature norm), float32."""
        return self.sq_sum.sqrt().float()

    def mean(self) -> torch.Tensor:
        return (self.sum / max(self.count, 1)).float()

    def var(self) -> torch.Tensor:
        """Unbiased variance of each input feature over calibration tokens."""
        n = self.count
        if n < 2:
            return torch.zeros(self.d_in, dtype=torch.float32, device=self.sq_sum.device)
        mu = self.sum / n
        return ((self.sq_sum - n * mu * mu) / (n - 1)).clamp_min(0).float()

    def hessian_mean(self) -> torch.Tensor:
        """H = (2/n) sum x x^T, the SparseGPT convention."""
        return self.hessian * (2.0 / max(self.count, 1))

    def last_token_inputs(self) -> torch.Tensor:
        return torch.cat(self.last_tokens, 0) if self.last_tokens else torch.zeros(0, self.d_in)

    def merge_(self, other: "LayerStats") -> "LayerStats":
        """Add another accumulator's sums (used by distributed calibration)."""
        self.count += other.count
        self.samples += other.samples
        self.gate_sum += other.gate_sum
        for k in ("sq_sum", "sum", "hessian"):
            a, b = getattr(self, k), getattr(other, k)
            if b is not None:
                setattr(self, k, b.clone() if a is None else a + b.to(a.device))
        self.last_tokens.extend(other.last_tokens)
        return self
