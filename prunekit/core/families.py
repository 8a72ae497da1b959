"""Architecture families: everything prunekit knows about a model's layout, in one table.

A :class:`Family` says where the decoder blocks live, which config attributes give the context length, which
modules hold the attention's keys and values (and how), and which modules write the stream entering block 0.
Prunable layers are the ``nn.Linear`` / GPT-2 ``Conv1D`` modules inside the blocks. The functions below answer
every question other modules ask about a model (sizes, context length, biases a reload keeps); nothing else in
prunekit reads a model's attribute layout. Add a family with one ``register_family(Family(...))`` entry.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from torch import nn

from .errors import PrunekitError

try:  # GPT-2 style models use a transposed linear layer
    from transformers.pytorch_utils import Conv1D
except Exception:  # pragma: no cover - transformers always has it today
    Conv1D = ()  # type: ignore[assignment]


# module name (last part) -> how its output holds keys/values: "k"/"v" (separate projections), "gpt2" (fused
# c_attn: [q | k | v]), "neox" (fused per head: [q, k, v] for each head)
KV_PROJECTIONS = (("k_proj", "k"), ("v_proj", "v"), ("c_attn", "gpt2"), ("query_key_value", "neox"))


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    blocks: str  # dotted path from the *CausalLM object to the ModuleList of decoder blocks
    context_attrs: tuple[str, ...] = ("max_position_embeddings",)
    kv: tuple[tuple[str, str], ...] = KV_PROJECTIONS
    # dotted path of the module whose output is the stream entering block 0 when that is not the sum of the
    # embeddings (BLOOM normalises the embeddings first); None: every nn.Embedding outside the blocks
    stream_source: str | None = None


FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    FAMILIES[family.name] = family
    return family


for _f in (
    Family("llama", ("llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen2_moe", "gemma", "gemma2",
                     "gemma3_text", "phi3", "granite", "olmo", "olmo2", "smollm3", "cohere", "stablelm",
                     "starcoder2", "phi", "internlm2", "deepseek_v2", "yi"), "model.layers"),
    Family("opt", ("opt",), "model.decoder.layers"),
    Family("gpt_neox", ("gpt_neox",), "gpt_neox.layers"),
    Family("gpt2", ("gpt2", "gpt_bigcode", "gptj", "codegen"), "transformer.h",
           ("n_positions", "max_position_embeddings")),
    Family("falcon", ("falcon",), "transformer.h"),
    Family("bloom", ("bloom",), "transformer.h", ("seq_length",),
           stream_source="transformer.word_embeddings_layernorm"),
):
    register_family(_f)


def supported_model_types() -> list[str]:
    return sorted({t for f in FAMILIES.values() for t in f.model_types})


def family_of(model: nn.Module) -> Family:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for fam in FAMILIES.values():
        if model_type in fam.model_types:
            return fam
    raise PrunekitError(
        f"unsupported architecture {model_type!r}; supported model types: {', '.join(supported_model_types())}"
    )


def _resolve(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def get_blocks(model: nn.Module) -> nn.ModuleList:
    fam = family_of(model)
    try:
        blocks = _resolve(model, fam.blocks)
    except AttributeError as e:
        raise PrunekitError(f"{fam.name} model has no decoder blocks at '{fam.blocks}' ({e})") from None
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise PrunekitError(f"'{fam.blocks}' is not a non-empty ModuleList")
    return blocks


def blocks_path(model: nn.Module) -> str:
    return family_of(model).blocks


GENERIC_CONTEXT_ATTRS = ("n_positions", "max_position_embeddings", "n_ctx", "seq_length")


def model_context_length(model: nn.Module) -> int | None:
    """The model's context length from its config (the family's attributes; for a model of no known family,
    the usual ones), or None."""
    cfg = getattr(model, "config", None)
    model_type = getattr(cfg, "model_type", None)
    fam = next((f for f in FAMILIES.values() if model_type in f.model_types), None)
    for attr in fam.context_attrs if fam else GENERIC_CONTEXT_ATTRS:
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def resolve_seqlen(model: nn.Module, seqlen: int | None, default: int = 2048) -> int:
    """``seqlen``, or min(``default``, context); longer than the context is an error."""
    ctx = model_context_length(model)
    if seqlen is None:
        return min(default, ctx) if ctx else default
    if ctx and seqlen > ctx:
        raise PrunekitError(f"seqlen {seqlen} is longer than the model's context ({ctx} tokens)")
    return seqlen


def hidden_size(model: nn.Module) -> int:
    cfg = model.config
    return int(getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd"))


def activation_bytes_per_token(model: nn.Module) -> int:
    """Rough peak activation memory of one block per token: hidden-sized tensors (residual, norms, q/k/v/o
    and their copies) and MLP-sized ones (gate, up, activation), in the model's dtype."""
    cfg = model.config
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", 1024)
    inter = (getattr(cfg, "intermediate_size", None) or getattr(cfg, "ffn_dim", None)
             or getattr(cfg, "n_inner", None) or 4 * hidden)
    size = next(model.parameters()).element_size()
    return (10 * hidden + 4 * inter) * size


def attention_dims(model: nn.Module) -> tuple[int, int, int]:
    """(head_dim, number of key/value heads, number of attention heads)."""
    c = model.config
    heads = getattr(c, "num_attention_heads", None) or getattr(c, "n_head")
    hidden = getattr(c, "hidden_size", None) or getattr(c, "n_embd")
    head_dim = getattr(c, "head_dim", None) or hidden // heads
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    return int(head_dim), int(kv_heads), int(heads)


