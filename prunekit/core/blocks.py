"""The block walker and the calibration engine built on it.

1. ``capture_inputs`` runs the model on the windows and stops at block 0, keeping the block's positional
   *and* keyword arguments exactly as the model passed them (position embeddings, masks, cache flags: nothing
   is rebuilt by hand, so new transformers releases work).
2. ``walk_blocks`` then walks the blocks: only the current block is moved to the compute device, the hidden
   states of all samples wait where the offload policy says (:mod:`prunekit.core.offload`), and a step function
   runs the block. Everything that goes block by block uses it: the calibration engine below, block removal's
   passes, block-by-block perplexity.
3. ``iterate_blocks`` (the engine) steps with ``run_block``: forward pre-hooks on the block's prunable layers
   collect statistics, the caller's ``handle(name, module, stats)`` prunes a layer, and the block's outputs
   are recomputed *after* pruning and fed to the next block.

Two semantics, chosen by ``sequential``:
- ``sequential=True`` (default): inside a block, each layer's statistics come from inputs that
  already reflect the pruning of the layers executed before it (q/k/v, then o, then gate/up, then
  down for LLaMA). When all samples fit in one batch this costs a *single* forward pass per block:
  a layer is pruned in its own pre-hook, right before it runs on the batch.
  Otherwise the block is run once per stage (layers that read the same input tensor form a stage),
  each run stopping after its stage, then once more for the outputs.
- ``sequential=False``: the Wanda paper's protocol: statistics of every layer from the dense block,
  then pruning, then a second pass for the outputs.
In both, layers that read the same input tensor (q/k/v, gate/up) share one ``LayerStats``; with several
batches the groups are found by one extra forward of the first batch (``_stages``).
Both strategies of ``sequential=True`` compute the same thing; batching only changes rounding.

The experts of a mixture-of-experts layer are layers like any other (:class:`prunekit.core.experts.ExpertMatrix`):
their hooks are called with the tokens the router sends to their expert, so every statistic above is per expert
without a forward per expert. With several batches every expert's gate/up form one stage and every expert's down
the next (each depends on its own expert only), not one stage per expert.
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed, interrupts
from .experts import ExpertMatrix
from .families import activation_bytes_per_token, get_blocks, in_features
from .offload import free_memory, on_device, rss_bytes, store_device
from .stats import LayerStats

log = logging.getLogger(__name__)


class StopForward(Exception):
    """Raised in a hook to end a forward pass early (the model's later layers are not needed)."""


_MALLOC_TUNED = False
_LIBC: list = []


def tune_malloc() -> None:
    """Keep freed large buffers in glibc's heap instead of returning them to the OS.

    Every block pass allocates activations of hundreds of MB; by default glibc serves them with
    mmap and unmaps them on free, so each pass would pay the page faults again (about a quarter of a
    SmolLM2 block pass on a CPU). No effect off glibc.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return
    _MALLOC_TUNED = True
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: serve allocations up to 1 GiB from the heap
        libc.mallopt(-1, 1 << 31)  # M_TRIM_THRESHOLD: do not give memory back below 2 GiB of slack
        _LIBC.append(libc)
    except (OSError, AttributeError):
        pass


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                               "uordblks", "fordblks", "keepcost")]


def heap_free_bytes() -> int | None:
    """Bytes free inside glibc's heap (all arenas, ``mallinfo2().fordblks``); None off glibc or before 2.33."""
    fn = getattr(_LIBC[0], "mallinfo2", None) if _LIBC else None
    if fn is None:
        return None
    fn.restype = _Mallinfo2
    return int(fn().fordblks)


class HeapKeeper:
    """Gives the heap's free memory back to the OS when the process has grown, not after every block.

    After the first block, the resident memory is the reference and the free heap is what a block pass needs again
    (its activations, freed): kept, the next block reuses most of it without page faults. Trimming after *every*
    block (``malloc_trim``) made each pass fault its activations in anew: 5-6 s of a 35 s SmolLM2 64 x 512 forward
    (bench/results/engine_profile.md). Never trimming lets fragmentation grow the heap block after block (a
    64 x 512 SmolLM2 SparseGPT prune: 7.8 GB; one with many batches reached 24 GB). So: trim once the resident
    memory exceeds the reference by more than half of that pass (at least ``slack``): with the whole pass as the
    allowance, SparseGPT's peak rose from 2.5 to 3.7 GB. Where memory cannot be read (not Linux and glibc), trim
    after every block as before.

    The allowance is taken once per process, at the first walk's first block: a later walk's heap counts as free the
    pages that earlier trims gave back to the OS (no longer resident), and half of that let a later walk grow by
    gigabytes before its first trim (``auto``'s second trial prune of SmolLM2: peak 8.2 GiB, against 3.4 GiB in the
    first; the resident memory after every trial 2.6-2.7 GiB).

    A walk starts with a trim (:func:`walk_blocks`): otherwise the heap that the work between two walks left free
    (``auto``'s held-out evaluation after each trial prune) is resident at the next walk's first block and raises its
    reference. Qwen2.5-Coder-0.5B ``eps=auto``: resident memory after the trials 4.2, 7.7, 7.7, 7.9, 7.7, 8.9 GiB,
    peak 9.4 GiB (bench/results/auto_memory.md)."""

    ANCHORS = 128  # untouched 320 KB allocations held while the walk runs (see below)
    process_allowance: int | None = None  # the first walk's allowance, reused by every later walk of the process

    def __init__(self, slack: int = 256 << 20):
        self.slack, self.reference, self.allowance, self.trims = slack, None, 0, 0
        # Measured, not understood: with about a hundred live medium allocations in the heap before the first block
        # (a dense snapshot of the weights, or 125 untouched 320 KB tensors), the fresh-process SmolLM2 Wanda prune
        # kept reusing its freed activations (0 trims, 0.34 M page faults, 31 s); without them its heap grew and
        # was trimmed after 13-24 of 30 blocks (6-9 M page faults, 38 s). 25 such tensors of 16 MB, or one of
        # 400 MB, did not help. Untouched pages cost no resident memory (40 MB of address space).
        # bench/results/engine_profile.md.
        self._anchors = [torch.empty(80_000) for _ in range(self.ANCHORS)] if _LIBC else []

    def after_block(self) -> None:
        if not _LIBC:
            return
        rss, free = rss_bytes(), heap_free_bytes()
        if rss is not None and free is not None and self.reference is None:
            if HeapKeeper.process_allowance is None:
                HeapKeeper.process_allowance = max(free // 2, self.slack)
            self.reference, self.allowance = rss, HeapKeeper.process_allowance
        elif rss is None or free is None or rss > self.reference + self.allowance:
            release_memory()
            self.trims += 1


def release_memory() -> None:
    """Give the heap's free memory back to the OS now (``malloc_trim``)."""
    if _LIBC:
        _LIBC[0].malloc_trim(0)


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


@dataclass
class BlockInputs:
    """Per batch: the hidden states plus every other argument the model gave block 0."""

    hidden: list[torch.Tensor]
    args: list[tuple]  # positional arguments after the hidden states
    kwargs: list[dict]
    hidden_in_kwargs: bool
    # per block index, per batch size: keyword arguments that differ from block 0's (e.g. the
    # sliding-window mask of models that mix attention types); filled by ``probe_block_kwargs``
    overrides: dict = field(default_factory=dict)
    block_index: int = 0  # which block's overrides ``call`` applies

    def call(self, block: nn.Module, i: int, device, raw: bool = False):
        """Run ``block`` on batch i; the hidden states out (``raw=True``: the block's own return value)."""
        h = self.hidden[i].to(device, non_blocking=True)
        args, kwargs = _to(self.args[i], device), _to(self.kwargs[i], device)
        extra = self.overrides.get(self.block_index, {}).get(h.shape[0])
        if extra:
            kwargs = dict(kwargs, **_to(extra, device))
        out = block(*args, hidden_states=h, **kwargs) if self.hidden_in_kwargs else block(h, *args, **kwargs)
        if raw:
            return out
        return out[0] if isinstance(out, (tuple, list)) else out

    def store(self, i: int, out: torch.Tensor) -> None:
        """Make ``out`` batch i's hidden states: copied into the buffer the batch already has when shape and dtype
        match, so the long-lived hidden states keep their place in memory block after block and the block pass's
        temporaries free the same holes each time (replacing the buffer by ``out``, allocated amid those
        temporaries, fragmented the heap: it grew by about 0.3 GB a block in a 64 x 512 SmolLM2 prune)."""
        h = self.hidden[i]
        if out is not h and out.shape == h.shape and out.dtype == h.dtype:
            h.copy_(out)
        else:
            self.hidden[i] = out.to(h.device)

    @property
    def n_batches(self) -> int:
        return len(self.hidden)


def non_block_modules(model: nn.Module, blocks: nn.ModuleList):
    inside = {id(m) for m in blocks.modules()}
    for m in model.modules():
        if id(m) in inside:
            continue
        if any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.buffers(recurse=False)):
            yield m


@contextlib.contextmanager
def non_blocks_on(model: nn.Module, blocks: nn.ModuleList, device):
    """Temporarily move the modules outside the blocks (embeddings, rotary tables, final norm, head) to
    ``device``; each goes back into its own memory (prunekit.offload)."""
    with contextlib.ExitStack() as stack:
        for m in list(non_block_modules(model, blocks)):  # only their own tensors: a parent keeps its children
            stack.enter_context(on_device(m, device, recurse=False))
        yield


@torch.no_grad()
def capture_inputs(model: nn.Module, blocks: nn.ModuleList, input_ids: torch.Tensor, batch_size: int,
                   device, store_device) -> BlockInputs:
    """Run the model on the windows until block 0 and keep all of block 0's arguments."""
    seen: dict = {}

    def pre(_mod, args, kwargs):
        seen["args"], seen["kwargs"] = args, kwargs
        raise StopForward

    hidden, rest, kws = [], [], []
    hidden_in_kwargs = False
    handle = blocks[0].register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with non_blocks_on(model, blocks, device):  # embeddings, rotary tables, final norm: small
            for s in range(0, input_ids.shape[0], batch_size):
                try:
                    model(input_ids[s:s + batch_size].to(device), use_cache=False)
                except StopForward:
                    pass
                args, kwargs = seen["args"], dict(seen["kwargs"])
                if args:
                    h, args = args[0], tuple(args[1:])
                else:
                    h, hidden_in_kwargs = kwargs.pop("hidden_states"), True
                hidden.append(h.to(store_device))
                rest.append(_to(args, store_device))
                kws.append(_to(kwargs, store_device))
    finally:
        handle.remove()
    return BlockInputs(hidden, rest, kws, hidden_in_kwargs)


@torch.no_grad()
def probe_block_kwargs(model: nn.Module, blocks: nn.ModuleList, inputs: BlockInputs, input_ids: torch.Tensor,
                       device, store_device) -> None:
    """Record, for every block, the keyword arguments the model passes it that differ from block 0's.

    Most models give every block the same objects (rotary tables, one mask); models that mix attention
    types (sliding-window and full layers) give some blocks another mask. One forward per batch size runs
    with every block replaced by a pass-through recorder (no block computes; the forward stops after the
    last block, before the LM head). The pass-through returns the same structure as the real block,
    learnt from one real call of block 0.
    """
    if len(blocks) < 2:
        return
    with on_device(blocks[0], device):
        template = _output_template(blocks[0], inputs, device)
    sizes = {}
    start = 0
    for h in inputs.hidden:  # first batch of every size
        sizes.setdefault(h.shape[0], start)
        start += h.shape[0]
    recorded: dict[int, dict] = {}

    def recorder(j):
        def forward(*args, **kwargs):
            recorded[j] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            if j == len(blocks) - 1:
                raise StopForward
            h = args[0] if args else kwargs["hidden_states"]
            return (h,) + tuple(template[1:]) if isinstance(template, (tuple, list)) else h
        return forward

    for block_i, block in enumerate(blocks):
        block.forward = recorder(block_i)
    try:
        with non_blocks_on(model, blocks, device):
            for size, first in sizes.items():
                recorded.clear()
                try:
                    model(input_ids[first:first + size].to(device), use_cache=False)
                except StopForward:
                    pass
                base = recorded.get(0, {})
                for j in range(1, len(blocks)):
                    diff = {k: v for k, v in recorded.get(j, {}).items() if base.get(k, _MISSING) is not v}
                    if diff:
                        inputs.overrides.setdefault(j, {})[size] = _to(diff, store_device)
    finally:
        for block in blocks:
            del block.forward


_MISSING = object()


def _batch_slice(obj, n: int):
    """Every tensor in ``obj`` (nested tuples, lists, dicts) whose first dimension is ``n`` cut to its first row."""
    if isinstance(obj, torch.Tensor):
        return obj[:1] if obj.dim() and obj.shape[0] == n else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_batch_slice(o, n) for o in obj)
    if isinstance(obj, dict):
        return {k: _batch_slice(v, n) for k, v in obj.items()}
    return obj


