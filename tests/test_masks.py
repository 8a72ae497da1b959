"""Masks from scores (prunekit.core.masks): the lowest-k selection and the exact per-row counts against
brute-force sorts with heavy ties, the N:M shape check, and the packed bit format of saved masks."""
import numpy as np
import pytest
import torch

import prunekit
from prunekit.core.errors import PrunekitError
from prunekit.core.masks import unpack_mask

from conftest import tiny_model


def test_lowest_k_selection_equals_a_stable_sort_with_ties():
    """The selection path of _lowest_k_mask (k-th value, then ties in index order) picks exactly what
    sorting each row with ties broken by index does, for every k, on scores full of ties; NaN scores
    and per-row k take the sort path."""
    from prunekit.core.masks import _lowest_k_mask

    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (7, 13), generator=g).float()  # four distinct values: ties everywhere
    scores[2] = 1.0
    scores[3, ::2] = -0.0
    for k in range(0, 14):
        ref = np.zeros(scores.shape, dtype=bool)
        for r in range(scores.shape[0]):
            for j in sorted(range(scores.shape[1]), key=lambda j: (float(scores[r, j]), j))[:k]:
                ref[r, j] = True
        assert torch.equal(_lowest_k_mask(scores, k), torch.from_numpy(ref)), k
        assert torch.equal(_lowest_k_mask(scores.double(), torch.full((7,), k)), torch.from_numpy(ref)), k
    with_nan = scores.clone()
    with_nan[0, 0] = float("nan")
    got = _lowest_k_mask(with_nan, 5)
    assert not got[0, 0] and (got.sum(1) == 5).all()


