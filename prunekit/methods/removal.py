"""Layer (decoder-block) removal: ShortGPT block influence and Prune&Comp magnitude compensation.

Scores (``BLOCK_SCORES``; every score follows "higher = more important", the lowest block goes):

- ``bi``: ShortGPT block influence, BI_b = mean over all calibration tokens of 1 - cos(h_in, h_out),
  where h_in / h_out are the residual stream entering / leaving block b. Computed block by block with
  the block walker (:func:`prunekit.core.blocks.walk_blocks`): one pass over the blocks, never a
  full-model forward per block.
- ``magnitude``: mean |W| over all weights of the block's linear layers (sum |W| / number of weights).
  Data-free and weak; note that Prune&Comp compensation multiplies the output projections of earlier
  blocks, which changes this score for them in later steps.
- ``taylor``: first-order Taylor importance, sum over the block's linear weights of |dL/dW * W|
  (element-wise absolute value, then summed), L = mean next-token cross-entropy on the calibration
  windows, gradients accumulated over all windows. Needs a backward pass through the full model on
  ``device`` (plus one gradient per linear weight): meant for small models.
- ``ppl``: perplexity on the calibration windows with the block skipped (its output replaced by its
  input) minus the dense perplexity. One full-model forward per block plus one: meant for small models.

Prune&Comp compensation (``prune_and_comp``), per step:
1. score the current model, pick the lowest block i;
2. scale = mean|h_{i+1}| / mean|h_i| on the calibration windows, h_i = stream entering block i,
   h_{i+1} = stream leaving it. ``norm="abs"`` (default, the literal reading of mean|h|): mean over all
   tokens *and* channels of |h|; ``norm="l2"``: mean over tokens of the per-token L2 norm;
3. fold the scale into the weights so that the stream entering block i is multiplied by ``scale``:
   every embedding outside the blocks (token *and* learned position embeddings; for BLOOM the
   embedding LayerNorm's weight and bias) and the *residual writers* (weight and bias) of every
   block before i. The residual writers are found generically: the linear layers of one block are
   traced in execution order on a short sample and grouped by the block's direct child that holds them
   (``self_attn``, ``mlp``, ...; linears that are direct children of the block form one group, as
   OPT's fc1/fc2); the last linear executed in each group is the writer (o_proj/down_proj for LLaMA,
   out_proj/fc2 for OPT, c_proj/c_proj for GPT-2, dense/dense_4h_to_h for GPT-NeoX, Falcon, BLOOM).
   In a mixture-of-experts block every expert's down projection is a writer too (and a shared expert's down
   projection the last linear of its group), so the routed sum scales with them.
   This is exact for pre-norm blocks because the norms (RMSNorm, LayerNorm) are scale-invariant up to
   their epsilon: each block before i then writes ``scale`` times its old output. After folding, the
   stream entering block i is checked on two calibration windows against ``scale`` times the old one;
   when the check fails (post-norm models such as OPT-350m, Gemma-2/3 post-norms), the fold is undone (multiplied back by 1/scale) and a PrunekitError
   is raised. Tied embeddings: scaling a tied input embedding would scale the logits too, so the output
   embedding is first untied (lm_head gets its own copy of the weight, ``config.tie_word_embeddings``
   becomes False, so that the model saves and reloads untied);
4. remove block i and repeat k times. Removed indices are reported in the original numbering.
"""
from __future__ import annotations

import contextlib
import logging
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..core.blocks import run_blocks
from ..core.errors import PrunekitError
from ..core.experts import DOWN
from ..core.families import (
    block_linears,
    blocks_path,
    family_of,
    find_linears,
    get_blocks,
    hidden_size,
    is_expert,
    layer_parameter,
    stream_sources,
    weight_view,
)
from ..core.nll import nll_of_windows
from ..core.offload import on_device
from ..core.registry import Registry

log = logging.getLogger(__name__)