def _output_template(block: nn.Module, inputs: BlockInputs, device):
    """What ``block`` returns (a tensor, or a tuple whose first item is the hidden states), from one call on the
    first sample of batch 0: only the structure is used (``probe_block_kwargs``), and a call on all of batch 0
    costs a full block pass (1.1 s of a 64 x 512 SmolLM2 prune). A cut that the block refuses (some argument whose
    first dimension was not the batch after all) falls back to the whole batch."""
    n = inputs.hidden[0].shape[0]
    if n > 1:
        one = BlockInputs([inputs.hidden[0][:1]], [_batch_slice(inputs.args[0], n)],
                          [_batch_slice(inputs.kwargs[0], n)], inputs.hidden_in_kwargs)
        try:
            out = one.call(block, 0, device, raw=True)
            h = out[0] if isinstance(out, (tuple, list)) else out
            if isinstance(h, torch.Tensor) and h.shape == one.hidden[0].shape:
                return out
        except Exception:  # noqa: BLE001 - any refusal of the cut: the whole batch below
            pass
    return inputs.call(block, 0, device, raw=True)


def _stages(block, layers: dict[str, nn.Module], inputs: BlockInputs, device) -> tuple[list[list[list[str]]], list[str]]:
    """Group layers by execution order: layers reading the same input tensor share a group (one ``LayerStats``);
    consecutive groups of one stage of an experts module (every expert's gate/up, or every expert's down: each
    computed from the module's input alone, :mod:`prunekit.core.experts`) form one stage, any other group is a stage
    of its own. Returns (stages as lists of groups, layers the forward never called)."""
    order: list[tuple[str, tuple, object]] = []
    alive: list[torch.Tensor] = []  # hold the inputs so that no later tensor can reuse their memory address
    hooks = []
    for name, mod in layers.items():
        def pre(_m, args, _name=name):
            if not any(n == _name for n, _, _ in order):
                x = args[0]
                alive.append(x)
                order.append((_name, (x.data_ptr(), tuple(x.shape), tuple(x.stride())),
                              _m.stage if isinstance(_m, ExpertMatrix) else None))
        hooks.append(mod.register_forward_pre_hook(pre))
    try:
        with torch.no_grad():
            inputs.call(block, 0, device)
    finally:
        for h in hooks:
            h.remove()
    groups: list[list[str]] = []
    group_stage: list[object] = []
    last_key = None
    for name, key, stage in order:
        if groups and key == last_key:
            groups[-1].append(name)
        else:
            groups.append([name])
            group_stage.append(stage)
        last_key = key
    stages: list[list[list[str]]] = []
    for i, g in enumerate(groups):
        if stages and group_stage[i] is not None and group_stage[i] == group_stage[i - 1]:
            stages[-1].append(g)
        else:
            stages.append([g])
    return stages, [n for n in layers if not any(n in g for g in groups)]


