"""Saved outputs: packed masks, the probe that ties a saved folder to the model that was evaluated, and
``verify``.

The probe: a few hundred tokens (the first calibration window's start, or seeded random tokens when the run
had no calibration data) and the mean next-token NLL of the pruned model on them, computed in memory before
saving and stored in ``report.json``. Saving reloads the written folder with a plain
``AutoModelForCausalLM.from_pretrained`` and refuses to put it in place unless the NLL matches; ``prunekit
verify`` recomputes it from the folder as a user would load it.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..core.errors import PrunekitError
from ..core.families import model_context_length, weight_view
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


def sparsity_from_files(folder: Path, layer_names: list[str]) -> dict:
    """Count zeros of the pruned layers' weights as saved in the safetensors files."""
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


# ----------------------------------------------------------------------------------------------- verify

def _read_report(folder: Path) -> dict:
    try:
        return json.loads((folder / "report.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PrunekitError(f"cannot read {folder / 'report.json'} ({type(e).__name__})") from None


def verify_saved(folder: str | Path, device: str = "cpu") -> dict:
    """Check a saved folder as a user would load it: reload with plain ``from_pretrained``; every layer that
    ``report.json`` lists has a mask and every mask a layer; every masked weight is an exact zero; the sparsity
    counted from the reloaded weights equals the report's; the probe NLL recomputed from the reload matches the
    one recorded from the model that was evaluated."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PrunekitError(f"{folder} is not a folder")
    for f in ("masks.safetensors", "report.json"):
        if not (folder / f).is_file():
            raise PrunekitError(f"{folder} is not a prunekit output folder (no {f})")
    report = _read_report(folder)
    listed = {l["name"]: l for l in report.get("layers", [])}
    masks = load_masks(folder / "masks.safetensors")
    if set(masks) != set(listed):
        lost, extra = sorted(set(listed) - set(masks)), sorted(set(masks) - set(listed))
        raise PrunekitError(f"masks.safetensors does not match report.json: "
                            + (f"{len(lost)} listed layer(s) without a mask (e.g. {lost[0]})" if lost else "")
                            + ("; " if lost and extra else "")
                            + (f"{len(extra)} mask(s) of unlisted layers (e.g. {extra[0]})" if extra else ""))
    model = reload_saved(folder)
    mods = dict(model.named_modules())
    zeros = numel = masked = 0
    row_min, row_max = 1.0, 0.0
    for name, rec in listed.items():
        if name not in mods:
            raise PrunekitError(f"{name} is listed in report.json but the reloaded model has no such layer")
        W = weight_view(mods[name])
        mask = masks[name]
        if W.shape != mask.shape or list(W.shape) != list(rec["shape"]):
            raise PrunekitError(f"{name}: weight shape {tuple(W.shape)}, mask {tuple(mask.shape)}, report "
                                f"{tuple(rec['shape'])} differ")
        bad = int((W[mask] != 0).sum())
        if bad:
            raise PrunekitError(f"{name}: {bad} masked weights are not zero")
        rows = mask.float().mean(1)
        row_min, row_max = min(row_min, float(rows.min())), max(row_max, float(rows.max()))
        zeros += int((W == 0).sum())
        masked += int(mask.sum())
        numel += W.numel()
    sparsity = zeros / numel if numel else 0.0
    stated = report.get("saved", {}).get("overall_sparsity", report.get("overall_sparsity"))
    if stated is None or abs(sparsity - stated) > 0.5 / max(numel, 1):
        raise PrunekitError(f"the weights' sparsity over the {len(listed)} layers of report.json is {sparsity:.6f}, "
                            f"the report says {stated}")
    out = {"layers": len(listed), "overall_sparsity": sparsity, "mask_sparsity": masked / numel if numel else 0.0,
           "target": report["target_sparsity"], "row_min": row_min, "row_max": row_max, "probe": None}
    probe = report.get("probe")
    if probe:
        nll = probe_nll(model, torch.tensor(probe["ids"]), device)
        if not probe_matches(probe["nll"], nll, probe["dtype"]):
            raise PrunekitError(f"the reloaded model is not the model that was evaluated: probe NLL {nll:.6f} vs "
                                f"{probe['nll']:.6f} recorded at prune time ({len(probe['ids'])} tokens)")
        out["probe"] = {"nll": nll, "recorded": probe["nll"], "tokens": len(probe["ids"])}
    return out