REMOVALS = ("prune-comp", "bi")  # the removal methods a config names (iterative with compensation; one-shot)
ScoreFn = Callable[..., list]
BLOCK_SCORES: Registry[ScoreFn] = Registry("block score")


def register_block_score(name: str):
    def deco(fn: ScoreFn) -> ScoreFn:
        return BLOCK_SCORES.add(name, fn)
    return deco


def get_block_score(name: str) -> ScoreFn:
    return BLOCK_SCORES.get(name)


# ----------------------------------------------------------------------------------------------- helpers

@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def _magnitude(h: torch.Tensor, norm: str) -> tuple[float, int]:
    h = h.float()
    if norm == "abs":
        return h.abs().sum().item(), h.numel()
    if norm == "l2":
        return h.norm(dim=-1).sum().item(), h.numel() // h.shape[-1]
    raise PrunekitError(f"unknown magnitude norm {norm!r}; valid: abs, l2")


def _bi_pass(model, input_ids, device="cpu", batch_size=None, norm="abs", stop=None):
    """One block-by-block pass: BI, mean|h_in| and mean|h_out| of every block (up to ``stop``)."""
    n = len(get_blocks(model)) if stop is None else stop
    bi = [[0.0, 0] for _ in range(n)]
    m_in = [[0.0, 0] for _ in range(n)]
    m_out = [[0.0, 0] for _ in range(n)]

    def visit(b, h_in, h_out):
        cos = F.cosine_similarity(h_in.float(), h_out.float(), dim=-1)
        bi[b][0] += (1.0 - cos).sum().item()
        bi[b][1] += cos.numel()
        for acc, h in ((m_in, h_in), (m_out, h_out)):
            s, c = _magnitude(h, norm)
            acc[b][0] += s
            acc[b][1] += c

    with _eval_mode(model):
        run_blocks(model, input_ids, visit, device, batch_size, stop, desc="block removal")
    mean = lambda acc: [s / c for s, c in acc]  # noqa: E731
    return mean(bi), mean(m_in), mean(m_out)


# ----------------------------------------------------------------------------------------------- scores

@register_block_score("bi")
def block_influence(model: nn.Module, input_ids: torch.Tensor, device="cpu", batch_size=None) -> list[float]:
    """ShortGPT block influence per block: mean over tokens of 1 - cos(h_in, h_out)."""
    return _bi_pass(model, input_ids, device, batch_size)[0]


@register_block_score("magnitude")
@torch.no_grad()
def magnitude_score(model: nn.Module, input_ids: torch.Tensor | None = None, device="cpu",
                    batch_size=None) -> list[float]:
    """Mean |W| over all weights of the block's linear layers (data-free; ``input_ids`` unused)."""
    out = []
    for layers in block_linears(model):
        tot, cnt = 0.0, 0
        for mod in layers.values():
            w = weight_view(mod)
            tot += w.float().abs().sum().item()
            cnt += w.numel()
        out.append(tot / max(cnt, 1))
    return out


@register_block_score("taylor")
def taylor_score(model: nn.Module, input_ids: torch.Tensor, device="cpu", batch_size=None) -> list[float]:
    """Sum over the block's linear weights of |grad * W|, grad of the mean calibration LM loss (experts: over
    their fused parameters, each counted once)."""
    layers = [list({id(p): p for p in (layer_parameter(m) for m in d.values())}.values())
              for d in block_linears(model)]
    keep = {id(p) for d in layers for p in d}
    saved = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    n = input_ids.shape[0]
    bs = batch_size or n
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in keep)
            p.grad = None
        with _eval_mode(model), on_device(model, device), torch.enable_grad():
            dev = next(model.parameters()).device
            for s in range(0, n, bs):
                batch = input_ids[s:s + bs].to(dev)
                loss = model(batch, labels=batch, use_cache=False).loss * (batch.shape[0] / n)
                loss.backward()
            with torch.no_grad():
                scores = [sum((p.grad.float() * p.float()).abs().sum().item() for p in d if p.grad is not None)
                          for d in layers]
    finally:
        for p, rg, g in saved:
            p.grad = g
            p.requires_grad_(rg)
    return scores


