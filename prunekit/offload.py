"""Move a module to the compute device for a while, and back into its own CPU memory.

``module.to(device)`` followed by ``module.to("cpu")`` allocates fresh CPU tensors on the way back. On a
GPU machine that first-touches (page-faults) every byte of them: measured on an H200 virtual machine
(bench/profile_engine.py, LLaMA-7B shapes), copying a block back to new pageable memory ran at about
0.5 GB/s, 0.77 s per 0.4 GB block, a third of a 7B SparseGPT prune. ``on_device`` keeps the original
CPU tensors alive while the module is away and copies the results back into them, so nothing is
allocated or faulted on the way back.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

_KINDS = ("_parameters", "_buffers")


def on(t: torch.Tensor, device: torch.device) -> bool:
    """Whether ``t`` is on ``device`` ("cuda" without an index means any CUDA device)."""
    return t.device.type == device.type and (device.index is None or t.device.index == device.index)


def home_of(module: nn.Module, device: torch.device | None = None, recurse: bool = True) -> dict:
    """The tensors of ``module`` (parameters and buffers, by owning module and name) not already on ``device``
    (``recurse=False``: the module's own tensors only, not its children's)."""
    home = {}
    for mod in (module.modules() if recurse else [module]):
        for kind in _KINDS:
            for name, t in getattr(mod, kind).items():
                if t is not None and (device is None or not on(t, device)):
                    home[(mod, kind, name)] = t.data
    return home


@torch.no_grad()
def restore(module: nn.Module, home: dict, recurse: bool = True) -> None:
    """Put every tensor of ``module`` back into its original tensor from ``home`` (copied in place), whatever
    was done to it meanwhile (moved, replaced, updated). Tensors whose shape or dtype changed, and tensors
    that appeared meanwhile (e.g. a bias added by STADE), are moved to the original device."""
    if not home:
        return
    orig = next(iter(home.values())).device
    for mod in (module.modules() if recurse else [module]):
        for kind in _KINDS:
            table = getattr(mod, kind)
            for name, t in list(table.items()):
                if t is None:
                    continue
                old = home.get((mod, kind, name))
                if old is None:
                    if t.device != orig:
                        _assign(table, kind, name, t.data.to(orig))
                elif old.shape == t.shape and old.dtype == t.dtype:
                    if t.data.data_ptr() != old.data_ptr():
                        old.copy_(t.data)
                        _assign(table, kind, name, old)
                else:
                    _assign(table, kind, name, t.data.to(old.device))


def _assign(table: dict, kind: str, name: str, value: torch.Tensor) -> None:
    if kind == "_parameters":
        table[name].data = value
    else:
        table[name] = value


@contextlib.contextmanager
def on_device(module: nn.Module, device, recurse: bool = True):
    """Run the body with ``module`` on ``device``; afterwards its tensors are back in their own memory.
    ``recurse=False`` moves only the module's own parameters and buffers (not its children)."""
    device = torch.device(device)
    home = home_of(module, device, recurse)
    if not home:
        yield module
        return
    if recurse:
        module.to(device)
    else:
        with torch.no_grad():
            for (_, kind, name), t in home.items():
                _assign(getattr(module, kind), kind, name, t.to(device))
    try:
        yield module
    finally:
        restore(module, home, recurse)
