"""Next-token negative log-likelihood of token windows: the one loss every evaluation uses.

``nll_of_windows`` runs the whole model; ``nll_of_windows_blockwise`` runs it block by block (the block walker,
hidden states on the CPU) for models larger than the device, then the model's own head; ``window_nll`` picks
one by the offload policy. Each returns the mean token NLL of every window (float64, CPU), so perplexity is
``exp(mean)`` over windows of equal length.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .blocks import non_blocks_on, walk_blocks
from .families import get_blocks
from .offload import fits_on_device, on_device


def _window_means(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL of each window of a batch (logits of x), float64 on the CPU.

    One window at a time: the only temporary is one window's log-softmax (seq x vocab, float32). Flattening the
    batch first copied its logits (the ``[:, :-1]`` slice is not contiguous) and took the log-softmax of all of them:
    two more batch-sized tensors, 2.3 GiB for 4 x 512 tokens of Qwen2.5's 152k vocabulary. Each token's loss is
    computed exactly as before, so the result is the same to the bit."""
    losses = torch.stack([F.cross_entropy(logits[i, :-1].float(), x[i, 1:], reduction="none")
                          for i in range(x.shape[0])])
    return losses.mean(1).double().cpu()


@torch.no_grad()
def nll_of_windows(model, windows: torch.Tensor, device, batch_size: int = 1, desc: str = "ppl") -> torch.Tensor:
    """Mean next-token NLL of each window (shape: n_windows), float64; the model must be on ``device``."""
    out = []
    for s in tqdm(range(0, windows.shape[0], batch_size), desc=desc, unit="batch", leave=False):
        x = windows[s:s + batch_size].to(device)
        out.append(_window_means(model(x, use_cache=False).logits, x))
    return torch.cat(out)


@torch.no_grad()
def nll_of_windows_blockwise(model, windows: torch.Tensor, device, batch_size: int = 1,
                             desc: str = "ppl") -> torch.Tensor:
    """Same as :func:`nll_of_windows` for models larger than the device: the blocks run one at a time on the
    device (hidden states kept on the CPU), then the model's own head (final norm, lm_head) runs on the device
    with every block replaced by a pass-through, the last one returning the computed states."""
    device = torch.device(device)
    template = []

    def step(b, block, inputs):
        for i in range(inputs.n_batches):
            out = inputs.call(block, i, device, raw=True)
            if not template:
                template.append(out)
            inputs.store(i, out[0] if isinstance(out, (tuple, list)) else out)

    inputs = walk_blocks(model, windows, device, step, batch_size, offload=True, desc=f"{desc} (block by block)")
    blocks = get_blocks(model)
    state = {"i": 0}

    def passthrough(last):
        def forward(*args, **kwargs):
            h = inputs.hidden[state["i"]].to(device) if last else (args[0] if args else kwargs["hidden_states"])
            if isinstance(template[0], (tuple, list)):
                return (h,) + tuple(template[0][1:])
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
                out.append(_window_means(model(x, use_cache=False).logits, x))
    finally:
        for block in blocks:
            del block.forward  # back to the class's forward
    return torch.cat(out)


def window_nll(model, windows: torch.Tensor, device, batch_size: int = 1, desc: str = "ppl",
               offload: bool | None = None) -> tuple[torch.Tensor, bool]:
    """(:func:`nll_of_windows` on ``device``, or the block-by-block version when the model does not fit there or
    ``offload`` says so; whether it ran block by block)."""
    if offload is None:
        offload = not fits_on_device(model, device)
    if offload:
        return nll_of_windows_blockwise(model, windows, device, batch_size, desc), True
    with on_device(model, device):
        return nll_of_windows(model, windows, device, batch_size, desc), False