class _SameInput:
    """Remembers the last input tensor a layer's statistics were gathered from, so that the next layer
    reading the very same tensor object, unmodified (q/k/v after the attention norm, gate/up after the
    MLP norm), gets the same ``LayerStats`` instead of a second accumulation (see ``run_block``). Holds a
    weak reference only: the input is never kept alive by it."""

    def __init__(self):
        self._ref, self._version, self.stats = None, None, None

    def get(self, x: torch.Tensor) -> LayerStats | None:
        same = self._ref is not None and self._ref() is x and _version(x) == self._version
        return self.stats if same else None

    def set(self, x: torch.Tensor, stats: LayerStats) -> None:
        self.release()
        self._ref, self._version, self.stats = weakref.ref(x), _version(x), stats

    def release(self) -> None:
        """The remembered statistics' layers are all handled: drop what handlers cached on them."""
        if self.stats is not None:
            self.stats.cache.clear()


def _version(x: torch.Tensor) -> int | None:
    """The tensor's in-place modification counter (None for inference-mode tensors, which have none)."""
    try:
        return x._version
    except RuntimeError:
        return None


Handle = Callable[[str, nn.Module, LayerStats], None]


@torch.no_grad()
def run_block(block: nn.Module, layers: dict[str, nn.Module], inputs: BlockInputs, needs: frozenset[str],
              handle: Handle, device, sequential: bool = True, update_inputs: bool = True,
              max_last_tokens: int = 256, tokens_per_sample: int = 1) -> None:
    """Collect statistics, call ``handle`` for every layer, then replace ``inputs.hidden`` by the
    block's outputs after pruning (when ``update_inputs``).

    Layers that read the same input tensor are handed one shared ``LayerStats``,
    accumulated once (the statistics are functions of the input alone; handlers only read them). For a
    LLaMA block this is 4 accumulations instead of 7: the Hessians of q/k/v and of gate/up are one each
    (SparseGPT's X^T X is the dominant cost of a CPU prune), and 4 Hessians are held instead of 7."""
    new_stats = lambda name: LayerStats(needs, in_features(layers[name]), max_last_tokens=max_last_tokens,  # noqa: E731
                                         tokens_per_sample=tokens_per_sample)

    def outputs_pass():
        for i in range(inputs.n_batches):
            out = inputs.call(block, i, device)
            if update_inputs:
                inputs.store(i, out)

    if sequential and inputs.n_batches == 1:
        # single pass: each layer is pruned in its own pre-hook, just before it runs on all samples
        hooks = []
        done = set()
        last = _SameInput()
        for name, mod in layers.items():
            def pre(m, args, _name=name):
                if _name in done:
                    return
                st = last.get(args[0])
                if st is None:
                    st = new_stats(_name)
                    st.update(*args)
                    last.set(args[0], st)
                handle(_name, m, st)
                done.add(_name)
            hooks.append(mod.register_forward_pre_hook(pre))
        try:
            outputs_pass()
        finally:
            for h in hooks:
                h.remove()
            last.release()
        for name in layers:  # never called by the forward: prune from weights alone
            if name not in done:
                handle(name, layers[name], new_stats(name))
        return

    # several batches: share groups (layers reading one input tensor) found on batch 0; layers it never
    # called get their own statistics (they may run on later batches, e.g. experts)
    if needs:
        stages, uncalled = _stages(block, layers, inputs, device)
    else:
        stages, uncalled = [], list(layers)
    late = [[n] for n in uncalled]
    if sequential:  # one pass per stage, each stopped once its layers have run; the uncalled ones last
        passes = list(stages) + ([late] if late else [])
    else:  # the Wanda paper's protocol: every layer's statistics from the dense block, one pass
        passes = [[g for st in stages for g in st] + late]
    for pi, groups in enumerate(passes):
        stats = {g[0]: new_stats(g[0]) for g in groups}
        hooks = [layers[g[0]].register_forward_pre_hook(lambda m, a, _s=stats[g[0]]: _s.update(*a)) for g in groups]
        names = [n for g in groups for n in g]
        stop_early = sequential and pi < len(passes) - 1
        seen: set[int] = set()
        if stop_early:  # stop the forward once every layer of this stage has run

            def post(m, a, o):
                seen.add(id(m))
                if len(seen) == len(names):
                    raise StopForward

            hooks += [layers[n].register_forward_hook(post) for n in names]
        try:
            for i in range(inputs.n_batches if needs else 0):
                seen.clear()
                try:
                    inputs.call(block, i, device)
                except StopForward:
                    pass
        finally:
            for h in hooks:
                h.remove()
        for g in groups:
            for name in g:
                handle(name, layers[name], stats[g[0]])
            stats[g[0]].cache.clear()
    outputs_pass()