def _skip_hook(_mod, args, kwargs, output):
    h = args[0] if args else kwargs["hidden_states"]
    if isinstance(output, tuple):
        return (h,) + tuple(output[1:])
    return h


def _calib_ppl(model, input_ids, batch_size) -> float:
    """Token perplexity of the calibration windows, the model where it is."""
    dev = next(model.parameters()).device
    return math.exp(float(nll_of_windows(model, input_ids, dev, batch_size or input_ids.shape[0],
                                         desc="block score").mean()))


@register_block_score("ppl")
def ppl_score(model: nn.Module, input_ids: torch.Tensor, device="cpu", batch_size=None) -> list[float]:
    """Calibration perplexity with the block skipped minus the dense calibration perplexity."""
    blocks = get_blocks(model)
    with _eval_mode(model), on_device(model, device):
        base = _calib_ppl(model, input_ids, batch_size)
        out = []
        for block in blocks:
            h = block.register_forward_hook(_skip_hook, with_kwargs=True)
            try:
                out.append(_calib_ppl(model, input_ids, batch_size) - base)
            finally:
                h.remove()
    return out


# ----------------------------------------------------------------------------------------------- removal

_INDEX_LISTS = ("mlp_only_layers",)  # config lists holding layer *indices*: remapped, not filtered


def _update_config(cfg, n_old: int, keep: list[int]) -> None:
    cfg.num_hidden_layers = len(keep)  # attribute_map sends it to n_layer for GPT-2/BLOOM
    new_index = {old: new for new, old in enumerate(keep)}
    for key, val in list(vars(cfg).items()):
        if not isinstance(val, (list, tuple)) or "layer" not in key:
            continue
        if key in _INDEX_LISTS:
            setattr(cfg, key, type(val)(new_index[j] for j in val if j in new_index))
        elif len(val) == n_old:  # a per-layer list (layer_types, no_rope_layers, ...)
            setattr(cfg, key, type(val)(val[j] for j in keep))
        else:
            log.warning("config.%s (a list of %d, not %d) was left unchanged by block removal", key, len(val), n_old)


def remove_blocks(model: nn.Module, indices) -> list[int]:
    """Delete the decoder blocks at ``indices`` (current numbering), in place.

    Updates ``config.num_hidden_layers``, per-layer config lists (any list attribute whose name contains
    "layer" and whose length is the old number of blocks, e.g. ``layer_types``) and the ``layer_idx`` of
    every module in the remaining blocks (KV-cache slots), so that the model generates, saves with
    ``save_pretrained`` and reloads with the new depth. Returns the kept indices (old numbering)."""
    blocks = get_blocks(model)
    n = len(blocks)
    idx = sorted({int(i) for i in indices})
    if any(i < 0 or i >= n for i in idx):
        raise PrunekitError(f"block indices {idx} out of range for {n} blocks")
    if len(idx) >= n:
        raise PrunekitError(f"cannot remove {len(idx)} of {n} blocks: at least one must remain")
    if not idx:
        return list(range(n))
    keep = [j for j in range(n) if j not in set(idx)]
    for j in reversed(idx):
        del blocks[j]  # ModuleList renumbers its keys 0..n-1
    _update_config(model.config, n, keep)
    for new, block in enumerate(blocks):
        for mod in block.modules():
            if isinstance(getattr(mod, "layer_idx", None), int):
                mod.layer_idx = new
    if getattr(model.config, "scale_attn_by_inverse_layer_idx", False):
        log.warning("scale_attn_by_inverse_layer_idx is set: attention scales follow the new block positions")
    return keep


# ----------------------------------------------------------------------------------------------- compensation

