"""KV-cache fake quantisation, for searches that allocate KV-cache bit-widths (TPE).

Forward hooks on the modules that produce keys and values (the architecture family says which and how:
:func:`prunekit.core.families.kv_modules`) replace their outputs by ``dequant(quant(x))``: per token and per head (groups of
``head_dim`` values), asymmetric min-max quantisation to b bits::

    scale = (max - min) / (2^b - 1);  q = clamp(round((x - min) / scale), 0, 2^b - 1);  x~ = q * scale + min

Keys are quantised *before* RoPE (the projection output); a real cache stores keys after RoPE, a
rotation, so the error is of the same size but not identical (documented approximation).

Memory: a quantised element costs ``b`` bits plus, per group of ``head_dim`` values, an fp16 scale and an fp16
minimum (``32 / head_dim`` bits per element); the fp16 cache costs 16 bits.
"""
from __future__ import annotations

import torch

from ..core.errors import PrunekitError
from ..core.families import attention_dims, get_blocks, kv_modules


def fake_quant(x: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Per-group (last dim split into groups of ``group``) asymmetric min-max fake quantisation."""
    if bits >= 16:
        return x
    shape = x.shape
    xf = x.float().reshape(*shape[:-1], shape[-1] // group, group)
    lo = xf.amin(-1, keepdim=True)
    hi = xf.amax(-1, keepdim=True)
    levels = 2 ** int(bits) - 1
    scale = (hi - lo) / levels
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = ((xf - lo) / safe).round().clamp(0, levels)
    out = torch.where(scale > 0, q * safe + lo, xf)
    return out.reshape(shape).to(x.dtype)


def kv_quant_hooks(model, bits: list[int]) -> list:
    """Install forward hooks fake-quantising keys and values of block b to ``bits[b]`` bits.
    Returns the hook handles (call ``.remove()`` on each)."""
    head_dim, kv_heads, heads = attention_dims(model)
    mods = kv_modules(model)
    if len(bits) != len(mods):
        raise PrunekitError(f"{len(bits)} KV bit-widths for {len(mods)} blocks")
    handles = []
    for b, found in enumerate(mods):
        nb = int(bits[b])
        for kind, m in found:
            if kind in ("k", "v"):
                hook = lambda mod, a, o, _b=nb: fake_quant(o, _b, head_dim)  # noqa: E731
            elif kind == "gpt2":
                def hook(mod, a, o, _b=nb):
                    d = o.shape[-1] // 3
                    return torch.cat([o[..., :d], fake_quant(o[..., d:], _b, head_dim)], -1)
            else:
                def hook(mod, a, o, _b=nb):
                    v = o.reshape(*o.shape[:-1], heads, 3, head_dim)
                    kvq = fake_quant(v[..., 1:, :], _b, head_dim)
                    return torch.cat([v[..., :1, :], kvq], -2).reshape(o.shape)
            handles.append(m.register_forward_hook(hook))
    return handles


def kv_memory_fraction(model, bits: list[int]) -> float:
    """KV-cache memory with these bit-widths / fp16 KV-cache memory (scales and minima included)."""
    head_dim, _, _ = attention_dims(model)
    overhead = 32.0 / head_dim
    return sum(min(16.0, b + overhead) if b < 16 else 16.0 for b in bits) / (16.0 * len(bits))


def kv_cache_bytes_per_token(model, bits: list[int] | None) -> float:
    head_dim, kv_heads, _ = attention_dims(model)
    per_layer = 2 * kv_heads * head_dim  # keys and values
    if bits is None:
        return per_layer * len(get_blocks(model)) * 2.0
    return per_layer * 2.0 * len(bits) * kv_memory_fraction(model, bits)
