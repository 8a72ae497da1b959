"""Fused mixture-of-experts layers: each expert's projections as prunable matrices, and the routing hooks that
hand each of them the tokens the router sends to its expert.

transformers 5 keeps the experts of an MoE layer as 3-D parameters of one module decorated with
``@use_experts_implementation``: ``gate_up_proj`` [E, 2I, H] (or ``up_proj`` [E, I, H] without a gate) and
``down_proj`` [E, H, I]; ``is_transposed`` swaps the last two axes, ``is_concatenated=False`` interleaves the gate
and up rows, ``has_bias`` adds ``*_bias`` [E, out]; its forward takes ``(hidden_states [T, H], top_k_index [T, k],
top_k_weights [T, k])``. Every family that keeps this contract is handled here the same way;
:mod:`prunekit.core.families` says where a family keeps its experts module and its router.

- :class:`ExpertMatrix`: one expert's gate, up or down projection as an (out, in) view into the fused parameter,
  named ``<experts>.<e>.gate_proj`` / ``up_proj`` / ``down_proj`` (a dense MLP's names, so layer patterns such
  as ``*.down_proj`` mean the same in both). It takes ``register_forward_pre_hook`` / ``register_forward_hook``
  like an ``nn.Linear``, so the calibration engine and every statistics pass treat it as any other layer.
- :class:`ExpertGroup` (the matrices of one experts module): while any of its matrices has a hook, a forward
  pre-hook on the experts module reads the routing the module is given and calls the hooks of each expert's
  matrices with the tokens routed to that expert and their :class:`~prunekit.core.stats.Routed` record: first
  gate and up of every expert (one tensor for both, so they share statistics as a dense MLP's gate and up do),
  then every expert's down projection, its input computed from that expert's current (possibly just pruned)
  gate/up weights. One pass of the block gives every expert its statistics; the experts module then runs as
  usual, on the weights the hooks left.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

from .stats import Routed

GATE, UP, DOWN = "gate_proj", "up_proj", "down_proj"
_FLAGS = ("has_gate", "is_transposed", "is_concatenated", "has_bias", "num_experts")


def is_fused_experts(module: nn.Module) -> bool:
    """Whether ``module`` follows the fused experts contract described above."""
    if not all(hasattr(module, f) for f in _FLAGS):
        return False
    fused_in = getattr(module, "gate_up_proj" if module.has_gate else "up_proj", None)
    down = getattr(module, "down_proj", None)
    return (isinstance(fused_in, nn.Parameter) and isinstance(down, nn.Parameter) and fused_in.dim() == 3
            and down.dim() == 3)


class _Handle:
    def __init__(self, remove):
        self._remove = remove

    def remove(self) -> None:
        if self._remove is not None:
            self._remove()
            self._remove = None


class ExpertMatrix:
    """One expert's projection: ``weight`` is an (out, in) view of the fused parameter (in-place edits reach the
    model), ``bias`` the matching view of the fused bias or None. ``stage``: the matrices computed from one input
    of the experts module (every expert's gate/up, or every expert's down) form one stage of the engine."""

    def __init__(self, group: "ExpertGroup", expert: int, proj: str):
        self.group, self.expert, self.proj = group, expert, proj
        self.stage = (id(group.module), "down" if proj == DOWN else "in")

    @property
    def weight(self) -> torch.Tensor:
        return self.group.view(self.expert, self.proj)

    @property
    def bias(self) -> torch.Tensor | None:
        return self.group.bias_view(self.expert, self.proj)

    @property
    def parameter(self) -> nn.Parameter:
        """The fused parameter this matrix is a view of."""
        return self.group.fused(self.proj)

    def register_forward_pre_hook(self, fn) -> _Handle:
        """``fn(matrix, (x, routed))`` before the expert would apply it to its routed tokens x."""
        return self.group.add_hook("pre", self, fn)

    def register_forward_hook(self, fn) -> _Handle:
        """``fn(matrix, (x, routed), None)`` after the pre-hooks (the output is not computed)."""
        return self.group.add_hook("post", self, fn)

    def __repr__(self) -> str:
        return f"ExpertMatrix({type(self.group.module).__name__}[{self.expert}].{self.proj}, {tuple(self.weight.shape)})"


class ExpertGroup:
    """The experts of one fused experts module: views, the routing hooks, expert outputs, expert removal.
    ``parent``: the module whose input still has its (batch, seq, hidden) shape (the MoE block), read for the
    sequence length of the tokens the experts see."""

    def __init__(self, module: nn.Module, parent: nn.Module | None = None):
        self.module, self.parent = module, parent
        self.projections = (GATE, UP, DOWN) if module.has_gate else (UP, DOWN)
        self.matrices = [[ExpertMatrix(self, e, p) for p in self.projections] for e in range(module.num_experts)]
        self._hooks: dict[str, dict[int, list]] = {"pre": {}, "post": {}}
        self._observers: dict[int, object] = {}
        self._installed: list = []
        self._next = 0
        self._seq_len: int | None = None
        self._signature = inspect.signature(type(module).forward)

    @property
    def num_experts(self) -> int:
        return int(self.module.num_experts)

    # ---- views ---------------------------------------------------------------------------------------------
    def fused(self, proj: str) -> nn.Parameter:
        m = self.module
        return m.down_proj if proj == DOWN else (m.gate_up_proj if m.has_gate else m.up_proj)

    def _rows(self, proj: str, n: int):
        """Rows of the (out, in) matrix of expert e's gate_up that belong to ``proj`` (all rows for up-only
        experts and for down)."""
        if proj == DOWN or not self.module.has_gate:
            return slice(None)
        half = n // 2
        if self.module.is_concatenated:
            return slice(0, half) if proj == GATE else slice(half, n)
        return slice(0, None, 2) if proj == GATE else slice(1, None, 2)

    def view(self, e: int, proj: str, source: torch.Tensor | None = None) -> torch.Tensor:
        """Expert e's ``proj`` as an (out, in) view of the fused parameter, or of ``source``, a tensor of the fused
        parameter's shape (e.g. a mask of the whole parameter)."""
        w = (self.fused(proj).data if source is None else source)[e]
        if self.module.is_transposed:
            w = w.t()
        return w[self._rows(proj, w.shape[0])]

    def bias_view(self, e: int, proj: str) -> torch.Tensor | None:
        if not self.module.has_bias:
            return None
        name = ("down_proj" if proj == DOWN else "gate_up_proj" if self.module.has_gate else "up_proj") + "_bias"
        b = getattr(self.module, name).data[e]
        return b[self._rows(proj, b.shape[0])]

    # ---- computing one expert ------------------------------------------------------------------------------
    def _apply(self, x: torch.Tensor, e: int, fused: nn.Parameter, bias_name: str) -> torch.Tensor:
        w = fused[e]
        y = x @ w if self.module.is_transposed else F.linear(x, w)
        if self.module.has_bias:
            y = y + getattr(self.module, bias_name)[e]
        return y

    def hidden(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e's intermediate activations on its tokens x (the input of its down projection)."""
        m = self.module
        if m.has_gate:
            return m._apply_gate(self._apply(x, e, m.gate_up_proj, "gate_up_proj_bias"))
        return m.act_fn(self._apply(x, e, m.up_proj, "up_proj_bias"))

    def output(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e's output on its tokens x, before the routing weight."""
        y = self._apply(self.hidden(e, x), e, self.module.down_proj, "down_proj_bias")
        post = getattr(self.module, "post_expert_norm", None) if getattr(self.module, "has_post_expert_norm", False) \
            else None
        return post(y) if post is not None else y

    # ---- routing -------------------------------------------------------------------------------------------
    def routing(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(hidden [T, H], top_k_index [T, k], top_k_weights [T, k]) from a call of the experts module."""
        hidden, index, weights = list(self._signature.bind(self.module, *args, **kwargs).arguments.values())[1:4]
        hidden = hidden.reshape(-1, hidden.shape[-1])
        return hidden, index.reshape(hidden.shape[0], -1), weights.reshape(hidden.shape[0], -1)

    def counts(self, index: torch.Tensor) -> torch.Tensor:
        """Tokens routed to each expert (int64, length E); index values outside [0, E) (expert-parallel
        sentinels) route nowhere."""
        flat = index.reshape(-1)
        return torch.bincount(flat.clamp(0, self.num_experts), minlength=self.num_experts + 1)[: self.num_experts]

    def split(self, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor, experts=None):
        """Per expert (those in ``experts``, default all) that receives tokens: (e, its tokens' rows of ``hidden``
        in token order, their :class:`Routed` record)."""
        k = index.shape[-1]
        order = torch.argsort(index.reshape(-1), stable=True)
        ends = self.counts(index).cumsum(0).tolist()
        starts = [0] + ends[:-1]
        w = weights.reshape(-1)
        seq = self._seq_len
        for e in range(self.num_experts) if experts is None else experts:
            if ends[e] == starts[e]:
                continue
            sel = order[starts[e]:ends[e]]
            tok = sel // k
            yield e, hidden[tok], Routed(w[sel], tok % seq if seq else tok, seq)

    # ---- hooks ---------------------------------------------------------------------------------------------
    def _install(self) -> int:
        if not self._installed:
            self._installed.append(self.module.register_forward_pre_hook(self._dispatch, with_kwargs=True))
            if self.parent is not None:
                self._installed.append(self.parent.register_forward_pre_hook(self._note_shape))
        self._next += 1
        return self._next

    def _uninstall_if_idle(self) -> None:
        if not self._hooks["pre"] and not self._hooks["post"] and not self._observers:
            for h in self._installed:
                h.remove()
            self._installed.clear()
            self._seq_len = None

    def add_hook(self, kind: str, matrix: ExpertMatrix, fn) -> _Handle:
        hid = self._install()
        self._hooks[kind].setdefault(id(matrix), []).append((hid, matrix, fn))
        return _Handle(lambda: self._remove(kind, id(matrix), hid))

    def observe(self, fn) -> _Handle:
        """``fn(hidden, top_k_index, top_k_weights)`` on every call of the experts module (before it runs)."""
        hid = self._install()
        self._observers[hid] = fn

        def remove():
            self._observers.pop(hid, None)
            self._uninstall_if_idle()
        return _Handle(remove)

    def _remove(self, kind: str, key: int, hid: int) -> None:
        entries = [h for h in self._hooks[kind].get(key, []) if h[0] != hid]
        if entries:
            self._hooks[kind][key] = entries
        else:
            self._hooks[kind].pop(key, None)
        self._uninstall_if_idle()

    def _note_shape(self, _module, args) -> None:
        x = args[0] if args else None
        self._seq_len = int(x.shape[-2]) if isinstance(x, torch.Tensor) and x.dim() >= 3 else None

    def _hooked(self, matrix: ExpertMatrix) -> bool:
        return id(matrix) in self._hooks["pre"] or id(matrix) in self._hooks["post"]

    def _call(self, matrix: ExpertMatrix, args: tuple) -> None:
        for _, m, fn in list(self._hooks["pre"].get(id(matrix), [])):
            fn(m, args)
        for _, m, fn in list(self._hooks["post"].get(id(matrix), [])):
            fn(m, args, None)

    @torch.no_grad()
    def _dispatch(self, _module, args, kwargs):
        hidden, index, weights = self.routing(args, kwargs)
        for fn in list(self._observers.values()):
            fn(hidden, index, weights)
        hooked = [e for e in range(self.num_experts) if any(self._hooked(m) for m in self.matrices[e])]
        inputs = []
        for e, x, routed in self.split(hidden, index, weights, hooked):
            for m in self.matrices[e][:-1]:  # gate and up: the routed tokens themselves
                if self._hooked(m):
                    self._call(m, (x, routed))
            inputs.append((e, x, routed))
        for e, x, routed in inputs:  # down: from the expert's gate/up as they are now
            down = self.matrices[e][-1]
            if self._hooked(down):
                self._call(down, (self.hidden(e, x), routed))
        return None

    # ---- removal -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def keep(self, kept: list[int], router: nn.Module, owner: nn.Module) -> None:
        """Keep only experts ``kept`` (in this order): the fused parameters and biases, the routing state (in every
        parameter or buffer of ``router`` and its submodules and in ``owner``'s own, the MoE block's, the first
        axis of length E: the router weight [E, H], a bias [E], a score correction [1, E] or [E]) and the expert
        counts held by ``owner`` and its submodules (integer attributes named ``*expert*`` equal to E, a router
        ``nn.Linear``'s ``out_features``)."""
        old = self.num_experts
        idx = torch.tensor(kept, dtype=torch.long)

        def cut(t: torch.Tensor) -> torch.Tensor | None:
            axis = next((a for a, n in enumerate(t.shape) if n == old), None)
            return None if axis is None else t.index_select(axis, idx.to(t.device)).contiguous()

        for mod in (self.module, owner, *router.modules()):
            for name, p in list(mod.named_parameters(recurse=False)):
                if (t := cut(p.data)) is not None:
                    setattr(mod, name, nn.Parameter(t, requires_grad=p.requires_grad))
            for name, b in list(mod.named_buffers(recurse=False)):
                if b is not None and (t := cut(b)) is not None:
                    mod._buffers[name] = t
            if isinstance(mod, nn.Linear) and mod.out_features == old:
                mod.out_features = len(kept)
        for mod in owner.modules():
            for name, v in list(vars(mod).items()):
                if "expert" in name and isinstance(v, int) and not isinstance(v, bool) and v == old:
                    setattr(mod, name, len(kept))
        self.matrices = [[ExpertMatrix(self, e, p) for p in self.projections] for e in range(len(kept))]
