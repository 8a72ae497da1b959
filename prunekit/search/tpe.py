"""TPE search (Optuna) of per-group sparsity and per-layer KV-cache bit-widths.

Search space (the paper's defaults): the blocks are split into ``n_groups`` (8) contiguous groups; group
g's sparsity is in ``[S - delta, S + delta]`` on a grid of ``step`` (0.05, 0.025). The per-layer ratios
are then rescaled by :func:`prunekit.allocate.finalize` so that *every* trial is exactly at the target
S (our choice: the paper instead discards trials under the target, which wastes trials and lets the
result overshoot S). With ``kv=True`` every block's attention gets a KV-cache bit-width in
``kv_bits`` (2..8).

KV-cache fake quantisation (:func:`kv_quant_hooks`): forward hooks on the key and value projections
(``k_proj``/``v_proj``; GPT-2's fused ``c_attn`` and GPT-NeoX's ``query_key_value`` on their key and
value slices) replace their outputs by ``dequant(quant(x))``: per token and per head (groups of
``head_dim`` values), asymmetric min-max quantisation to b bits::

    scale = (max - min) / (2^b - 1);  q = clamp(round((x - min) / scale), 0, 2^b - 1);  x~ = q * scale + min

Keys are quantised *before* RoPE (the projection output); a real cache stores keys after RoPE, a
rotation, so the error is of the same size but not identical (documented approximation).
Memory: a quantised element costs ``b`` bits plus, per group of ``head_dim`` values, an fp16 scale and
an fp16 minimum (``32 / head_dim`` bits per element); the fp16 cache costs 16 bits. The memory budget
``kv_budget`` is the allowed fraction of the fp16 KV-cache memory (default ``auto``: what a uniform 4-bit cache
takes, :func:`check_kv_setup`; or a number such as 0.3); trials above it are
infeasible: they are not evaluated (value inf) and Optuna's ``constraints_func`` tells TPE so.
The objective is the held-out perplexity of the pruned model with the fake-quantised cache.

Checkpoint/resume: the study lives in ``sqlite:///<out_dir>/tpe.db`` (Optuna's RDB storage), every
finished trial is committed. On resume, trials left RUNNING by a ``kill -9`` are marked FAIL and
redone. The sampler is re-created before each trial with the seed ``seed * 100003 + (number of
completed trials)``, so a trial's parameters depend only on the seed and the completed trials: a
resumed search continues exactly like an uninterrupted one. ``budget`` counts evaluated (feasible)
trials; infeasible ones are free (at most ``20 * budget`` trials in all).
"""
from __future__ import annotations

import math
import time
import warnings
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..allocate import finalize
from ..errors import PrunekitError
from ..models.families import get_blocks

STUDY = "prunekit-tpe"


