"""``prunekit verify``: a saved folder checked as a user would load it, against its own report."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..core.errors import PrunekitError
from ..core.families import block_linears, weight_view
from .compressed import is_compressed, load_pretrained
from .save import load_masks, probe_matches, probe_nll


def _read_report(folder: Path) -> dict:
    try:
        return json.loads((folder / "report.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PrunekitError(f"cannot read {folder / 'report.json'} ({type(e).__name__})") from None


def verify_saved(folder: str | Path, device: str = "cpu") -> dict:
    """Check a saved folder as a user would load it: reload it (plain ``from_pretrained``, or the compressed format's
    exact rebuild); every layer that
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
        raise PrunekitError("masks.safetensors does not match report.json: "
                            + (f"{len(lost)} listed layer(s) without a mask (e.g. {lost[0]})" if lost else "")
                            + ("; " if lost and extra else "")
                            + (f"{len(extra)} mask(s) of unlisted layers (e.g. {extra[0]})" if extra else ""))
    model = load_pretrained(folder)
    mods = {n: m for d in block_linears(model) for n, m in d.items()}  # layers and expert matrices, by name
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
    out = {"format": "compressed" if is_compressed(folder) else "dense", "layers": len(listed), "overall_sparsity": sparsity, "mask_sparsity": masked / numel if numel else 0.0,
           "target": report["target_sparsity"], "row_min": row_min, "row_max": row_max, "probe": None}
    probe = report.get("probe")
    if probe:
        nll = probe_nll(model, torch.tensor(probe["ids"]), device)
        if not probe_matches(probe["nll"], nll, probe["dtype"]):
            raise PrunekitError(f"the reloaded model is not the model that was evaluated: probe NLL {nll:.6f} vs "
                                f"{probe['nll']:.6f} recorded at prune time ({len(probe['ids'])} tokens)")
        out["probe"] = {"nll": nll, "recorded": probe["nll"], "tokens": len(probe["ids"])}
    return out
