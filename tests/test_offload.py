"""prunekit.core.offload: a module comes back into its own CPU tensors, with whatever was done to it meanwhile.

No second device here: the move is simulated by giving every tensor new storage (what ``module.to(cuda)``
does), the restore path is the one used after a GPU run."""
from __future__ import annotations

import torch
from torch import nn

from prunekit.core.offload import home_of, on_device, restore


def _module():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 4, bias=False), nn.LayerNorm(4))
    m.register_buffer("table", torch.arange(5.0))
    return m


def test_restore_copies_back_into_the_original_tensors():
    m = _module()
    before = {n: (t.data_ptr(), t.detach().clone()) for n, t in list(m.named_parameters()) + list(m.named_buffers())}
    home = home_of(m)
    assert len(home) == 4  # linear weight, norm weight and bias, the buffer
    with torch.no_grad():  # "moved": new storage everywhere, then updated there (pruned, reconstructed)
        for p in m.parameters():
            p.data = p.data.clone() * 2
        m.table = m.table.clone() + 1
        m[0].bias = nn.Parameter(torch.ones(4))  # appeared meanwhile (e.g. STADE's bias)
    restore(m, home)
    for n, t in list(m.named_parameters()) + list(m.named_buffers()):
        if n == "0.bias":
            assert torch.equal(t, torch.ones(4))
            continue
        ptr, val = before[n]
        assert t.data_ptr() == ptr  # the original memory: nothing allocated on the way back
        assert torch.equal(t, val + 1 if n == "table" else val * 2)  # with the new values


def test_restore_moves_tensors_whose_shape_changed_instead_of_copying():
    m = _module()
    home = home_of(m)
    m[0].weight = nn.Parameter(torch.zeros(3, 6))  # e.g. a layer replaced by a smaller one
    restore(m, home)
    assert m[0].weight.shape == (3, 6) and not m[0].weight.any()


def test_on_device_is_a_no_op_on_the_same_device_and_recurse_false_keeps_children():
    m = _module()
    ptrs = [p.data_ptr() for p in m.parameters()]
    with on_device(m, "cpu") as same:
        assert same is m and [p.data_ptr() for p in m.parameters()] == ptrs
    assert home_of(m, torch.device("cpu")) == {}
    assert [k[2] for k in home_of(m, recurse=False)] == ["table"]  # own buffer only, not the children's


def test_device_match_ignores_a_missing_index():
    from prunekit.core.offload import on

    t = torch.zeros(1)
    assert on(t, torch.device("cpu")) and not on(t, torch.device("cuda")) and not on(t, torch.device("meta"))