def untie_embeddings(model: nn.Module) -> bool:
    """Give the output embedding its own copy of the weight when it shares the input embedding's.

    Sets ``tie_word_embeddings=False`` in the config so that the model saves and reloads untied.
    Returns True when the weights were tied."""
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if inp is None or out is None:
        return False
    tied = out.weight is inp.weight or out.weight.data_ptr() == inp.weight.data_ptr()
    if tied:
        out.weight = nn.Parameter(out.weight.detach().clone(), requires_grad=out.weight.requires_grad)
    cfgs = [model.config]
    if hasattr(model.config, "get_text_config"):
        cfgs.append(model.config.get_text_config())
    for cfg in cfgs:
        if getattr(cfg, "tie_word_embeddings", False):
            cfg.tie_word_embeddings = False
    if hasattr(model, "get_expanded_tied_weights_keys") and hasattr(model, "all_tied_weights_keys"):
        model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=True)
    return tied


@torch.no_grad()
def residual_writers(model: nn.Module, input_ids: torch.Tensor, device="cpu",
                     upto: int | None = None) -> list[dict[str, nn.Module]]:
    """Per block (blocks 0..upto-1, default all), the linear layers writing into the residual stream.

    Traced on the first window's first 16 tokens; see the module docstring for the rule."""
    path = blocks_path(model)
    blocks = get_blocks(model)
    upto = len(blocks) if upto is None else upto
    order: list[list[str]] = [[] for _ in range(upto)]
    experts = family_of(model).experts
    layers = [find_linears(blocks[b], experts=experts) for b in range(upto)]

    def hooks(b, block):
        out = []
        for name, mod in layers[b].items():
            def post(_m, _a, _o, _name=name, _b=b):
                if _name not in order[_b]:
                    order[_b].append(_name)
            out.append(mod.register_forward_hook(post))
        return out

    with _eval_mode(model):
        run_blocks(model, input_ids[:1, :16], None, device, None, upto, hooks, desc="block removal")
    hidden = hidden_size(model)
    writers = []
    for b, names in enumerate(order):
        last: dict[str, str] = {}
        for name in names:
            if not is_expert(layers[b][name]):
                last[name.split(".")[0] if "." in name else ""] = name
        found = {f"{path}.{b}.{n}": layers[b][n] for n in last.values()}
        # every expert's down projection writes (scaled by its routing weight) into the stream, routed in the
        # short trace or not
        found.update({f"{path}.{b}.{n}": m for n, m in layers[b].items() if is_expert(m) and m.proj == DOWN})
        bad = [n for n, m in found.items() if weight_view(m).shape[0] != hidden]
        if not found or bad:
            raise PrunekitError(f"cannot find the residual-writing layers of block {b} (candidates {list(found)})")
        writers.append(found)
    return writers


@torch.no_grad()
def fold_scale(model: nn.Module, upto: int, scale: float, writers: list[dict[str, nn.Module]]) -> None:
    """Multiply the residual stream entering block ``upto`` by ``scale``, offline, in the weights.

    Scales the embeddings (``stream_sources``) and the writers of blocks 0..upto-1 (weight and bias);
    unties a tied output embedding first so that the logits are not scaled with the embedding."""
    untie_embeddings(model)
    for m in stream_sources(model):
        m.weight.mul_(scale)
        if getattr(m, "bias", None) is not None:
            m.bias.mul_(scale)
    for b in range(upto):
        for m in writers[b].values():
            m.weight.mul_(scale)
            if getattr(m, "bias", None) is not None:
                m.bias.mul_(scale)


def _stream(model, input_ids, upto, device) -> torch.Tensor:
    with _eval_mode(model):
        inputs = run_blocks(model, input_ids, None, device, None, upto, desc="block removal")
        return torch.cat([h.float().cpu() for h in inputs.hidden])


