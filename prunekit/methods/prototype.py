"""Calibration-data pruning with self-supervised prototypes (Sorscher et al., "Beyond neural scaling laws").

A pool of candidate calibration windows is embedded, clustered with k-means, and every window is
scored by its cosine distance to the nearest centroid (its prototype): far = hard / atypical, near =
easy / prototypical. ``select_windows`` keeps the hardest, the easiest, or half of each.

Choices (documented here because they change which windows are chosen):
- Embedding (``embed_windows``): the mean over tokens of the hidden states of one layer of the model
  being pruned (default the last, i.e. after the final norm, as ``output_hidden_states[-1]``); ``layer``
  follows the ``output_hidden_states`` numbering (0 = embeddings, j = output of block j-1). Any callable
  ``encoder(windows) -> (n, d)`` or a precomputed (n, d) tensor can be used instead.
- Before clustering, the embeddings are centred (the pool mean is subtracted: mean-pooled LLM states
  share a large common direction that would make every cosine close to 1) and L2-normalised; k-means
  then runs on the unit vectors (spherical-style) and the score is 1 - cos(x, normalised centroid),
  minimised over centroids. ``center=False`` keeps the raw directions.
- k-means: plain torch, float64 on the CPU, greedy k-means++ initialisation (2 + log k candidates per
  pick, the one that lowers the potential most, as scikit-learn does; plain D² sampling tends to seed
  centroids on outliers, which would then score as easiest), Lloyd iterations until the assignment
  stops changing; an empty cluster takes the point farthest from its centroid. Deterministic for a seed.
- Default k = round(sqrt(pool size)), at least 1 and at most the pool size. Clusters with fewer than
  ``min_size`` (2) members do not count as prototypes: k-means readily gives a lone far outlier its own
  centroid, which would make it score 0 (the easiest window) instead of the hardest.
- Ties in the score are broken by the window index (lower first), so the selection is deterministic.
"""
from __future__ import annotations

import math
from typing import Callable, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..core.blocks import StopForward
from ..core.errors import PrunekitError
from ..core.families import get_blocks
from ..core.offload import on_device

MODES = ("hard", "easy", "mixed")


# ----------------------------------------------------------------------------------------------- embedding

@torch.no_grad()
def embed_windows(model: Union[nn.Module, Callable], windows: torch.Tensor, layer: int = -1, batch_size: int = 8,
                  device="cpu") -> torch.Tensor:
    """(n, d) float32 CPU tensor: mean over tokens of the hidden states of ``layer`` for each window.

    ``model`` is a Hugging Face causal LM (or base model), or any callable ``encoder(windows) -> (n, d)``."""
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        out = model(windows)
        out = torch.as_tensor(out)
        if out.ndim != 2 or out.shape[0] != windows.shape[0]:
            raise PrunekitError(f"the encoder returned shape {tuple(out.shape)}, expected ({windows.shape[0]}, d)")
        return out.detach().float().cpu()
    base = getattr(model, "base_model", model)
    blocks = get_blocks(model)
    n_layers = len(blocks)
    if not -(n_layers + 1) <= layer <= n_layers:
        raise PrunekitError(f"layer {layer} out of range for {n_layers} blocks (0..{n_layers}, or negative)")
    j = layer % (n_layers + 1)
    was_training = model.training
    model.eval()
    got: dict = {}
    hook = None
    if j == 0:
        def pre(_m, args, kwargs):
            got["h"] = args[0] if args else kwargs["hidden_states"]
            raise StopForward
        hook = blocks[0].register_forward_pre_hook(pre, with_kwargs=True)
    elif j < n_layers:
        def post(_m, _a, out):
            got["h"] = out[0] if isinstance(out, (tuple, list)) else out
            raise StopForward
        hook = blocks[j - 1].register_forward_hook(post)
    feats = []
    try:
        with on_device(model, device):  # back in its own CPU memory afterwards
            dev = next(model.parameters()).device
            for s in range(0, windows.shape[0], batch_size):
                batch = windows[s:s + batch_size].to(dev)
                try:
                    h = base(input_ids=batch, use_cache=False).last_hidden_state
                except StopForward:
                    h = got.pop("h")
                feats.append(h.float().mean(dim=1).cpu())
    finally:
        if hook is not None:
            hook.remove()
        model.train(was_training)
    return torch.cat(feats)


