"""Paper-convention perplexity: text tokenised once, non-overlapping windows of seqlen, remainder
dropped, PPL = exp(mean over windows of the mean token NLL). This is *token* perplexity as in the
Wanda/SparseGPT papers, not lm-eval's word perplexity."""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data import eval_token_ids
from ..errors import PrunekitError


@torch.no_grad()
def nll_of_windows(model, windows: torch.Tensor, device, batch_size: int = 1, desc: str = "ppl") -> torch.Tensor:
    """Mean next-token NLL of each window (shape: n_windows), float64."""
    out = []
    for s in tqdm(range(0, windows.shape[0], batch_size), desc=desc, unit="batch", leave=False):
        x = windows[s:s + batch_size].to(device)
        logits = model(x, use_cache=False).logits[:, :-1, :].float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="none")
        out.append(loss.view(x.shape[0], -1).mean(1).double().cpu())
    return torch.cat(out)


def perplexity(model, tokenizer, source: str = "wikitext2", seqlen: int = 2048, max_windows: int | None = None,
               device=None, batch_size: int = 1, ids: torch.Tensor | None = None) -> dict:
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
    orig = next(model.parameters()).device
    model.to(device)
    try:
        nll = nll_of_windows(model, windows, device, batch_size, desc=f"ppl {source}")
    finally:
        model.to(orig)
    return {
        "dataset": source,
        "ppl": float(math.exp(nll.mean().item())),
        "kind": "token perplexity, non-overlapping windows (paper convention)",
        "seqlen": seqlen,
        "windows": n,
        "windows_available": total,
        "tokens": n * seqlen,
        "seconds": round(time.time() - t0, 2),
    }
