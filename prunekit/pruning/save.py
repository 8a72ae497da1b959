"""Saved outputs: packed masks, and the probe that ties a saved folder to the model that was evaluated.

The probe: a few hundred tokens (the first calibration window's start, or seeded random tokens when the run
had no calibration data) and the mean next-token NLL of the pruned model on them, computed in memory before
saving and stored in ``report.json``. Saving reloads the written folder with a plain
``AutoModelForCausalLM.from_pretrained`` and refuses to put it in place unless the NLL matches; ``prunekit
verify`` recomputes it from the folder as a user would load it (:mod:`prunekit.pruning.verify`).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..core.errors import PrunekitError
from ..core.families import block_linears, model_context_length, weight_view
from ..core.loading import from_pretrained_checked
from ..core.masks import unpack_mask
from ..core.nll import nll_of_windows
from ..core.offload import on_device

PROBE_TOKENS = 256
# |NLL difference| allowed between the in-memory model and its reload, relative to max(1, NLL): float noise only
# (a reload on another device or with other kernels reorders sums; half precision rounds more)
PROBE_RTOL = {"float32": 1e-4, "float64": 1e-6}
PROBE_RTOL_HALF = 2e-2


def save_masks(path: Path, masks: dict[str, torch.Tensor], shapes: dict[str, list[int]]) -> None:
    """Bit-packed masks (1 = pruned, row-major, numpy.packbits order), shapes in the metadata."""
    meta = {"format": "prunekit-packed-mask-v1", "convention": "bit 1 = weight pruned; unpack with numpy.unpackbits",
            "shapes": json.dumps(shapes)}
    save_file({k: v.contiguous() for k, v in masks.items()}, str(path), metadata=meta)


def load_masks(path: str | Path) -> dict[str, torch.Tensor]:
    try:
        out = {}
        with safe_open(str(path), "pt") as f:
            shapes = json.loads((f.metadata() or {})["shapes"])
            for k in f.keys():
                out[k] = unpack_mask(f.get_tensor(k), shapes[k])
        return out
    except Exception as e:  # a truncated or foreign file: SafetensorError, KeyError, JSON or unpacking errors
        raise PrunekitError(f"{path} is not a readable prunekit mask file ({type(e).__name__}: "
                            f"{' '.join(str(e).split())[:200]})") from None


def sparsity_from_files(folder: Path, layer_names: list[str], reloaded=None) -> dict:
    """Count zeros of the pruned layers' weights as saved in the safetensors files. A layer whose weight is not one
    tensor of the files (an expert matrix: a slice of a fused parameter, which transformers saves in the checkpoint
    layout of its family, e.g. Mixtral's ``experts.3.w1``) is counted from ``reloaded``, the folder as plain
    ``from_pretrained`` loaded it (the saved tensors put back in place)."""
    wanted = {f"{n}.weight": n for n in layer_names}
    per_layer = {}
    for f in sorted(folder.glob("*.safetensors")):
        if f.name == "masks.safetensors":
            continue
        with safe_open(str(f), "pt") as st:
            for key in st.keys():
                name = wanted.get(key)
                if name is None:
                    continue
                t = st.get_tensor(key)
                per_layer[name] = {"zeros": int((t == 0).sum()), "numel": t.numel()}
    missing = [n for n in layer_names if n not in per_layer]
    if missing and reloaded is not None:
        layers = {n: m for d in block_linears(reloaded) for n, m in d.items()}
        for n in missing:
            if n in layers:
                t = weight_view(layers[n])
                per_layer[n] = {"zeros": int((t == 0).sum()), "numel": t.numel()}
        missing = [n for n in layer_names if n not in per_layer]
    if missing:
        raise PrunekitError(f"saved model lacks pruned weights, e.g. {missing[:3]}")
    zeros = sum(v["zeros"] for v in per_layer.values())
    numel = sum(v["numel"] for v in per_layer.values())
    return {"overall_sparsity": zeros / numel, "layers": {k: v["zeros"] / v["numel"] for k, v in per_layer.items()}}


# ----------------------------------------------------------------------------------------------- probe

def probe_ids(model, calib_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, str]:
    """(1-D token ids, where they come from) for the reload probe."""
    n = min(PROBE_TOKENS, model_context_length(model) or PROBE_TOKENS)
    if calib_ids is not None and calib_ids.numel():
        return calib_ids[0, :n].clone().cpu(), "calibration window 0"
    g = torch.Generator().manual_seed(0)
    vocab = model.get_input_embeddings().num_embeddings
    return torch.randint(0, vocab, (n,), generator=g), "random tokens (seed 0)"


def probe_nll(model, ids: torch.Tensor, device=None) -> float:
    """Mean next-token NLL of ``model`` on one window ``ids`` (float64), where the model is (or on ``device``)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    with on_device(model, device):
        return float(nll_of_windows(model, torch.as_tensor(ids).reshape(1, -1), device, desc="reload probe")[0])


def probe_tolerance(dtype: str) -> float:
    return PROBE_RTOL.get(dtype, PROBE_RTOL_HALF)


def probe_matches(a: float, b: float, dtype: str) -> bool:
    return math.isfinite(a) and math.isfinite(b) and abs(a - b) <= probe_tolerance(dtype) * max(1.0, abs(a))


def reload_saved(folder, dtype="auto"):
    """The saved folder as a user loads it: plain ``AutoModelForCausalLM.from_pretrained``; a folder with missing
    weights, or with tensors the architecture ignores (dropped by that reload), is an error."""
    model = from_pretrained_checked(str(folder), dtype, unexpected="error")
    model.eval()
    return model