# ----------------------------------------------------------------------------------------------- k-means

def _sqdist(X: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    d = (X * X).sum(1, keepdim=True) - 2.0 * X @ C.T + (C * C).sum(1)[None, :]
    return d.clamp_min_(0.0)


def _kmeans_pp(X: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    n = X.shape[0]
    trials = 2 + int(math.log(k))
    first = int(torch.randint(n, (1,), generator=g))
    centers = [first]
    d2 = _sqdist(X, X[first:first + 1])[:, 0]
    for _ in range(1, k):
        total = d2.sum()
        if total <= 0:  # every point sits on a centre already (duplicates): any unused point will do
            unused = [i for i in range(n) if i not in set(centers)]
            cand = unused[int(torch.randint(len(unused), (1,), generator=g))]
        else:
            cands = torch.multinomial(d2 / total, trials, replacement=True, generator=g)
            new_d2 = torch.minimum(d2[None, :], _sqdist(X[cands], X))  # (trials, n)
            cand = int(cands[int(new_d2.sum(1).argmin())])
        centers.append(cand)
        d2 = torch.minimum(d2, _sqdist(X, X[cand:cand + 1])[:, 0])
    return X[centers].clone()


def kmeans(X: torch.Tensor, k: int, seed: int = 0, iters: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain k-means on the rows of X: returns (centroids (k, d) float64, labels (n,) long). Deterministic."""
    X = torch.as_tensor(X).detach().to("cpu", torch.float64)
    if X.ndim != 2:
        raise PrunekitError(f"kmeans needs an (n, d) matrix, got shape {tuple(X.shape)}")
    n = X.shape[0]
    if not 1 <= k <= n:
        raise PrunekitError(f"kmeans needs 1 <= k <= n (k={k}, n={n})")
    g = torch.Generator().manual_seed(int(seed))
    C = _kmeans_pp(X, k, g)
    labels = None
    for _ in range(max(1, iters)):
        d = _sqdist(X, C)
        new = d.argmin(1)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        counts = torch.bincount(labels, minlength=k)
        sums = torch.zeros_like(C).index_add_(0, labels, X)
        nonempty = counts > 0
        C[nonempty] = sums[nonempty] / counts[nonempty, None].to(X.dtype)
        for c in torch.nonzero(~nonempty).flatten().tolist():  # refill an empty cluster
            far = int(d.gather(1, labels[:, None])[:, 0].argmax())
            C[c] = X[far]
            labels[far] = c
            d[far] = 0.0
    return C, _sqdist(X, C).argmin(1)


def prototype_assign(X: torch.Tensor, k: int, seed: int = 0, iters: int = 100, center: bool = True,
                     min_size: int = 2):
    """(scores, labels, unit centroids): cosine distance to the nearest centroid and that centroid's index.

    Centroids of clusters with fewer than ``min_size`` members are not prototypes (a lone outlier that
    k-means gave its own cluster would otherwise score 0, "easiest"); they are dropped unless that
    would drop them all."""
    X = torch.as_tensor(X).detach().to("cpu", torch.float64)
    if center:
        X = X - X.mean(0, keepdim=True)
    Xn = F.normalize(X, dim=1)
    C, labels = kmeans(Xn, k, seed, iters)
    Cn = F.normalize(C, dim=1)
    keep = torch.bincount(labels, minlength=k) >= min_size
    if not keep.any():
        keep[:] = True
    cos = Xn @ Cn.T
    cos[:, ~keep] = -math.inf
    best, labels = cos.max(1)
    return (1.0 - best).float(), labels, Cn


def prototype_scores(X: torch.Tensor, k: int, seed: int = 0, iters: int = 100, center: bool = True,
                     min_size: int = 2) -> torch.Tensor:
    """Cosine distance of every row of X to its nearest k-means centroid (higher = harder)."""
    return prototype_assign(X, k, seed, iters, center, min_size)[0]


# ----------------------------------------------------------------------------------------------- selection

def default_k(n_pool: int) -> int:
    return max(1, min(n_pool, round(math.sqrt(n_pool))))


def parse_select(spec: str) -> str:
    """'prototype:hard' | 'prototype:easy' | 'prototype:mixed' (or just the mode) -> the mode."""
    method, _, mode = spec.partition(":") if ":" in spec else ("prototype", ":", spec)
    if method != "prototype" or mode not in MODES:
        raise PrunekitError(f"unknown calibration selection {spec!r}; valid: "
                            + ", ".join(f"prototype:{m}" for m in MODES))
    return mode


def select_windows(pool_windows: torch.Tensor, n: int, mode: str = "hard", k: int | None = None, seed: int = 0,
                   embed=None, layer: int = -1, batch_size: int = 8, device="cpu", iters: int = 100,
                   center: bool = True, min_size: int = 2) -> tuple[torch.Tensor, dict]:
    """Choose ``n`` of the pool's windows by prototype distance.

    ``embed``: a Hugging Face model (embedded with ``embed_windows``), a callable encoder, or a
    precomputed (pool, d) tensor. ``mode``: ``hard`` (farthest from their prototype), ``easy``
    (nearest), ``mixed`` (ceil(n/2) hardest + floor(n/2) easiest). Returns (indices into the pool,
    hard ones first by decreasing score, then easy ones by increasing score; info) where
    ``info["samples"]`` explains every chosen window: score, cluster, rank (0 = hardest of the pool), role."""
    if mode not in MODES:
        raise PrunekitError(f"unknown selection mode {mode!r}; valid: {', '.join(MODES)}")
    n_pool = pool_windows.shape[0]
    if not 1 <= n <= n_pool:
        raise PrunekitError(f"cannot select {n} windows from a pool of {n_pool}")
    if embed is None:
        raise PrunekitError("select_windows needs embed= (a model, an encoder callable, or an (n, d) tensor)")
    if isinstance(embed, torch.Tensor):
        X = embed
    else:
        X = embed_windows(embed, pool_windows, layer=layer, batch_size=batch_size, device=device)
    if X.shape[0] != n_pool:
        raise PrunekitError(f"{X.shape[0]} embeddings for {n_pool} windows")
    k = default_k(n_pool) if k is None else k
    scores, labels, _ = prototype_assign(X, k, seed, iters, center, min_size)
    order = sorted(range(n_pool), key=lambda i: (-float(scores[i]), i))  # hardest first
    rank = {i: r for r, i in enumerate(order)}
    n_hard = {"hard": n, "easy": 0, "mixed": n - n // 2}[mode]
    hard = order[:n_hard]
    easy = sorted(range(n_pool), key=lambda i: (float(scores[i]), i))[:n - n_hard]
    chosen = hard + easy
    assert len(set(chosen)) == n
    sizes = torch.bincount(labels, minlength=k)
    picked = torch.bincount(labels[chosen], minlength=k)
    info = {
        "method": "prototype", "mode": mode, "k": k, "seed": seed, "pool": n_pool, "n": n, "center": center,
        "layer": layer if not isinstance(embed, torch.Tensor) and isinstance(embed, nn.Module) else None,
        "score": "cosine distance to the nearest k-means centroid (higher = harder)",
        "pool_scores": {"min": float(scores.min()), "median": float(scores.median()), "max": float(scores.max())},
        "cluster_sizes": sizes.tolist(), "chosen_per_cluster": picked.tolist(),
        "samples": [{"index": i, "score": float(scores[i]), "cluster": int(labels[i]), "rank": rank[i],
                     "role": "hard" if j < n_hard else "easy"} for j, i in enumerate(chosen)],
    }
    return torch.tensor(chosen, dtype=torch.long), info
