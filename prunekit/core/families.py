"""Architecture families: everything prunekit knows about a model's layout, in one table.

A :class:`Family` says where the decoder blocks live, which config attributes give the context length, which
modules hold the attention's keys and values (and how), which modules write the stream entering block 0, and, for
a mixture-of-experts family, where each block keeps its fused experts and its router (:class:`Experts`).
Prunable layers are the ``nn.Linear`` / GPT-2 ``Conv1D`` modules inside the blocks and each expert's gate, up and
down projections (:class:`prunekit.core.experts.ExpertMatrix`, views into the fused 3-D parameters); routers stay
dense. The functions below answer every question other modules ask about a model (sizes, context length, biases
a reload keeps, the share of each block that is prunable, expert removal); nothing else in prunekit reads a
model's attribute layout. Add a family with one ``register_family(Family(...))`` entry.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from torch import nn

from .errors import PrunekitError
from .experts import ExpertGroup, ExpertMatrix, is_fused_experts

try:  # GPT-2 style models use a transposed linear layer
    from transformers.pytorch_utils import Conv1D
except Exception:  # pragma: no cover - transformers always has it today
    Conv1D = ()  # type: ignore[assignment]


# module name (last part) -> how its output holds keys/values: "k"/"v" (separate projections), "gpt2" (fused
# c_attn: [q | k | v]), "neox" (fused per head: [q, k, v] for each head)
KV_PROJECTIONS = (("k_proj", "k"), ("v_proj", "v"), ("c_attn", "gpt2"), ("query_key_value", "neox"))


@dataclass(frozen=True)
class Experts:
    """Where a mixture-of-experts block keeps its parts (dotted paths inside a block): the fused experts module
    (:mod:`prunekit.core.experts`), its router (kept dense; its rows go with removed experts), other routing layers
    kept dense (Qwen2-MoE's ``shared_expert_gate``), and the config attribute holding the number of experts per
    layer. A block without the experts module (the dense layers of a mixed model) is a dense block. Shared experts
    are ordinary MLPs (their ``nn.Linear`` layers are found as in any block)."""

    module: str = "mlp.experts"
    router: str = "mlp.gate"
    dense: tuple[str, ...] = ()
    # config attributes that may hold the number of experts per layer (each one the saved config has and that equals
    # the current number is updated when experts are removed)
    count: tuple[str, ...] = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


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
    experts: Experts | None = None
    # a family prunekit knows it can prune only in part: what stays dense and why (a warning in the summary and the
    # report instead of the refusal that a block mostly left dense otherwise gets, see ``coverage``)
    partial: str = ""


FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    FAMILIES[family.name] = family
    return family


for _f in (
    Family("llama", ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "granite",
                     "olmo", "olmo2", "smollm3", "cohere", "stablelm", "starcoder2", "phi", "internlm2", "yi"),
           "model.layers"),
    # mixture of experts (transformers 5 fused experts; every model type here has a tiny-config test)
    Family("moe", ("mixtral", "qwen3_moe", "olmoe", "minimax_m2", "deepseek_v2", "deepseek_v3", "dots1",
                   "glm4_moe", "ernie4_5_moe", "cohere2_moe", "exaone_moe", "solar_open"), "model.layers",
           experts=Experts()),
    Family("qwen2_moe", ("qwen2_moe",), "model.layers", experts=Experts(dense=("mlp.shared_expert_gate",))),
    Family("moe_router", ("phimoe", "gpt_oss"), "model.layers", experts=Experts(router="mlp.router")),
    Family("granitemoe", ("granitemoe", "granitemoeshared"), "model.layers",
           experts=Experts("block_sparse_moe.experts", "block_sparse_moe.router")),
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


def _submodule(block: nn.Module, path: str) -> nn.Module | None:
    try:
        return block.get_submodule(path)
    except AttributeError:
        return None


def find_linears(block: nn.Module, prefix: str = "", ignore: list[str] | tuple[str, ...] = (),
                 experts: Experts | None = None) -> dict[str, nn.Module | ExpertMatrix]:
    """Prunable layers inside ``block`` keyed by their full name (``prefix.name``), in definition order.

    ``experts``: the family's MoE layout; its fused experts module contributes every expert's projections
    (:class:`ExpertMatrix`, named ``<experts>.<e>.gate_proj`` ...) at its place in that order, and its router and
    ``dense`` layers are left out. ``ignore`` holds fnmatch patterns (see :func:`name_matches`) of layers to leave
    out.
    """
    out: dict[str, nn.Module | ExpertMatrix] = {}
    fused = _submodule(block, experts.module) if experts else None
    group = None
    if fused is not None and is_fused_experts(fused):
        group = ExpertGroup(fused, _submodule(block, experts.module.rpartition(".")[0]) if "." in experts.module
                            else block)
    skip = (experts.router, *experts.dense) if experts else ()
    for name, mod in block.named_modules():
        if group is not None and mod is group.module:
            for row in group.matrices:
                for m in row:
                    full = f"{prefix}.{name}.{m.expert}.{m.proj}" if prefix else f"{name}.{m.expert}.{m.proj}"
                    if not name_matches(full, ignore):
                        out[full] = m
            continue
        if not name or not is_prunable(mod) or any(name == p or name.startswith(p + ".") for p in skip):
            continue
        full = f"{prefix}.{name}" if prefix else name
        if name_matches(full, ignore):
            continue
        out[full] = mod
    return out


def block_linears(model: nn.Module, ignore=()) -> list[dict[str, nn.Module | ExpertMatrix]]:
    path = blocks_path(model)
    experts = family_of(model).experts
    return [find_linears(b, f"{path}.{i}", ignore, experts) for i, b in enumerate(get_blocks(model))]


def weight_view(module: nn.Module | ExpertMatrix) -> torch.Tensor:
    """The weight as (out_features, in_features); a view, so in-place edits reach the module (for an expert, the
    fused parameter)."""
    if isinstance(module, ExpertMatrix):
        return module.weight
    w = module.weight.data
    return w.t() if (bool(Conv1D) and isinstance(module, Conv1D)) else w


def in_features(module: nn.Module | ExpertMatrix) -> int:
    return weight_view(module).shape[1]


def layer_parameter(layer: nn.Module | ExpertMatrix) -> nn.Parameter:
    """The parameter a prunable layer's weight lives in (an expert's: the fused 3-D parameter)."""
    return layer.parameter if isinstance(layer, ExpertMatrix) else layer.weight


def is_expert(layer) -> bool:
    return isinstance(layer, ExpertMatrix)


# --------------------------------------------------------------------------------------------- coverage

COVERAGE_MIN = 0.9  # a block whose prunable share is lower is refused unless what stays dense is ignored explicitly


def _star_block(name: str, path: str) -> str:
    """``model.layers.3.mlp.experts.down_proj`` -> ``model.layers.*.mlp.experts.down_proj``."""
    head = path + "."
    if name.startswith(head):
        rest = name[len(head):].split(".", 1)
        return f"{path}.*.{rest[1]}" if len(rest) == 2 else name
    return name


def coverage(model: nn.Module) -> dict:
    """The share of each block's parameters that prunekit can prune (every prunable layer, no ``ignore``), and
    what stays dense. Returns ``{"blocks": [share per block], "min": lowest share, "block_params", "prunable",
    "dense": {parameter name with the block index as '*': parameters left dense over all blocks, largest first}}``."""
    path = blocks_path(model)
    shares, dense, total, prunable = [], {}, 0, 0
    for b, (block, layers) in enumerate(zip(get_blocks(model), block_linears(model))):
        covered: dict[int, int] = {}
        for layer in layers.values():
            p = layer_parameter(layer)
            covered[id(p)] = covered.get(id(p), 0) + weight_view(layer).numel()
        n = sum(p.numel() for p in block.parameters())
        k = sum(covered.values())
        for name, p in block.named_parameters():
            left = p.numel() - covered.get(id(p), 0)
            if left > 0:
                key = _star_block(f"{path}.{b}.{name}", path)
                dense[key] = dense.get(key, 0) + left
        shares.append(k / n if n else 1.0)
        total += n
        prunable += k
    return {"blocks": shares, "min": min(shares) if shares else 1.0, "block_params": total, "prunable": prunable,
            "dense": dict(sorted(dense.items(), key=lambda kv: -kv[1]))}


# --------------------------------------------------------------------------------------------- experts

def expert_groups(model: nn.Module) -> list[ExpertGroup | None]:
    """Per block, the fused experts of that block (None for a dense block or a dense family)."""
    spec = family_of(model).experts
    out = []
    for block in get_blocks(model):
        fused = _submodule(block, spec.module) if spec else None
        if fused is not None and is_fused_experts(fused):
            parent = _submodule(block, spec.module.rpartition(".")[0]) if "." in spec.module else block
            out.append(ExpertGroup(fused, parent))
        else:
            out.append(None)
    return out


def top_k(model: nn.Module) -> int | None:
    """Experts each token is routed to (the config's ``num_experts_per_tok`` or ``moe_k``), None if unknown."""
    for attr in ("num_experts_per_tok", "moe_k", "top_k"):
        v = getattr(model.config, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def drop_experts(model: nn.Module, kept: dict[int, list[int]]) -> None:
    """Keep, in block b, only the experts ``kept[b]``: fused weights, router rows and the model's expert counts
    (config attributes of :attr:`Experts.count` that equal the old number, and the modules' own counts), so that a
    plain ``from_pretrained`` of the saved folder builds the same model. Every MoE block must keep the same number
    of experts (one config value); group-limited routing (``n_group`` > 1) is refused (its groups would change)."""
    spec = family_of(model).experts
    groups = expert_groups(model)
    sizes = {len(v) for b, v in kept.items() if groups[b] is not None}
    if len(sizes) != 1 or any(groups[b] is not None and b not in kept for b in range(len(groups))):
        raise PrunekitError("expert removal: every MoE block must keep the same number of experts")
    n_group = getattr(model.config, "n_group", None)
    if isinstance(n_group, int) and n_group > 1:
        raise PrunekitError(f"expert removal: {model.config.model_type} routes within {n_group} expert groups "
                            "(n_group); removing experts would change the groups")
    new = sizes.pop()
    k = top_k(model)
    old = next(g.num_experts for g in groups if g is not None)
    if k is not None and new < k:
        raise PrunekitError(f"expert removal: {new} experts left per layer, fewer than the {k} each token is routed to")
    blocks = get_blocks(model)
    for b, g in enumerate(groups):
        if g is not None:
            owner = _submodule(blocks[b], spec.module.rpartition(".")[0]) if "." in spec.module else blocks[b]
            g.keep(kept[b], blocks[b].get_submodule(spec.router), owner)
    saved = model.config.to_dict()
    for attr in spec.count:
        if saved.get(attr) == old:
            setattr(model.config, attr, new)


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
    experts = [n for n in names if n not in mods]  # expert matrices: a bias only where the layout has one
    if experts:
        layers = {n: m for d in block_linears(model) for n, m in d.items()}
        lost = [n for n in experts if layers[n].bias is None]
        if lost:
            raise PrunekitError(f"{why}: the experts of a {model.config.model_type} model have no biases ({lost[0]}, "
                                f"{len(lost)} expert matrices), so the corrected biases would be lost on reload; pass "
                                "--metric-param bias_correction=false to prune without it")
    need = [n for n in names if n in mods and getattr(mods[n], "bias", None) is None]
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
