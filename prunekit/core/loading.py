"""Load a causal LM: a local HF folder, a hub id (online), a GGUF file, or a model prunekit knows by name (the
embedded default SmolLM2-135M-Instruct, Qwen2.5-Coder 0.5B / 1.5B: :mod:`prunekit.core.known_models`)."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch

from .errors import PrunekitError
from .families import family_of
from .known_models import DEFAULT_MODEL, KNOWN_MODELS, KnownModel, ensure_model, known_model, models_dir

log = logging.getLogger(__name__)

DTYPES = {"auto": "auto", "float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


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


def _convert(gguf: Path, folder: Path, model: KnownModel) -> None:
    m, tok = load_gguf(gguf, dtype=torch.float32)
    m.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    (folder / "SOURCE.txt").write_text(f"Converted by prunekit from {', '.join(model.packages)} ({model.gguf}, GGUF "
                                       f"{model.quantisation} dequantised to fp32). {model.note}\n")


def ensure_default_model() -> Path:
    """The converted HF folder of the embedded default model (SmolLM2-135M-Instruct), created once."""
    return ensure_model(known_model(DEFAULT_MODEL), _convert)


def fetch_model(name: str) -> Path:
    """The converted HF folder of a model prunekit knows by name, created once."""
    model = known_model(name)
    if model is None:
        raise PrunekitError(f"unknown model name {name!r}; known: {', '.join(m.aliases[0] for m in KNOWN_MODELS.values())}")
    return ensure_model(model, _convert)


def resolve_model_path(spec: str) -> str:
    """A known model's name -> its converted folder (fetched on first use); anything else unchanged."""
    return str(fetch_model(spec)) if known_model(spec) else spec


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
    """The local file or folder a model spec reads (a known model's cache folder), or None for a hub id; nothing
    is downloaded."""
    if known_model(spec):
        return models_dir() / known_model(spec).name
    p = Path(spec).expanduser()
    return p if p.exists() else None
