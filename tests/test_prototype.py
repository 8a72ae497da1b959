"""Calibration-window selection by prototypes (prunekit.methods.prototype): k-means, prototype scores
(outliers are hardest), the hard / easy / mixed modes, and window embeddings from hidden states."""
import pytest
import torch
from conftest import tiny_model

from prunekit.methods.prototype import embed_windows, kmeans, parse_select, prototype_scores, select_windows
from prunekit.core.errors import PrunekitError


def _blobs(seed=0, per=40, blobs=4, outliers=3, d=16):
    """Gaussian blobs around random directions plus a few far points in other directions (the last rows)."""
    g = torch.Generator().manual_seed(seed)
    centers = 5.0 * torch.nn.functional.normalize(torch.randn(blobs, d, generator=g), dim=1)
    pts = [c + 0.3 * torch.randn(per, d, generator=g) for c in centers]
    far = 5.0 * torch.nn.functional.normalize(torch.randn(outliers, d, generator=g), dim=1)
    return torch.cat(pts + [far]), list(range(blobs * per, blobs * per + outliers))


@pytest.mark.parametrize("k", [4, None])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_outliers_are_hardest(seed, k):
    X, out = _blobs(seed)
    kk = k or round(X.shape[0] ** 0.5)  # the default k of select_windows: more centroids than blobs
    s = prototype_scores(X, kk, seed=seed)
    assert s.shape == (X.shape[0],)
    assert set(torch.argsort(s, descending=True)[:len(out)].tolist()) == set(out)
    idx, info = select_windows(torch.zeros(X.shape[0], 4, dtype=torch.long), 3, "hard", k=k, seed=seed, embed=X)
    assert set(idx.tolist()) == set(out)
    assert [x["rank"] for x in info["samples"]] == [0, 1, 2]


def test_kmeans_deterministic_and_correct():
    X, _ = _blobs(0, outliers=0)
    c1, l1 = kmeans(X, 4, seed=3)
    c2, l2 = kmeans(X, 4, seed=3)
    assert torch.equal(c1, c2) and torch.equal(l1, l2)
    # four well-separated blobs: each one is one cluster
    groups = {tuple(l1[i * 40:(i + 1) * 40].unique().tolist()) for i in range(4)}
    assert len(groups) == 4 and all(len(gr) == 1 for gr in groups)
    assert torch.allclose(prototype_scores(X, 4, seed=5), prototype_scores(X, 4, seed=5))
    with pytest.raises(PrunekitError):
        kmeans(X, 0)
    with pytest.raises(PrunekitError):
        kmeans(X[:3], 4)


@pytest.mark.parametrize("mode", ["hard", "easy", "mixed"])
@pytest.mark.parametrize("n", [1, 7, 163])
def test_select_modes_counts_and_no_duplicates(mode, n):
    X, _ = _blobs(1)
    pool = torch.arange(X.shape[0] * 4).reshape(-1, 4)
    idx, info = select_windows(pool, n, mode, k=4, seed=0, embed=X)
    assert idx.dtype == torch.long and len(idx) == n == len(set(idx.tolist())) == len(info["samples"])
    scores = prototype_scores(X, 4, seed=0)
    ranked = torch.argsort(scores, descending=True, stable=True).tolist()
    n_hard = {"hard": n, "easy": 0, "mixed": n - n // 2}[mode]
    roles = [x["role"] for x in info["samples"]]
    assert roles == ["hard"] * n_hard + ["easy"] * (n - n_hard)
    assert set(idx[:n_hard].tolist()) == set(ranked[:n_hard])
    if n - n_hard and n < len(ranked):
        assert set(idx[n_hard:].tolist()) == set(ranked[len(ranked) - (n - n_hard):])
    for x in info["samples"]:
        assert x["score"] == pytest.approx(float(scores[x["index"]]))
        assert 0 <= x["cluster"] < 4 and 0 <= x["rank"] < X.shape[0]
    assert sum(info["chosen_per_cluster"]) == n and sum(info["cluster_sizes"]) == X.shape[0]


def test_select_errors_and_spec():
    X, _ = _blobs(0)
    pool = torch.zeros(X.shape[0], 2, dtype=torch.long)
    with pytest.raises(PrunekitError):
        select_windows(pool, X.shape[0] + 1, "hard", embed=X)
    with pytest.raises(PrunekitError):
        select_windows(pool, 3, "medium", embed=X)
    with pytest.raises(PrunekitError):
        select_windows(pool, 3, "hard")
    assert parse_select("prototype:mixed") == "mixed" and parse_select("easy") == "easy"
    with pytest.raises(PrunekitError):
        parse_select("random:hard")


@pytest.mark.parametrize("fam", ["llama", "gpt2"])
def test_embed_windows_matches_hidden_states(fam, calib_ids):
    model = tiny_model(fam)
    with torch.no_grad():
        hs = model(calib_ids, output_hidden_states=True, use_cache=False).hidden_states
    for layer in (-1, 0, 1):
        e = embed_windows(model, calib_ids, layer=layer, batch_size=4)
        assert e.shape == (calib_ids.shape[0], model.config.hidden_size)
        assert torch.allclose(e, hs[layer].mean(1), atol=1e-5)
    enc = lambda w: w.float()[:, :5]  # noqa: E731  any callable encoder
    assert torch.equal(embed_windows(enc, calib_ids), calib_ids.float()[:, :5])
    idx, info = select_windows(calib_ids, 4, "mixed", k=2, embed=model)
    assert len(set(idx.tolist())) == 4 and info["layer"] == -1
