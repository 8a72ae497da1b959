"""The compressed output format: each pruned weight stored as its kept values plus its packed mask.

A dense pruned folder stores every zero. Here each pruned layer's weight ``W`` (shape (out, in), dtype d)
becomes two tensors in the same safetensors file: ``NAME.weight.kept``, the values of the positions the mask
keeps, row-major, in d (exact zeros among them stay), and ``NAME.weight.pruned``, the mask packed 8 positions a
byte (numpy ``packbits`` order, bit 1 = pruned). Every other tensor is stored as it is. At sparsity s the layer
takes ``(1 - s) * bytes(d) + 1/8`` bytes per weight: 0.5625 of bf16 at 50%, 0.3625 at 70%.

The weight files are named ``*.compressed.safetensors``, so a plain ``from_pretrained`` on the folder finds no
weights and fails instead of initialising a model at random; :func:`load_pretrained` rebuilds the exact dense
model (bit-identical to the dense format's weights), ``prunekit decompress`` writes a plain HF folder.

Expert matrices are slices of fused parameters, which transformers saves in its family's checkpoint layout (e.g.
Mixtral's ``experts.3.w1.weight``): their masks are assembled into masks of the fused parameters and mapped to the
saved tensors by transformers' own ``revert_weight_conversion`` (the mapping ``save_pretrained`` applies), and such
a folder is rebuilt through ``from_pretrained`` of the decompressed tensors, which applies the conversion back.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.sparse import to_sparse_semi_structured
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.core_model_loading import revert_weight_conversion

from ..core.errors import PrunekitError
from ..core.families import block_linears, is_expert
from ..core.loading import from_pretrained_checked
from ..core.masks import pack_mask, unpack_mask
from .save import load_masks

FORMAT = "prunekit-compressed-v1"
SUFFIX = ".compressed.safetensors"
KEPT, PRUNED = ".kept", ".pruned"


def is_compressed(folder) -> bool:
    return any(Path(folder).glob(f"*{SUFFIX}"))


def _weight_files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.glob("*.safetensors") if f.name != "masks.safetensors" and SUFFIX not in f.name)


def compress_file(src: Path, dst: Path, masks: dict[str, torch.Tensor]) -> dict:
    """One dense safetensors file -> its compressed twin; ``masks``: weight key -> bool mask (True = pruned).
    Returns byte counts of the pruned weights, dense and compressed."""
    tensors, shapes, dense_bytes, packed_bytes = {}, {}, 0, 0
    with safe_open(str(src), "pt") as f:
        meta = f.metadata() or {}
        for key in f.keys():
            t = f.get_tensor(key)
            mask = masks.get(key)
            if mask is None:
                tensors[key] = t
                continue
            if tuple(mask.shape) != tuple(t.shape):
                raise PrunekitError(f"{key}: mask shape {tuple(mask.shape)} != weight shape {tuple(t.shape)}")
            tensors[key + KEPT] = t[~mask].contiguous()
            tensors[key + PRUNED] = pack_mask(mask)
            shapes[key] = list(t.shape)
            dense_bytes += t.numel() * t.element_size()
            packed_bytes += tensors[key + KEPT].numel() * t.element_size() + tensors[key + PRUNED].numel()
    save_file(tensors, str(dst), metadata={**meta, "prunekit_format": FORMAT, "shapes": json.dumps(shapes)})
    return {"pruned_dense_bytes": dense_bytes, "pruned_compressed_bytes": packed_bytes}


def compress_folder(folder: Path, masks: dict[str, torch.Tensor] | None = None) -> dict:
    """Replace the dense weight files of a saved prunekit folder by compressed ones, in place (the caller works on a
    temporary folder). ``masks``: layer name -> bool mask; default: the folder's ``masks.safetensors``."""
    folder = Path(folder)
    masks = load_masks(folder / "masks.safetensors") if masks is None else masks
    files = _weight_files(folder)
    if not files:
        raise PrunekitError(f"{folder} has no dense weight files to compress")
    keys = set()
    for f in files:
        with safe_open(str(f), "pt") as st:
            keys |= set(st.keys())
    by_key = {f"{name}.weight": m.bool() for name, m in masks.items() if f"{name}.weight" in keys}
    by_key.update(_fused_masks(folder, {n: m for n, m in masks.items() if f"{n}.weight" not in keys}))
    totals = {"pruned_dense_bytes": 0, "pruned_compressed_bytes": 0}
    seen = set()
    for f in files:
        with safe_open(str(f), "pt") as st:
            seen |= set(st.keys()) & set(by_key)
        counts = compress_file(f, f.with_name(f.name.removesuffix(".safetensors") + SUFFIX), by_key)
        totals = {k: totals[k] + counts[k] for k in totals}
        f.unlink()
    missing = sorted(set(by_key) - seen)
    if missing:
        raise PrunekitError(f"{len(missing)} masked weight(s) not found in the weight files, e.g. {missing[0]}")
    index = folder / "model.safetensors.index.json"
    if index.exists():  # a sharded model: the index names the new files
        data = json.loads(index.read_text())
        data["weight_map"] = {k: v.removesuffix(".safetensors") + SUFFIX for k, v in data["weight_map"].items()}
        index.rename(folder / "model.compressed.safetensors.index.json")
        (folder / "model.compressed.safetensors.index.json").write_text(json.dumps(data, indent=2))
    return totals