def compensate_block(model: nn.Module, input_ids: torch.Tensor, i: int, scale: float, device="cpu") -> float:
    """Fold ``scale`` into the stream entering block ``i`` and check it on two calibration windows.

    Returns the relative error ||h' - scale*h|| / ||scale*h||; undoes the fold and raises on failure."""
    chk = input_ids[:2]
    ref = _stream(model, chk, i, device)
    writers = residual_writers(model, chk, device, upto=i)
    fold_scale(model, i, scale, writers)
    new = _stream(model, chk, i, device)
    err = ((new - scale * ref).norm() / (scale * ref).norm()).item()
    untouched = abs(scale - 1.0) / scale  # the error of not folding at all
    tol = 1e-3 if next(model.parameters()).dtype == torch.float32 else 3e-2
    if not err <= max(tol, 0.25 * untouched):
        fold_scale(model, i, 1.0 / scale, writers)
        raise PrunekitError(
            f"magnitude compensation is not supported for this architecture ({family_of(model).name}): "
            f"the folded stream entering block {i} is off by {err:.3g} (post-norm or MoE blocks?); "
            "use compensate=False")
    return err


# ----------------------------------------------------------------------------------------------- drivers

def _lowest(scores: list[float]) -> int:
    return min(range(len(scores)), key=lambda j: (scores[j], j))


def prune_and_comp(model: nn.Module, input_ids: torch.Tensor, k: int, score: str = "bi", compensate: bool = True,
                   device="cpu", batch_size: int | None = None, norm: str = "abs") -> dict:
    """Iterative Prune&Comp: k times, score the current model, remove the lowest block, fold the scale.

    Returns ``{"removed": [original indices, in removal order], "scales": [...], "scores": [per step,
    aligned with that step's "blocks"], "steps": [...], ...}``; scales are None without compensation."""
    fn = get_block_score(score)
    n0 = len(get_blocks(model))
    if not 0 <= k < n0:
        raise PrunekitError(f"cannot remove {k} of {n0} blocks (need 0 <= k < {n0})")
    alive = list(range(n0))
    steps = []
    for _ in range(k):
        mags = None
        if score == "bi":
            scores, m_in, m_out = _bi_pass(model, input_ids, device, batch_size, norm)
            mags = (m_in, m_out)
        else:
            scores = fn(model, input_ids, device=device, batch_size=batch_size)
        i = _lowest(scores)
        step = {"blocks": list(alive), "scores": [float(s) for s in scores], "removed": alive[i], "position": i,
                "scale": None}
        if compensate:
            if mags is None:
                _, m_in, m_out = _bi_pass(model, input_ids, device, batch_size, norm, stop=i + 1)
            else:
                m_in, m_out = mags
            scale = m_out[i] / m_in[i]
            step.update(scale=scale, mag_in=m_in[i], mag_out=m_out[i],
                        check_error=compensate_block(model, input_ids, i, scale, device))
        remove_blocks(model, [i])
        alive.pop(i)
        steps.append(step)
        log.info("removed block %d (score %s = %.4g)%s", step["removed"], score, scores[i],
                 f", scale {step['scale']:.4f}" if compensate else "")
    return {"method": "prune-comp" if compensate else "iterative", "score": score, "norm": norm,
            "compensate": compensate, "removed": [s["removed"] for s in steps],
            "scales": [s["scale"] for s in steps], "scores": [s["scores"] for s in steps],
            "kept": alive, "num_blocks_before": n0, "num_blocks_after": len(alive), "steps": steps}


def remove_one_shot(model: nn.Module, input_ids: torch.Tensor, k: int, score: str = "bi", device="cpu",
                    batch_size: int | None = None) -> dict:
    """ShortGPT: score once, remove the k lowest blocks, no compensation."""
    fn = get_block_score(score)
    n0 = len(get_blocks(model))
    if not 0 <= k < n0:
        raise PrunekitError(f"cannot remove {k} of {n0} blocks (need 0 <= k < {n0})")
    scores = [float(s) for s in fn(model, input_ids, device=device, batch_size=batch_size)]
    removed = sorted(sorted(range(n0), key=lambda j: (scores[j], j))[:k])
    kept = remove_blocks(model, removed)
    return {"method": "one-shot", "score": score, "removed": removed, "scores": scores, "kept": kept,
            "num_blocks_before": n0, "num_blocks_after": len(kept)}
