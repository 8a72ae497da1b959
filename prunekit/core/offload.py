"""Where tensors live while the engine runs: the one offload policy, and moving modules for a while.

Policy (:func:`store_device`, :func:`fits_on_device`): on a CPU everything stays on the CPU. On a GPU the
hidden states of the calibration or evaluation windows stay on the GPU unless they would take more than a
quarter of its free memory (then they wait on the CPU, pinned, and only the current block's batch is moved);
a whole-model forward (perplexity) is used only when the model fits in 80% of the free memory, else the model
runs block by block.

Moving a module to the compute device for a while, and back into its own CPU memory:

``module.to(device)`` followed by ``module.to("cpu")`` allocates fresh CPU tensors on the way back. On a
GPU machine that first-touches (page-faults) every byte of them: copying a LLaMA-7B block back into new
pageable memory runs at about 0.5 GB/s (bench.profile_engine), a third of a 7B SparseGPT prune's
time. ``on_device`` keeps the original
CPU tensors alive while the module is away and copies the results back into them, so nothing is
allocated or faulted on the way back.
"""
from __future__ import annotations

import contextlib
import os

import torch
from torch import nn

from .errors import PrunekitError

HIDDEN_SHARE = 0.25  # hidden states may take this share of the free GPU memory before they wait on the CPU
MODEL_SHARE = 0.8  # a whole-model forward needs the model to fit in this share of the free GPU memory


def resolve_device(device: str) -> torch.device:
    """``auto`` is CUDA when available, else the CPU; asking for CUDA without one is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PrunekitError("device 'cuda' requested but no CUDA device is available")
    return torch.device(device)


def free_memory(device) -> int:
    """Free bytes on ``device`` (the GPU's, or the machine's available memory)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def peak_rss_bytes() -> int | None:
    """The process's peak resident memory so far, None where unreadable: ``getrusage``'s high-water mark (Linux
    reports KiB), which the kernel updates lazily and can lag the resident memory now, so at least :func:`rss_bytes`."""
    try:
        import resource

        peak = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    except (ImportError, OSError, ValueError):
        return None
    return max(peak, rss_bytes() or 0)


def rss_bytes() -> int | None:
    """The process's resident memory now (Linux ``/proc/self/statm``), None where unreadable."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def store_device(model: nn.Module, input_ids: torch.Tensor, device, offload: bool | None = None) -> torch.device:
    """Where the hidden states of ``input_ids`` wait between blocks (``offload``: force the CPU or the device)."""
    device = torch.device(device)
    if device.type != "cuda":
        return torch.device("cpu")
    if offload is None:
        hidden = input_ids.numel() * model.config.hidden_size * next(model.parameters()).element_size()
        offload = hidden > HIDDEN_SHARE * free_memory(device)
    return torch.device("cpu") if offload else device


def fits_on_device(model: nn.Module, device) -> bool:
    """Whether a whole-model forward on ``device`` is the way to run (else block by block)."""
    device = torch.device(device)
    if device.type != "cuda":
        return True
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    return size <= MODEL_SHARE * free_memory(device)

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
