"""A dense LLaMA-style model upcycled into a mixture of experts (a transformers ``MixtralForCausalLM``), for the MoE
benchmark: no real MoE model is obtainable on this machine.

Every block's MLP is copied into E experts and a router sends each token to its top k; Mixtral normalises the k
routing weights to sum 1, so with identical copies each block computes exactly the dense MLP
(:func:`max_logit_gap` checks it). The router's rows are the directions of the k-means centroids of the MLP inputs
of held-out windows (tokens of one kind go to one expert), each row's length then adjusted so that every expert's
share of the top-k slots on those tokens comes near 1/E (:func:`balance`; a trained router's load-balancing loss
does this, plain centroids left some experts almost no token), and all scaled so that the logits spread about 1
across experts. Each expert's weights are then multiplied by (1 + sigma x N(0, 1)) so that experts differ; ``sigma``
trades their difference against the distance from the dense model (its perplexity is measured next to the dense
one's).
Attention, norms, embeddings and head are the dense model's.
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, MixtralConfig

from prunekit.core.known_models import cache_dir
from prunekit.core.outputs import atomic_dir


@torch.no_grad()
def mlp_inputs(model, ids: torch.Tensor, batch: int = 4) -> list[torch.Tensor]:
    """Per block, the inputs of its MLP (tokens x hidden, float32) on the windows ``ids``."""
    layers = model.model.layers
    got: list[list[torch.Tensor]] = [[] for _ in layers]
    hooks = [blk.mlp.register_forward_pre_hook(lambda m, a, _i=i: got[_i].append(a[0].reshape(-1, a[0].shape[-1])
                                                                                 .float()))
             for i, blk in enumerate(layers)]
    try:
        for s in range(0, ids.shape[0], batch):
            model(ids[s:s + batch], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(g) for g in got]


def kmeans(x: torch.Tensor, k: int, iters: int = 25, seed: int = 0) -> torch.Tensor:
    """Lloyd's k-means on the rows of x, initial centroids k distinct rows drawn with ``seed``; (k, d)."""
    g = torch.Generator().manual_seed(seed)
    c = x[torch.randperm(x.shape[0], generator=g)[:k]].clone()
    for _ in range(iters):
        assign = torch.cdist(x, c).argmin(1)
        for j in range(k):
            members = x[assign == j]
            if members.shape[0]:
                c[j] = members.mean(0)
    return c


def routed_shares(rows: torch.Tensor, x: torch.Tensor, top_k: int) -> torch.Tensor:
    """Each expert's share of the top-k slots of tokens x under router rows, times E (1 = an even load)."""
    idx = (x @ rows.t()).topk(top_k, dim=1).indices
    return torch.bincount(idx.flatten(), minlength=rows.shape[0]).float() / idx.numel() * rows.shape[0]


def balance(rows: torch.Tensor, x: torch.Tensor, top_k: int, steps: int = 100, rate: float = 0.05) -> torch.Tensor:
    """Row lengths that bring the routed shares of tokens x toward even: ``steps`` multiplicative updates
    s_j *= share_j^-rate (shares floored at 0.05), renormalised to a geometric mean of 1."""
    s = torch.ones(rows.shape[0])
    for _ in range(steps):
        s = s * routed_shares(rows * s[:, None], x, top_k).clamp_min(0.05) ** -rate
        s = s / s.log().mean().exp()
    return rows * s[:, None]


def mixtral_config(dense_config, experts: int, top_k: int) -> MixtralConfig:
    c = dense_config
    return MixtralConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=getattr(c, "head_dim", None), hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        rope_parameters=dict(c.rope_parameters), tie_word_embeddings=c.tie_word_embeddings,
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id, sliding_window=None,
        num_local_experts=experts, num_experts_per_tok=top_k, router_jitter_noise=0.0, output_router_logits=False)


@torch.no_grad()
def upcycle(dense, router_ids: torch.Tensor, experts: int = 8, top_k: int = 2, sigma: float = 0.0, seed: int = 0):
    """The Mixtral upcycle of ``dense`` (a LLaMA-style causal LM, see the module docstring), in eval mode.
    ``router_ids``: the held-out windows whose MLP inputs place the router's rows."""
    moe = AutoModelForCausalLM.from_config(mixtral_config(dense.config, experts, top_k), dtype=dense.dtype)
    state = dense.state_dict()
    moe.load_state_dict({k: v for k, v in state.items() if ".mlp." not in k}, strict=False)
    g = torch.Generator().manual_seed(seed)

    def noisy(w):
        return w * (1 + sigma * torch.randn(w.shape, generator=g, dtype=torch.float32).to(w.dtype)) if sigma else w

    inputs = mlp_inputs(dense, router_ids)
    for i, (blk, src) in enumerate(zip(moe.model.layers, dense.model.layers)):
        gate_up = torch.cat([src.mlp.gate_proj.weight, src.mlp.up_proj.weight])
        for e in range(experts):
            blk.mlp.experts.gate_up_proj[e] = noisy(gate_up)
            blk.mlp.experts.down_proj[e] = noisy(src.mlp.down_proj.weight)
        c = kmeans(inputs[i], experts, seed=seed + i)
        rows = balance(c / c.norm(dim=1, keepdim=True), inputs[i], top_k)
        spread = (inputs[i] @ rows.t()).std(1).mean()  # logits' spread across experts, per token
        blk.mlp.gate.weight.copy_((rows / spread).to(blk.mlp.gate.weight.dtype))
    moe.tie_weights()
    moe.eval()
    return moe


@torch.no_grad()
def max_logit_gap(a, b, ids: torch.Tensor) -> float:
    """Largest |logit difference| between two models on ``ids``."""
    return float((a(ids, use_cache=False).logits - b(ids, use_cache=False).logits).abs().max())


def upcycled_folder(name: str, dense, tok, router_ids, experts: int, top_k: int, sigma: float, seed: int = 0) -> Path:
    """The upcycled model saved (model and tokenizer) under prunekit's cache as ``bench/<name>``, built once."""
    folder = cache_dir() / "bench" / name
    if not (folder / "config.json").is_file():
        moe = upcycle(dense, router_ids, experts, top_k, sigma, seed)
        with atomic_dir(folder, False, []) as tmp:
            moe.save_pretrained(tmp)
            tok.save_pretrained(tmp)
        del moe
    return folder
