"""Atomic output folders: everything is written into a temporary sibling folder that is renamed
into place at the end, so an interrupted run leaves no half-written output."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import PrunekitError
from .masks import unpack_mask


def check_out_dir(out: str | Path, overwrite: bool) -> Path:
    out = Path(out)
    if out.exists() and not overwrite:
        raise PrunekitError(f"output folder {out} exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise PrunekitError(f"output path {out} exists and is not a folder")
    return out


@contextlib.contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False):
    """Yield a temporary folder; on success it replaces ``out``, on error it is removed."""
    out = check_out_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_masks(path: Path, masks: dict[str, torch.Tensor], shapes: dict[str, list[int]]) -> None:
    """Bit-packed masks (1 = pruned, row-major, numpy.packbits order), shapes in the metadata."""
    meta = {"format": "prunekit-packed-mask-v1", "convention": "bit 1 = weight pruned; unpack with numpy.unpackbits",
            "shapes": json.dumps(shapes)}
    save_file({k: v.contiguous() for k, v in masks.items()}, str(path), metadata=meta)


def load_masks(path: str | Path) -> dict[str, torch.Tensor]:
    out = {}
    with safe_open(str(path), "pt") as f:
        shapes = json.loads(f.metadata()["shapes"])
        for k in f.keys():
            out[k] = unpack_mask(f.get_tensor(k), shapes[k])
    return out


def sparsity_from_files(folder: Path, layer_names: list[str], transposed: set[str] = frozenset()) -> dict:
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


def verify_saved(folder: str | Path) -> dict:
    """Reload a saved folder with AutoModelForCausalLM and check that every masked weight is zero."""
    from transformers import AutoModelForCausalLM

    from .models.families import weight_view

    folder = Path(folder)
    if not (folder / "masks.safetensors").is_file():
        raise PrunekitError(f"{folder} is not a prunekit output folder (no masks.safetensors)")
    model = AutoModelForCausalLM.from_pretrained(folder)
    mods = dict(model.named_modules())
    masks = load_masks(folder / "masks.safetensors")
    report = json.loads((folder / "report.json").read_text())
    zeros = numel = 0
    row_min, row_max = 1.0, 0.0
    for name, mask in masks.items():
        W = weight_view(mods[name])
        if W.shape != mask.shape:
            raise PrunekitError(f"{name}: mask shape {tuple(mask.shape)} != weight shape {tuple(W.shape)}")
        if bool((W[mask] != 0).any()):
            raise PrunekitError(f"{name}: {(W[mask] != 0).sum()} masked weights are not zero")
        rows = mask.float().mean(1)
        row_min, row_max = min(row_min, float(rows.min())), max(row_max, float(rows.max()))
        zeros += int(mask.sum())
        numel += mask.numel()
    return {"layers": len(masks), "overall_sparsity": zeros / numel, "target": report["target_sparsity"],
            "row_min": row_min, "row_max": row_max}
