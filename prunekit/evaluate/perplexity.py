"""Paper-convention perplexity: text tokenised once, non-overlapping windows of seqlen, remainder
dropped, PPL = exp(mean over windows of the mean token NLL). This is *token* perplexity as in the
Wanda/SparseGPT papers, not lm-eval's word perplexity."""
from __future__ import annotations

import math
import time

import torch

from ..core.data import eval_token_ids
from ..core.errors import PrunekitError
from ..core.nll import window_nll


def perplexity(model, tokenizer, source: str = "wikitext2", seqlen: int = 2048, max_windows: int | None = None,
               device=None, batch_size: int = 1, ids: torch.Tensor | None = None, offload: bool | None = None) -> dict:
    """Token perplexity of ``source`` (or the token ``ids``) in windows of ``seqlen``, the first
    ``max_windows`` of them. ``offload``: run block by block (for models larger than the device); default: the
    offload policy (:func:`prunekit.core.offload.fits_on_device`)."""
    device = device or next(model.parameters()).device
    t0 = time.time()
    if ids is None:
        ids = eval_token_ids(tokenizer, source, seqlen)
    n = ids.numel() // seqlen
    if n == 0:
        raise PrunekitError(f"evaluation text '{source}' has {ids.numel()} tokens, fewer than seqlen {seqlen}")
    total = n
    if max_windows:
        n = min(n, max_windows)
    windows = ids[: n * seqlen].view(n, seqlen)
    nll, offload = window_nll(model, windows, device, batch_size, f"ppl {source}", offload)
    return {
        "dataset": source,
        "ppl": float(math.exp(nll.mean().item())),
        "kind": "token perplexity, non-overlapping windows (paper convention)",
        "seqlen": seqlen,
        "windows": n,
        "windows_available": total,
        "tokens": n * seqlen,
        "seconds": round(time.time() - t0, 2),
        "offload": bool(offload),
    }
