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
from ..offload import on_device


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


@torch.no_grad()
def nll_of_windows_blockwise(model, windows: torch.Tensor, device, batch_size: int = 1, desc: str = "ppl") -> torch.Tensor:
    """Same as :func:`nll_of_windows` for models larger than the device: blocks run one at a time on the
    device (hidden states kept on CPU), then the model's own head (final norm, lm_head) runs on the
    device with every block replaced by a pass-through, the last one returning the computed states."""
    from ..calibrate import capture_inputs, non_blocks_on, probe_block_kwargs
    from ..models.families import get_blocks

    device = torch.device(device)
    blocks = get_blocks(model)
    inputs = capture_inputs(model, blocks, windows, batch_size, device, torch.device("cpu"))
    probe_block_kwargs(model, blocks, inputs, windows, device, torch.device("cpu"))
    template = None
    for b, block in enumerate(tqdm(blocks, desc=f"{desc} (block by block)", unit="block", leave=False)):
        inputs.block_index = b
        with on_device(block, device):
            for i in range(inputs.n_batches):
                out = inputs.call(block, i, device, raw=True)
                if template is None:
                    template = out
                h = out[0] if isinstance(out, (tuple, list)) else out
                inputs.hidden[i] = h.to("cpu")
    state = {"i": 0}

    def passthrough(last):
        def forward(*args, **kwargs):
            h = inputs.hidden[state["i"]].to(device) if last else (args[0] if args else kwargs["hidden_states"])
            if isinstance(template, (tuple, list)):
                return (h,) + tuple(template[1:])
            return h
        return forward

    for j, block in enumerate(blocks):
        block.forward = passthrough(j == len(blocks) - 1)
    out = []
    try:
        with non_blocks_on(model, blocks, device):
            for i, s in enumerate(range(0, windows.shape[0], batch_size)):
                state["i"] = i
                x = windows[s:s + batch_size].to(device)
                logits = model(x, use_cache=False).logits[:, :-1, :].float()
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="none")
                out.append(loss.view(x.shape[0], -1).mean(1).double().cpu())
    finally:
        for block in blocks:
            del block.forward  # back to the class's forward
    return torch.cat(out)


def _needs_offload(model, device) -> bool:
    device = torch.device(device)
    if device.type != "cuda":
        return False
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    free, _ = torch.cuda.mem_get_info(device)
    return size > 0.8 * free


def perplexity(model, tokenizer, source: str = "wikitext2", seqlen: int = 2048, max_windows: int | None = None,
               device=None, batch_size: int = 1, ids: torch.Tensor | None = None, offload: bool | None = None) -> dict:
    """``offload``: run block by block (for models larger than the device); default: when the model
    would not fit in 80% of the free GPU memory."""
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
    if offload is None:
        offload = _needs_offload(model, device)
    if offload:
        nll = nll_of_windows_blockwise(model, windows, device, batch_size, desc=f"ppl {source}")
    else:
        with on_device(model, device):
            nll = nll_of_windows(model, windows, device, batch_size, desc=f"ppl {source}")
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