def _fused_masks(folder: Path, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Masks of expert matrices (name -> mask) as masks of the tensors the folder saves: assembled per fused
    parameter on a meta-device model of the folder's config, then mapped by ``revert_weight_conversion``. Names that
    are not expert matrices are kept (and reported missing by the caller)."""
    if not masks:
        return {}
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    layers = {n: m for d in block_linears(meta) for n, m in d.items()}
    pnames = {id(p): n for n, p in meta.named_parameters()}
    fused, rest = {}, {}
    for name, mask in masks.items():
        m = layers.get(name)
        if not is_expert(m):
            rest[f"{name}.weight"] = mask.bool()
            continue
        t = fused.setdefault(pnames[id(m.parameter)], torch.zeros(m.parameter.shape, dtype=torch.bool))
        m.group.view(m.expert, m.proj, t).copy_(mask.bool())
    return {**revert_weight_conversion(meta, fused), **rest}


def decompressed_state(folder) -> dict[str, torch.Tensor]:
    """Every tensor of a compressed folder, the pruned weights rebuilt dense (exact zeros where pruned)."""
    state = {}
    for f in sorted(Path(folder).glob(f"*{SUFFIX}")):
        with safe_open(str(f), "pt") as st:
            meta = st.metadata() or {}
            if meta.get("prunekit_format") != FORMAT:
                raise PrunekitError(f"{f} is not a prunekit compressed weight file")
            shapes = json.loads(meta["shapes"])
            keys = set(st.keys())
            for key in keys:
                if key.endswith(PRUNED):
                    continue
                if key.endswith(KEPT):
                    base = key[: -len(KEPT)]
                    kept = st.get_tensor(key)
                    mask = unpack_mask(st.get_tensor(base + PRUNED), shapes[base])
                    W = torch.zeros(shapes[base], dtype=kept.dtype)
                    W[~mask] = kept
                    state[base] = W
                else:
                    state[key] = st.get_tensor(key)
    if not state:
        raise PrunekitError(f"{folder} holds no compressed weight files (*{SUFFIX})")
    return state


def load_pretrained(folder, dtype="auto", sparse_kernels: bool = False):
    """The model saved in ``folder``, dense or compressed, as a user would use it: a dense folder through plain
    ``from_pretrained`` (a partial model, or tensors the architecture would drop, are errors); a compressed one
    rebuilt exactly from its kept values and masks. ``sparse_kernels``: swap 2:4-sparse linears to PyTorch's
    semi-structured sparse tensors (CUDA, fp16/bf16 only); the model then comes back on the GPU, since those
    tensors cannot be moved afterwards. Measured on an H200 with torch 2.11 (bench/results/sparse24.md) this is
    slower than dense (prefill 0.34-0.41x, decode 0.15x): use it to check the kernels on your GPU, not for speed."""
    folder = Path(folder)
    if not is_compressed(folder):
        model = from_pretrained_checked(str(folder), dtype, unexpected="error")
    else:
        config = AutoConfig.from_pretrained(folder)
        state = decompressed_state(folder)
        model = AutoModelForCausalLM.from_config(config, dtype=_saved_dtype(config, state, dtype))
        if set(state) - set(model.state_dict()):  # a checkpoint layout transformers converts on load (fused experts)
            del model
            model = _load_converted(folder, state, dtype)
        else:
            _load_state(model, state, folder)
    model.eval()
    if sparse_kernels:
        to_semi_structured(model)
    return model


def _load_state(model, state: dict, folder: Path) -> None:
    """The decompressed tensors into ``model`` (tied weights tied again); a missing or unknown tensor is an error."""
    result = model.load_state_dict(state, strict=False)
    model.tie_weights()
    loaded = {p.data_ptr() for n, p in model.named_parameters() if n in state}
    missing = [k for k in result.missing_keys
               if k in dict(model.named_parameters()) and model.get_parameter(k).data_ptr() not in loaded]
    if missing or result.unexpected_keys:
        raise PrunekitError(f"{folder}: the compressed weights do not match the config (missing {missing[:2]}, "
                            f"unexpected {result.unexpected_keys[:2]})")


def _load_converted(folder: Path, state: dict, dtype):
    """The decompressed tensors written to a temporary folder with the config and loaded by ``from_pretrained``,
    which converts the saved layout into the model's (e.g. per-expert tensors into fused experts)."""
    with tempfile.TemporaryDirectory(prefix="prunekit-decompressed-") as tmp:
        shutil.copy2(folder / "config.json", Path(tmp) / "config.json")
        save_file({k: v.contiguous() for k, v in state.items()}, str(Path(tmp) / "model.safetensors"),
                  metadata={"format": "pt"})
        return from_pretrained_checked(tmp, dtype, unexpected="error")


def _saved_dtype(config, state: dict, dtype):
    if dtype != "auto":
        return dtype
    saved = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(saved, str):
        saved = getattr(torch, saved, None)
    return saved if isinstance(saved, torch.dtype) else next(iter(state.values())).dtype


def to_semi_structured(model) -> int:
    """Move ``model`` to the GPU and swap every 2:4-sparse linear weight for a semi-structured sparse tensor
    (cuSPARSELt/CUTLASS kernels); the whole model moves first, since those tensors cannot be moved afterwards. Needs a
    CUDA GPU of compute capability 8.0 or newer and fp16/bf16 weights. Returns the count."""
    if not torch.cuda.is_available():
        raise PrunekitError("sparse_kernels needs a CUDA GPU (2:4 semi-structured kernels); this machine has none")
    if torch.cuda.get_device_capability()[0] < 8:
        raise PrunekitError("sparse_kernels needs a GPU of compute capability 8.0 or newer (Ampere or later)")
    model.to("cuda")
    n = 0
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear) and mod.weight.dtype in (torch.float16, torch.bfloat16):
            W = mod.weight.data
            if W.shape[1] % 4 == 0 and bool(((W.reshape(W.shape[0], -1, 4) == 0).sum(-1) >= 2).all()):
                mod.weight = torch.nn.Parameter(to_sparse_semi_structured(W), requires_grad=False)
                n += 1
    if n == 0:
        raise PrunekitError("sparse_kernels: no fp16/bf16 linear layer is 2:4 sparse")
    return n


def is_weight_file(name: str) -> bool:
    """Dense or compressed weight files and their shard indexes (not the masks file)."""
    return name != "masks.safetensors" and (name.endswith(".safetensors") or name.endswith(".safetensors.index.json"))


def copy_extras(src, dst) -> None:
    """Every file of a saved folder except its weight files: config, tokenizer, masks, recipe, report, plots."""
    for f in Path(src).iterdir():
        if f.is_file() and not is_weight_file(f.name):
            shutil.copy2(f, Path(dst) / f.name)


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