# ----------------------------------------------------------------------------- KV-cache fake quantisation
def fake_quant(x: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Per-group (last dim split into groups of ``group``) asymmetric min-max fake quantisation."""
    if bits >= 16:
        return x
    shape = x.shape
    xf = x.float().reshape(*shape[:-1], shape[-1] // group, group)
    lo = xf.amin(-1, keepdim=True)
    hi = xf.amax(-1, keepdim=True)
    levels = 2 ** int(bits) - 1
    scale = (hi - lo) / levels
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = ((xf - lo) / safe).round().clamp(0, levels)
    out = torch.where(scale > 0, q * safe + lo, xf)
    return out.reshape(shape).to(x.dtype)


def _attn_dims(model) -> tuple[int, int, int]:
    """(head_dim, number of kv heads, number of attention heads)."""
    c = model.config
    heads = getattr(c, "num_attention_heads", None) or getattr(c, "n_head")
    hidden = getattr(c, "hidden_size", None) or getattr(c, "n_embd")
    head_dim = getattr(c, "head_dim", None) or hidden // heads
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    return int(head_dim), int(kv_heads), int(heads)


def kv_modules(model) -> list[list[tuple[str, torch.nn.Module]]]:
    """Per block, the modules whose outputs hold keys/values, with their kind:
    ``k``/``v`` (separate projections), ``gpt2`` (fused c_attn: [q | k | v]), ``neox`` (fused per head)."""
    out = []
    for b, block in enumerate(get_blocks(model)):
        found = []
        for name, m in block.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("k_proj", "v_proj"):
                found.append((leaf[0], m))
            elif leaf == "c_attn":
                found.append(("gpt2", m))
            elif leaf == "query_key_value":
                found.append(("neox", m))
        if not found:
            raise PrunekitError(f"KV-cache quantisation: no key/value projection found in block {b} "
                                f"({model.config.model_type})")
        out.append(found)
    return out


def kv_quant_hooks(model, bits: list[int]) -> list:
    """Install forward hooks fake-quantising keys and values of block b to ``bits[b]`` bits.
    Returns the hook handles (call ``.remove()`` on each)."""
    head_dim, kv_heads, heads = _attn_dims(model)
    mods = kv_modules(model)
    if len(bits) != len(mods):
        raise PrunekitError(f"{len(bits)} KV bit-widths for {len(mods)} blocks")
    handles = []
    for b, found in enumerate(mods):
        nb = int(bits[b])
        for kind, m in found:
            if kind in ("k", "v"):
                hook = lambda mod, a, o, _b=nb: fake_quant(o, _b, head_dim)  # noqa: E731
            elif kind == "gpt2":
                def hook(mod, a, o, _b=nb):
                    d = o.shape[-1] // 3
                    return torch.cat([o[..., :d], fake_quant(o[..., d:], _b, head_dim)], -1)
            else:
                def hook(mod, a, o, _b=nb):
                    v = o.reshape(*o.shape[:-1], heads, 3, head_dim)
                    kvq = fake_quant(v[..., 1:, :], _b, head_dim)
                    return torch.cat([v[..., :1, :], kvq], -2).reshape(o.shape)
            handles.append(m.register_forward_hook(hook))
    return handles


def kv_memory_fraction(model, bits: list[int]) -> float:
    """KV-cache memory with these bit-widths / fp16 KV-cache memory (scales and minima included)."""
    head_dim, _, _ = _attn_dims(model)
    overhead = 32.0 / head_dim
    return sum(min(16.0, b + overhead) if b < 16 else 16.0 for b in bits) / (16.0 * len(bits))


def kv_cache_bytes_per_token(model, bits: list[int] | None) -> float:
    head_dim, kv_heads, _ = _attn_dims(model)
    per_layer = 2 * kv_heads * head_dim  # keys and values
    if bits is None:
        return per_layer * len(get_blocks(model)) * 2.0
    return per_layer * 2.0 * len(bits) * kv_memory_fraction(model, bits)


# ----------------------------------------------------------------------------- search
KV_AUTO_BITS = 4


def check_kv_setup(model, kv: bool, kv_bits, kv_budget) -> float | None:
    """Validate TPE's KV-cache settings on ``model`` before any work; returns the budget as a number.

    ``kv_budget="auto"`` (default) is the memory of a uniform 4-bit cache (scales and minima included:
    ``(4 + 32 / head_dim) / 16`` of fp16, 0.28 at head_dim 64), so every model has feasible allocations
    whatever its head size; a fixed fraction such as 0.3 has none on a model with head_dim 8 (2 bits already
    cost 0.375 there)."""
    if not kv:
        return None if kv_budget == "auto" else kv_budget
    try:
        kmin, kmax = (int(b) for b in kv_bits)
    except (TypeError, ValueError):
        raise PrunekitError(f"kv_bits must be two integers [min, max], got {kv_bits!r}") from None
    if not 1 <= kmin <= kmax <= 16:
        raise PrunekitError(f"kv_bits must be 1 <= min <= max <= 16, got {kv_bits}")
    kv_modules(model)  # unsupported attention fails here
    nb = len(get_blocks(model))
    smallest = kv_memory_fraction(model, [kmin] * nb)
    if kv_budget == "auto":
        kv_budget = max(smallest, kv_memory_fraction(model, [min(max(KV_AUTO_BITS, kmin), kmax)] * nb))
    if kv_budget is not None and not (isinstance(kv_budget, (int, float)) and not isinstance(kv_budget, bool) and smallest <= kv_budget):
        raise PrunekitError(f"kv_budget {kv_budget!r} is below the smallest KV cache of this model ({kmin} bits: "
                            f"{smallest:.3f} of fp16 at head_dim {_attn_dims(model)[0]}); use kv_budget=auto, a "
                            f"number >= {smallest:.3f}, or kv=false")
    return None if kv_budget is None else float(kv_budget)


def contiguous_groups(n_blocks: int, n_groups: int) -> list[list[int]]:
    n_groups = max(1, min(n_groups, n_blocks))
    base, extra = divmod(n_blocks, n_groups)
    out, s = [], 0
    for g in range(n_groups):
        k = base + (1 if g < extra else 0)
        out.append(list(range(s, s + k)))
        s += k
    return out


def _grid(target: float, delta: float, step: float, max_ratio: float) -> tuple[float, float]:
    lo = max(0.0, target - delta)
    hi = min(max_ratio, target + delta)
    n = int(math.floor((hi - lo) / step + 1e-9))
    return round(lo, 10), round(lo + n * step, 10)


def search_tpe(fitness, summary, target: float, budget: int, out_dir=None, seed: int = 0, resume: bool = True,
               n_groups: int = 8, delta: float = 0.05, step: float = 0.025, kv: bool = True,
               kv_bits: tuple[int, int] = (2, 8), kv_budget: float | str | None = "auto", n_startup_trials: int = 10,
               max_ratio: float = 0.99, progress: bool = True, fingerprint: dict | None = None) -> dict:
    try:
        import optuna
    except ImportError:
        raise PrunekitError("TPE search needs optuna: pip install 'prunekit[search]' (or pip install optuna)") from None
    if budget < 1:
        raise PrunekitError("search budget must be >= 1 evaluation")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    from optuna.trial import TrialState

    model = fitness.model
    nb = summary.n_blocks
    groups = contiguous_groups(nb, n_groups)
    group_of = {b: g for g, bl in enumerate(groups) for b in bl}
    lo, hi = _grid(target, delta, step, max_ratio)
    kmin, kmax = int(kv_bits[0]), int(kv_bits[1])
    kv_budget = check_kv_setup(model, kv, kv_bits, kv_budget)
    numels = summary.numels()
    params = {"n_groups": len(groups), "delta": delta, "step": step, "kv": kv, "kv_bits": [kmin, kmax],
              "kv_budget": kv_budget, "n_startup_trials": n_startup_trials}
    fp = dict(fingerprint or {}, method="tpe", seed=seed, target=float(target), n_blocks=nb, params=params)

    def layer_ratios(gvals) -> dict[str, float]:
        raw = torch.tensor([gvals[group_of[l.block]] for l in summary.layers], dtype=torch.float64)
        r = finalize(raw, numels, target, max_ratio)
        return {l.name: float(v) for l, v in zip(summary.layers, r)}

    def objective(trial):
        gvals = [trial.suggest_float(f"g{g}", lo, hi, step=step) for g in range(len(groups))]
        bits = [trial.suggest_int(f"kv{b}", kmin, kmax) for b in range(nb)] if kv else None
        frac = kv_memory_fraction(model, bits) if kv else 1.0
        trial.set_user_attr("kv_fraction", frac)
        violation = (frac - kv_budget) if (kv and kv_budget is not None) else 0.0
        trial.set_user_attr("constraint", [violation])
        feasible = violation <= 1e-12
        trial.set_user_attr("feasible", feasible)
        if not feasible:
            return math.inf
        return float(fitness.evaluate(layer_ratios(gvals), bits))

    def constraints(frozen):
        return frozen.user_attrs.get("constraint", [0.0])

    storage = None
    path = None
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        path = Path(out_dir) / "tpe.db"
        if not resume and path.exists():
            path.unlink()
        storage = optuna.storages.RDBStorage(f"sqlite:///{path}")
    study = optuna.create_study(storage=storage, study_name=STUDY, direction="minimize", load_if_exists=True)
    import json

    fp_json = json.loads(json.dumps(fp))
    old = study.user_attrs.get("fingerprint")
    if old is None:
        study.set_user_attr("fingerprint", fp_json)
    elif old != fp_json:
        raise PrunekitError(f"study {path} belongs to a different search (method, seed, target, model, data or "
                            "parameters differ); resume with the same settings, start over with --no-resume (resume=False), or use another output folder")
    resumed = None
    if storage is not None:
        sid = storage.get_study_id_from_name(STUDY)
        stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        for t in stale:  # left RUNNING by a kill -9: redo it
            storage.set_trial_state_values(storage.get_trial_id_from_study_id_trial_number(sid, t.number),
                                           TrialState.FAIL)
        done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if done or stale:
            resumed = {"evaluations": sum(1 for t in done if t.user_attrs.get("feasible")), "stale_trials": len(stale)}

    def completed():
        return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))

    t0 = time.time()
    n_eval = lambda ts: sum(1 for t in ts if t.user_attrs.get("feasible"))  # noqa: E731
    baselines = {"dense": float(fitness.evaluate(None)),
                 "uniform": float(fitness.evaluate({l.name: float(target) for l in summary.layers}))}
    if kv:
        fits = [b for b in range(kmin, kmax + 1) if kv_budget is None or kv_memory_fraction(model, [b] * nb) <= kv_budget]
        b_uni = max(fits)
        baselines["uniform_kv"] = {"kv_bits": b_uni, "fitness": float(fitness.evaluate(
            {l.name: float(target) for l in summary.layers}, [b_uni] * nb))}
    ts = completed()
    bar = tqdm(total=budget, initial=min(n_eval(ts), budget), desc="TPE", unit="trial", disable=not progress,
               dynamic_ncols=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna's ExperimentalWarning for multivariate / constraints
            while n_eval(ts) < budget and len(ts) < 20 * budget:
                study.sampler = optuna.samplers.TPESampler(
                    seed=(seed * 100003 + len(ts)) % (2 ** 32), n_startup_trials=n_startup_trials,
                    multivariate=True, constant_liar=False,
                    constraints_func=constraints if (kv and kv_budget is not None) else None)
                study.optimize(objective, n_trials=1, catch=())
                before = n_eval(ts)
                ts = completed()
                if n_eval(ts) > before:
                    bar.update(1)
                    feas = [t.value for t in ts if t.user_attrs.get("feasible")]
                    bar.set_postfix_str(f"trial {len(ts)} best {min(feas):.4g}")
    finally:
        bar.close()

    history, best = [], None
    for i, t in enumerate(ts):
        gv = [t.params[f"g{g}"] for g in range(len(groups))]
        bits = [t.params[f"kv{b}"] for b in range(nb)] if kv else None
        feasible = bool(t.user_attrs.get("feasible"))
        h = {"eval": i + 1, "group_sparsity": gv, "kv_bits": bits, "kv_fraction": t.user_attrs.get("kv_fraction"),
             "feasible": feasible, "fitness": t.value if feasible else None}
        if feasible and (best is None or t.value < best["fitness"]):
            best = dict(h)
        h["best_fitness"] = best["fitness"] if best else None
        history.append(h)
    result = {"method": "tpe", "budget": budget, "evaluations": n_eval(ts), "trials": len(ts), "target": float(target),
              "groups": groups, "params": params, "baselines": baselines, "history": history, "seed": seed,
              "checkpoint": str(path) if path else None, "resumed_from": resumed,
              "seconds": round(time.time() - t0, 2)}
    if best is not None:
        ratios = layer_ratios(best["group_sparsity"])
        first = {}
        for l in summary.layers:
            first.setdefault(l.block, ratios[l.name])
        best["block_ratios"] = [first[b] for b in range(nb)]
        if kv:
            best["kv_memory_saved"] = 1.0 - best["kv_fraction"]
            best["kv_cache_bytes_per_token"] = kv_cache_bytes_per_token(model, best["kv_bits"])
            best["kv_cache_bytes_per_token_fp16"] = kv_cache_bytes_per_token(model, None)
    result["best"] = best
    return result