def test_long_row_selection_equals_a_stable_sort(monkeypatch):
    """A layer compared as a whole (one long row: ADMM's gradual mask, ALPS's projection) is selected through a
    sample that brackets the k-th value (bounded memory): the mask equals a stable argsort's for every kind of
    score order, with ties, infinities and k at both ends; a row the sample misrepresents (every sampled entry
    0, the rest 1) falls back to a whole-row selection and is still exact."""
    from prunekit.core import masks

    monkeypatch.setattr(masks, "LONG_ROW", 4096)
    monkeypatch.setattr(masks, "_SAMPLE", 256)
    g = torch.Generator().manual_seed(1)
    n = 20011
    trap = torch.ones(n)
    trap[:: n // 256] = 0.0  # exactly the strided sample is 0
    rows = {"random": torch.randn(n, generator=g), "ascending": torch.arange(n).float(),
            "descending": -torch.arange(n).float(), "constant": torch.zeros(n),
            "ties": torch.randint(0, 5, (n,), generator=g).float(),
            "half inf": torch.cat([torch.full((n // 2,), float("inf")), torch.randn(n - n // 2, generator=g)]),
            "trap": trap}
    calls = []
    real = masks._kth_by_slices
    monkeypatch.setattr(masks, "_kth_by_slices", lambda *a: calls.append(a[-1]) or real(*a))
    for name, x in rows.items():
        order = torch.from_numpy(np.argsort(x.numpy(), kind="stable"))
        for k in (1, 2, n // 3, n // 2, 1500, n - 1):
            ref = torch.zeros(n, dtype=torch.bool)
            ref[order[:k]] = True
            got = masks._lowest_k_mask(x[None], k)
            assert torch.equal(got[0], ref), (name, k)
    assert len(calls) == 6 * len(rows)  # every selection above took the long-row path
    # the bracket [0, 0] holds 79 entries < 1500: fallback
    assert real(lambda a, b: trap[a:b], [(0, n)], n, 1500) == 1.0


@pytest.mark.parametrize("pattern", [None, (2, 4)])
def test_masks_by_row_slices_equal_the_whole_matrix_masks(monkeypatch, pattern):
    """A layer-wide mask of a score given by slices of rows (what ADMM's gradual mask and ALPS compute from an
    iterate they do not copy) is make_mask's of the whole score matrix: one ratio over the layer (with ties,
    infinities, NaN, k at 0), per-row ratios and N:M, for slices that do not divide the rows; the score is only
    ever asked for whole slices of rows."""
    from prunekit.core import masks

    monkeypatch.setattr(masks, "LONG_ROW", 4096)
    monkeypatch.setattr(masks, "_SAMPLE", 256)
    g = torch.Generator().manual_seed(2)
    rows, cols, step = 101, 96, 16
    bounds = [(r, min(r + step, rows)) for r in range(0, rows, step)]
    mats = {"random": torch.randn(rows, cols, generator=g),
            "ties": torch.randint(0, 3, (rows, cols), generator=g).float(),
            "inf": torch.randn(rows, cols, generator=g).masked_fill(torch.rand(rows, cols, generator=g) < 0.3,
                                                                     float("inf")),
            "nan": torch.randn(rows, cols, generator=g)}
    mats["nan"][3, 5] = float("nan")
    asked = []

    for name, S in mats.items():
        def score(a, b, S=S):
            asked.append((a, b))
            return S[a:b].clone()

        cases = [0.0, 0.3, 0.5, 0.7] if pattern is None else [0.5]
        for s in cases:
            want = masks.make_mask(S, s, pattern, "layer")
            assert torch.equal(masks.mask_by_row_slices(score, (rows, cols), s, pattern, bounds), want), (name, s)
        if pattern is None and name != "nan":
            ratios = torch.linspace(0.1, 0.9, rows).double()
            want = masks.make_mask(S, ratios)
            assert torch.equal(masks.mask_by_row_slices(score, (rows, cols), ratios, None, bounds), want), name
    assert {b - a for a, b in asked} <= {step, rows % step, rows}  # slices, or the whole for a NaN fallback


def test_row_counts_against_brute_force():
    """row_counts: the layer total is floor(numel * s); every row prunes b = total // rows, and the rows whose
    (b+1)-th lowest score is smallest (ties by row index) prune one more; the exact per-row mask prunes each
    row's lowest scores (stable order) by those counts. Checked against a per-row sort, with heavy ties."""
    from prunekit.core.masks import make_mask, row_counts

    g = torch.Generator().manual_seed(0)
    for rows, cols in ((7, 13), (64, 48), (5, 3), (33, 100)):
        for ties in (False, True):
            sc = torch.rand(rows, cols, generator=g)
            if ties:
                sc = (sc * 4).floor()
            for s in (0.0, 0.1, 0.37, 0.5, 0.7, 0.93):
                total = int(rows * cols * s)
                base, extra = divmod(total, rows)
                srt = torch.sort(sc, dim=1, stable=True)
                nxt = [float(srt.values[r, base]) if base < cols else float("inf") for r in range(rows)]
                more = sorted(range(rows), key=lambda r: (nxt[r], r))[:extra]
                want = torch.tensor([base + (r in more) for r in range(rows)])
                assert torch.equal(row_counts(sc, s), want), (rows, cols, ties, s)
                mask = make_mask(sc, s)
                ref = torch.zeros(rows, cols, dtype=torch.bool)
                for r in range(rows):
                    ref[r, srt.indices[r, :int(want[r])]] = True
                assert torch.equal(mask, ref), (rows, cols, ties, s)
                assert int(mask.sum()) == total
                floor = make_mask(sc, s, exact=False)
                assert bool((floor.sum(1) == int(cols * s)).all())


def test_nm_dimension_not_divisible(calib_ids):
    model = tiny_model("gpt2", hidden=36)  # 36 % 8 != 0 (GPT-2: no RoPE constraint on the head size)
    with pytest.raises(PrunekitError, match=r"input dimension 36 is not divisible by M=8"):
        prunekit.prune(model, None, {"metric": "wanda", "pattern": "4:8"}, calib_ids=calib_ids)


def test_packed_masks_roundtrip():
    from prunekit.core.masks import pack_mask

    m = torch.rand(7, 13) > 0.5
    assert torch.equal(unpack_mask(pack_mask(m), m.shape), m)


@pytest.mark.parametrize("n", [1, 8, 91, 4096])
def test_torch_bit_packing_equals_numpy_packbits(n):
    """pack_bits packs GPU masks on the GPU; here it runs on CPU tensors against numpy's packbits."""
    import numpy as np

    from prunekit.core.masks import pack_bits

    m = torch.rand(n, generator=torch.Generator().manual_seed(n)) > 0.5
    assert torch.equal(pack_bits(m), torch.from_numpy(np.packbits(m.numpy())))