def kv_modules(model: nn.Module) -> list[list[tuple[str, nn.Module]]]:
    """Per block, the modules whose outputs hold keys/values, with their kind (see :data:`KV_PROJECTIONS`)."""
    kinds = dict(family_of(model).kv)
    out = []
    for b, block in enumerate(get_blocks(model)):
        found = [(kinds[name.rsplit(".", 1)[-1]], m) for name, m in block.named_modules()
                 if name.rsplit(".", 1)[-1] in kinds]
        if not found:
            raise PrunekitError(f"KV-cache quantisation: no key/value projection found in block {b} "
                                f"({model.config.model_type})")
        out.append(found)
    return out


def stream_sources(model: nn.Module) -> list[nn.Module]:
    """Modules whose outputs sum into the stream entering block 0 (the embeddings outside the blocks, or the
    family's own ``stream_source``)."""
    fam = family_of(model)
    if fam.stream_source:
        return [_resolve(model, fam.stream_source)]
    inside = {id(m) for m in get_blocks(model).modules()}
    return [m for m in model.modules() if isinstance(m, nn.Embedding) and id(m) not in inside]


def is_prunable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (bool(Conv1D) and isinstance(module, Conv1D))


def name_matches(full: str, patterns) -> bool:
    """Whether layer name ``full`` matches one of the fnmatch ``patterns``, tried against the full name
    and against every dotted tail of it: ``*.mlp.down_proj``, ``mlp.down_proj``, ``down_proj`` and
    ``layers.0.*`` all match ``model.layers.0.mlp.down_proj``."""
    parts = full.split(".")
    tails = [".".join(parts[i:]) for i in range(len(parts))]
    return any(fnmatch.fnmatch(t, p) for p in patterns for t in tails)


def unmatched_patterns(names, patterns) -> list[str]:
    """The patterns that match none of ``names`` (most likely misspelt)."""
    names = list(names)
    return [p for p in patterns if not any(name_matches(n, [p]) for n in names)]


def find_linears(block: nn.Module, prefix: str = "", ignore: list[str] | tuple[str, ...] = ()) -> dict[str, nn.Module]:
    """Prunable layers inside ``block`` keyed by their full name (``prefix.name``), in definition order.

    ``ignore`` holds fnmatch patterns (see :func:`name_matches`) of layers to leave out.
    """
    out: dict[str, nn.Module] = {}
    for name, mod in block.named_modules():
        if not name or not is_prunable(mod):
            continue
        full = f"{prefix}.{name}" if prefix else name
        if name_matches(full, ignore):
            continue
        out[full] = mod
    return out


def block_linears(model: nn.Module, ignore=()) -> list[dict[str, nn.Module]]:
    path = blocks_path(model)
    return [find_linears(b, f"{path}.{i}", ignore) for i, b in enumerate(get_blocks(model))]


def weight_view(module: nn.Module) -> torch.Tensor:
    """The weight as (out_features, in_features); a view, so in-place edits reach the module."""
    w = module.weight.data
    return w.t() if (bool(Conv1D) and isinstance(module, Conv1D)) else w


def in_features(module: nn.Module) -> int:
    return weight_view(module).shape[1]


def declare_biases(model: nn.Module, names, why: str = "bias correction") -> list[str]:
    """Make every layer in ``names`` carry a bias that a plain ``from_pretrained`` of the saved folder loads.

    A bias added to a layer whose architecture has none would be saved and then dropped on reload (the saved
    model would not be the one that was evaluated). The config's boolean ``*bias*`` flags that give those
    layers a bias (LLaMA: ``attention_bias`` for q/k/v/o, ``mlp_bias`` for gate/up/down) are found by building
    the architecture on the meta device; they are set, and every module they give a bias gets a zero one now
    (the same function). Returns the flags set. Raises when some layer cannot get a bias (an architecture that
    fixes it bias-free), before any work."""
    import copy

    from transformers import AutoModelForCausalLM

    mods = dict(model.named_modules())
    need = [n for n in names if getattr(mods[n], "bias", None) is None]
    if not need:
        return []

    def built(flags) -> dict[str, nn.Module]:
        cfg = copy.deepcopy(model.config)
        for f in flags:
            setattr(cfg, f, True)
        with torch.device("meta"):
            return dict(AutoModelForCausalLM.from_config(cfg).named_modules())

    candidates = sorted(k for k, v in vars(model.config).items() if v is False and "bias" in k.lower())
    covering = {}
    for flag in candidates:
        meta = built([flag])
        got = [n for n in need if getattr(meta.get(n), "bias", None) is not None]
        if got:
            covering[flag] = got
    lost = [n for n in need if not any(n in got for got in covering.values())]
    if lost:
        raise PrunekitError(f"{why}: a reloaded {model.config.model_type} model has no bias in {lost[0]} "
                            f"({len(lost)} layer(s); its architecture fixes them bias-free), so the corrected biases "
                            "would be lost on reload; pass --metric-param bias_correction=false to prune without it")
    meta = built(covering)
    for flag in covering:
        setattr(model.config, flag, True)
    for name, m in meta.items():
        mod = mods.get(name)
        if mod is not None and getattr(m, "bias", None) is not None and getattr(mod, "bias", False) is None:
            w = mod.weight
            mod.bias = nn.Parameter(torch.zeros(m.bias.shape, dtype=w.dtype, device=w.device))
    return list(covering)