def auto_batch_size(model, n: int, seqlen: int, device, fraction: float = 0.4) -> int:
    """All samples in one batch (one pass per block) when their activations fit in ``fraction`` of the
    free memory, else the largest batch that does."""
    per_sample = activation_bytes_per_token(model) * seqlen
    return int(max(1, min(n, (fraction * free_memory(device)) // max(per_sample, 1))))


Step = Callable[[int, nn.Module, BlockInputs], None]


@torch.no_grad()
def walk_blocks(model: nn.Module, input_ids: torch.Tensor, device, step: Step, batch_size: int | None = None,
                offload: bool | None = None, stop: int | None = None, desc: str = "blocks",
                on_block_done: Callable[[int], None] | None = None) -> BlockInputs:
    """The one block walker: capture block 0's inputs on ``input_ids`` (batches of ``batch_size``, default all),
    then for each block ``b < stop`` move it to ``device`` (and back into its own memory afterwards,
    :func:`prunekit.core.offload.on_device`) and call ``step(b, block, inputs)``, which runs the block and
    replaces ``inputs.hidden`` by its outputs. Hidden states wait where :func:`store_device` says. Returns the
    inputs: ``hidden`` is then the stream entering block ``stop``."""
    device = torch.device(device)
    tune_malloc()
    release_memory()  # start from the memory in use: see HeapKeeper
    heap = HeapKeeper()  # before the first allocation of the walk (its anchors)
    blocks = get_blocks(model)
    stop = len(blocks) if stop is None else stop
    store = store_device(model, input_ids, device, offload)
    batch_size = min(batch_size or input_ids.shape[0], max(1, input_ids.shape[0]))
    inputs = capture_inputs(model, blocks, input_ids, batch_size, device, store)
    probe_block_kwargs(model, blocks, inputs, input_ids, device, store)
    if store.type == "cpu" and device.type == "cuda":
        inputs.hidden = [h.pin_memory() for h in inputs.hidden]
    for b in tqdm(range(stop), desc=desc, unit="block", leave=False):
        interrupts.check()  # a stop whose KeyboardInterrupt was swallowed somewhere still stops the run
        inputs.block_index = b
        with on_device(blocks[b], device):
            step(b, blocks[b], inputs)
        if on_block_done:
            on_block_done(b)
        heap.after_block()
    log.debug("heap trimmed after %d of %d blocks", heap.trims, stop)
    return inputs


@torch.no_grad()
def run_blocks(model: nn.Module, input_ids: torch.Tensor, visit=None, device="cpu", batch_size=None,
               stop: int | None = None, block_hooks=None, desc: str = "blocks") -> BlockInputs:
    """Run blocks 0..stop-1 on all windows with the block walker, nothing pruned: ``visit(b, h_in, h_out)`` per
    block and batch; ``block_hooks(b, block)`` returns hook handles held while block b runs. Returns the walker's
    inputs, whose ``hidden`` is then the stream entering block ``stop``."""
    device = torch.device(device)

    def step(b, block, inputs):
        hooks = block_hooks(b, block) if block_hooks else []
        try:
            for i in range(inputs.n_batches):
                out = inputs.call(block, i, device)
                if visit is not None:
                    visit(b, inputs.hidden[i].to(device), out)
                inputs.store(i, out)
        finally:
            for h in hooks:
                h.remove()

    return walk_blocks(model, input_ids, device, step, batch_size, stop=stop, desc=desc)


def iterate_blocks(model: nn.Module, blocks: nn.ModuleList, block_layers: list[dict[str, nn.Module]],
                   input_ids: torch.Tensor, needs: frozenset[str], handle: Handle, device="cpu",
                   batch_size: int | None = None, sequential: bool = True, offload: bool | None = None,
                   desc: str = "pruning", on_block_done: Callable[[int], None] | None = None,
                   max_last_tokens: int = 256, tokens_per_sample: int = 1) -> None:
    """The engine: walk the blocks, gather the ``needs`` statistics of every layer and call
    ``handle(name, module, stats)`` on it (:func:`run_block`). Under torchrun each rank takes a slice of the
    windows and the statistics are summed over ranks before ``handle`` (:mod:`prunekit.core.distributed`)."""
    device = torch.device(device)
    batch_size = batch_size or auto_batch_size(model, input_ids.shape[0], input_ids.shape[1], device)
    input_ids = distributed.shard(input_ids)  # data-parallel: each rank a slice, statistics all-reduced
    handle = distributed.wrap_handle(handle)

    def step(b, block, inputs):
        run_block(block, block_layers[b], inputs, needs, handle, device, sequential,
                  max_last_tokens=max_last_tokens, tokens_per_sample=tokens_per_sample)

    inputs = walk_blocks(model, input_ids, device, step, batch_size, offload, len(blocks), desc, on_block_done)
    del inputs
    release_memory()
