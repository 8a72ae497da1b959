"""Why does TRIM's per-layer gain become an end-to-end loss on SmolLM2? Layer-level diagnosis.

    python -m bench.trim_diagnose                    # SmolLM2, Wanda at 50% and 70%, uniform vs TRIM
    python -m bench.trim_diagnose --ablate 0.7 --arms none all all-up_proj   # end to end, protocol G
    python -m bench.trim_diagnose --model stories260K --nsamples 8 --seqlen 128 --heldout 4   # quick check

For every prunable layer of the dense model, prune its weights from dense calibration statistics (the
same 64 x 512 C4 windows as protocol S) twice: Wanda with the uniform per-row ratio, and Wanda with TRIM's
row-wise ratios (the grid proxy's setting: layers see dense inputs). Then compare the two masks on:

  - ``cos_last``: cosine of the flattened outputs on the last-token inputs (the paper's X): TRIM's own
    objective for the 'trim' arm (>= uniform by construction); for 'trim_k8', whose objective uses 8
    positions per sequence, only a subset of its rows; 'trim_all' (prunekit's ``inputs=all``) optimises
    ``cos_calib``, the cosine over every calibration token;
  - ``err_*``: relative output error ``||(W - W_p) X^T||^2 / ||W X^T||^2`` over *all* tokens of three
    input sets: the calibration windows (``calib``), 32 unseen C4 windows (``c4_new``, another seed) and
    the first 32 WikiText-2 evaluation windows (``wiki``, the text perplexity is measured on);
  - ``cos_*``: the flattened-output cosine on the same three sets.
All-token quantities come exactly from each set's second-moment matrix ``H = X^T X`` (``tr(D H D^T)``,
``tr(W H W_p^T)``, ...), so no activations are stored.

If TRIM beats uniform on ``cos_last`` but loses on the all-token errors, its objective (last-token
inputs, scale-free cosine) is the wrong proxy; if it wins on all-token errors too, the end-to-end loss
comes from how errors compose across layers. Results: bench/results/trim_diagnose.{json,md}.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from prunekit.core.blocks import iterate_blocks
from prunekit.core.data import eval_token_ids
from prunekit.core.families import block_linears, get_blocks, weight_view
from prunekit.core.masks import rowwise_mask, unstructured_mask
from prunekit.core.offload import resolve_device
from prunekit.methods.trim import gram_factor, trim_row_sparsity
from prunekit.methods.wanda import wanda

from bench.lib.dense_stats import DenseStats
from bench.lib.env import environment
from bench.lib.models import Evaluation, calibration, load
from bench.lib.protocols import PROTOCOLS
from bench.lib.results import RESULTS, load_results, save_results
from bench.lib.tables import document, table

SETS = ("calib", "c4_new", "wiki")
TOKENS = 8  # TRIM rows per calibration sequence for the second TRIM arm
TRIM_ARMS = ("trim", f"trim_k{TOKENS}", "trim_all")  # the last arm: every calibration token (inputs=all)


def round_sig(v, digits: int = 6):
    """Floats to ``digits`` significant digits (keeps the per-layer results file small)."""
    return float(f"{v:.{digits}g}") if isinstance(v, float) else v


def slim(rows: dict) -> dict:
    """Per-layer records as stored: the errors and TRIM's own cosine (the all-token cosines and pruned
    counts are in the summary / checked by the test), rounded."""
    keep = lambda k: k != "pruned" and not (k.split("/")[-1].startswith("cos_") and k.split("/")[-1] != "cos_last")  # noqa: E731
    return {n: {k: round_sig(v) for k, v in r.items() if keep(k)} for n, r in rows.items()}


def gather(model, ids, needs, device, tokens_per_sample=1) -> dict:
    """Dense-model statistics of every prunable layer on ``ids`` (no pruning)."""
    out = {}
    iterate_blocks(model, get_blocks(model), block_linears(model), ids, frozenset(needs),
                   lambda name, module, st: out.__setitem__(name, st), device, batch_size=8, sequential=False,
                   desc="dense statistics", tokens_per_sample=tokens_per_sample)
    return out


@torch.no_grad()
def output_measures(W: torch.Tensor, Wp: torch.Tensor, H: torch.Tensor) -> tuple[float, float]:
    """(relative squared error, flattened cosine) of the outputs X W_p^T vs X W^T over the tokens of
    ``H = X^T X``, in float64."""
    W, Wp, H = W.double(), Wp.double(), H.double()
    WH = W @ H
    yy = float((WH * W).sum())
    yp = float((WH * Wp).sum())
    pp = float(((Wp @ H) * Wp).sum())
    return (yy - 2 * yp + pp) / yy, yp / (yy * pp) ** 0.5


@torch.no_grad()
def last_cos(W: torch.Tensor, Wp: torch.Tensor, X: torch.Tensor) -> float:
    Y, Yp = (W.double() @ X.double().t()).flatten(), (Wp.double() @ X.double().t()).flatten()
    return float(Y @ Yp / (Y.norm() * Yp.norm()))


def diagnose(model, stats: dict, hess: dict, sparsity: float) -> dict:
    layers = {n: m for d in block_linears(model) for n, m in d.items()}
    rows = {}
    for n, m in layers.items():
        W = weight_view(m).detach().float()
        st = stats[n]
        scores = wanda(W, st)
        X8 = st.last_token_inputs()  # TOKENS rows per sequence, the last one last
        X = X8.view(-1, TOKENS, X8.shape[1])[:, -1]  # the paper's X: the last token of each sequence
        # floor rounding: the per-row rule of TRIM's own total and of every stored result of this diagnosis
        masks = {"uniform": unstructured_mask(scores, sparsity, group="row", exact=False)}
        rec = {}
        for arm, x in zip(TRIM_ARMS, (X, X8, gram_factor(hess["calib"][n]))):
            row_ratios, info = trim_row_sparsity(W, scores, x, sparsity)
            masks[arm] = rowwise_mask(scores, row_ratios)
            rec[f"{arm}/lr"] = info["lr"]
        rec["pruned"] = {k: int(v.sum()) for k, v in masks.items()}
        # where TRIM moves the density: correlation of a row's kept fraction with its output norm
        row_norm = ((W.double() @ hess["calib"][n].double()) * W.double()).sum(1).clamp_min(0).sqrt()
        for arm in TRIM_ARMS:
            keep = 1.0 - masks[arm].double().mean(1)
            rec[f"{arm}/corr_keep_rownorm"] = float(torch.corrcoef(torch.stack([keep, row_norm]))[0, 1]) \
                if float(keep.std()) > 0 else 0.0
        for arm, mask in masks.items():
            Wp = W.masked_fill(mask, 0.0)
            rec[f"{arm}/cos_last"] = last_cos(W, Wp, X)
            for s in SETS:
                err, cos = output_measures(W, Wp, hess[s][n])
                rec[f"{arm}/err_{s}"], rec[f"{arm}/cos_{s}"] = err, cos
        rows[n] = rec
    return rows


def summarise(rows: dict, arm: str) -> dict:
    """Per measure: share of layers where TRIM arm ``arm`` is better than uniform, median relative change."""
    out = {}
    moved = {n: r for n, r in rows.items() if r[f"{arm}/lr"] != 0.0}
    for meas in ["cos_last"] + [f"{k}_{s}" for s in SETS for k in ("err", "cos")]:
        higher_better = meas.startswith("cos")
        wins, changes = 0, []
        for r in moved.values():
            u, t = r[f"uniform/{meas}"], r[f"{arm}/{meas}"]
            if higher_better:
                wins += t > u
                changes.append((1 - t) / (1 - u) - 1 if u < 1 else 0.0)  # change of (1 - cos)
            else:
                wins += t < u
                changes.append(t / u - 1)
        out[meas] = {"trim_better": wins, "layers": len(moved),
                     "median_change": statistics.median(changes) if changes else None,
                     "sum_uniform": sum(r[f"uniform/{meas}"] for r in moved.values()),
                     "sum_trim": sum(r[f"{arm}/{meas}"] for r in moved.values())}
    out["layers_total"] = len(rows)
    out["median_corr_keep_rownorm"] = statistics.median(r[f"{arm}/corr_keep_rownorm"] for r in moved.values()) \
        if moved else None
    by_kind: dict = {}
    for n, r in moved.items():
        d = by_kind.setdefault(kind_of(n), {"layers": 0, "err_wiki_trim_better": 0})
        d["layers"] += 1
        d["err_wiki_trim_better"] += r[f"{arm}/err_wiki"] < r["uniform/err_wiki"]
    out["by_kind"] = by_kind
    return out


def markdown(data: dict) -> str:
    p = data["protocol"]
    lines = ["# Why TRIM's per-layer gain is an end-to-end loss (SmolLM2-135M-Instruct)", "",
             f"Wanda scores from dense statistics of {p['nsamples']} x {p['seqlen']} C4 windows (seed {p['seed']}); "
             f"all-token measures on the calibration windows, {p['heldout']} unseen C4 windows (seed {p['heldout_seed']}) "
             f"and the first {p['heldout']} WikiText-2 evaluation windows. Layers see dense inputs. "
             "Only layers where TRIM moved away from uniform (lr != 0) are counted. "
             "'change' = median relative change of the error, or of (1 - cosine), TRIM vs uniform "
             "(negative = TRIM better).", "",
             f"Arms: 'trim' = the paper's X (last token of each sequence, {p['nsamples']} rows); 'trim_k{TOKENS}' = "
             f"{TOKENS} evenly spaced positions per sequence ({TOKENS * p['nsamples']} rows); 'trim_all' = every "
             f"calibration token ({p['nsamples']} x {p['seqlen']}, through a square-root factor of X^T X; "
             "`--rowwise-param inputs=all`): its own objective is cos_calib.", ""]
    lines += table(["sparsity, arm", "measure", "TRIM better", "median change", "sum uniform", "sum TRIM"],
                   [[s, meas, f"{v['trim_better']}/{v['layers']}", f"{v['median_change']:+.1%}",
                     f"{v['sum_uniform']:.4g}", f"{v['sum_trim']:.4g}"] for s, summ in data["summary"].items() for meas, v in summ.items()
                    if isinstance(v, dict) and "trim_better" in v])
    lines += ["", "Per layer type (WikiText-2 all-token error, TRIM better / layers moved):", ""]
    for s, summ in data["summary"].items():
        kinds = ", ".join(f"{k} {v['err_wiki_trim_better']}/{v['layers']}" for k, v in summ["by_kind"].items())
        lines.append(f"- {s}: {kinds}; median corr(row kept fraction, row output norm) = "
                     f"{summ['median_corr_keep_rownorm']:+.3f}")
    for ab in data.get("ablation", {}).values():
        base = ab["ppl"]["none"]
        off = ab.get("eval_offset", 0)
        lines += ["", f"## End to end: TRIM on some layer kinds only (Wanda {ab['sparsity']:.0%} uniform, "
                  f"WikiText-2 windows {off}-{off + ab['eval_windows'] - 1})", "",
                  "Protocol G (bench/grid.py): pruned from the same dense statistics; TRIM with the paper's X on the "
                  "named kinds ('all-a-b' = all but a and b), plain per-row Wanda elsewhere.", ""]
        lines += table(["TRIM on", "PPL", "vs none"],
                       [[k, f"{v:.1f}", f"{v / base - 1:+.1%}"] for k, v in ab["ppl"].items()])
    lines += ["", "## Reading", "", data.get("reading", "(see NOTES.md)"), "",
              f"Environment: {data['environment']}", f"Seconds: {data['seconds']}"]
    return document(lines)


def kind_of(name: str) -> str:
    """A linear layer's kind: the last part of its module name (q_proj, up_proj, ...)."""
    return name.rsplit(".", 1)[-1]


def arm_kinds(arm: str, kinds: list[str]) -> set[str]:
    """Layer kinds an ablation arm puts TRIM on: 'none', 'all', 'all-a-b' (all but a and b), 'a+b', or one kind.
    Every kind it names must be one of ``kinds`` (a misspelt exclusion would otherwise silently mean 'all')."""
    if arm == "none":
        return set()
    excluded = arm == "all" or arm.startswith("all-")
    named = set(arm.split("-")[1:]) if excluded else set(arm.split("+"))
    if not named <= set(kinds):
        raise SystemExit(f"unknown layer kinds in {arm!r}: {sorted(named - set(kinds))}; known: {sorted(kinds)}")
    return set(kinds) - named if excluded else named


def ablate(model, tok, calib, proto, sparsity: float, eval_windows: int, device, arms=None, offset: int = 0) -> dict:
    """End to end, protocol G (bench/grid.py's dense-statistics proxy): Wanda at ``sparsity`` (uniform) with
    TRIM (the paper's X) on some layer kinds (default: one kind at a time), plain per-row Wanda elsewhere."""
    evaluate = Evaluation(tok, {**proto, "eval": "wikitext2", "eval_windows": eval_windows}, device, offset=offset)
    kinds = sorted({kind_of(n) for d in block_linears(model) for n in d})
    arms = arms or ["none", *kinds, "all"]
    on_of = {arm: arm_kinds(arm, kinds) for arm in arms}  # bad names fail here, before the statistics pass
    cache = DenseStats(model, calib, device)
    ratios = cache.ratios("uniform", sparsity)
    out = {"sparsity": sparsity, "eval_windows": eval_windows, "eval_offset": offset, "ppl": {}}
    for arm in arms:
        # the engine's own switch: TRIM everywhere except the kinds this arm leaves off (plain per-row Wanda there)
        cache.prune({"metric": "wanda", "sparsity": sparsity, "rowwise": "trim", "row_rounding": "floor",  # as stored
                     "rowwise_skip": sorted(set(kinds) - on_of[arm])}, ratios)
        ppl = evaluate(model)["ppl"]
        out["ppl"][arm] = ppl
        print(f"TRIM on {arm}: ppl {ppl:.1f}", flush=True)
    cache.restore()
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--sparsity", type=float, nargs="*", default=[0.5, 0.7])
    ap.add_argument("--heldout", type=int, default=32)
    ap.add_argument("--nsamples", type=int, help="calibration windows (default: protocol S's)")
    ap.add_argument("--seqlen", type=int, help="window length (default: protocol S's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--ablate", type=float, default=None, metavar="SPARSITY",
                    help="instead: end-to-end PPL (protocol G) with TRIM on one layer kind at a time")
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--arms", nargs="*", default=None,
                    help="with --ablate: 'none', 'all', 'all-up_proj' (all but), 'down_proj+q_proj', a kind")
    ap.add_argument("--eval-offset", type=int, default=0,
                    help="with --ablate: evaluate on WikiText-2 windows from this index on (a check on windows "
                         "that did not pick the arms)")
    a = ap.parse_args(argv)
    device = resolve_device(a.device).type
    proto = dict(PROTOCOLS["S"], heldout=a.heldout, heldout_seed=1)
    proto.update({k: v for k, v in (("nsamples", a.nsamples), ("seqlen", a.seqlen)) if v})
    out = RESULTS / "trim_diagnose.json"
    t0 = time.time()
    model, tok = load(a.model, device=device)
    calib = calibration(tok, proto)
    if a.ablate is not None:
        data = load_results(out)
        for k, v in (("protocol", proto), ("summary", {}), ("environment", environment()), ("seconds", None)):
            data.setdefault(k, v)
        res = ablate(model, tok, calib, proto, a.ablate, a.eval_windows, device, a.arms, a.eval_offset)
        key = f"{a.ablate:.2f}" + (f" windows {a.eval_offset}-{a.eval_offset + a.eval_windows - 1}" if a.eval_offset else "")
        prev = data.setdefault("ablation", {}).get(key, {})
        if prev.get("eval_windows") == a.eval_windows:  # same setting: add the new arms to the earlier ones
            res["ppl"] = {**prev["ppl"], **res["ppl"]}
        data["ablation"][key] = dict(res, environment=environment(), seconds=round(time.time() - t0, 1))
        save_results(out, data, markdown)
        return
    seqlen = proto["seqlen"]
    c4_new = calibration(tok, {**proto, "nsamples": a.heldout, "seed": proto["heldout_seed"]})
    wiki = eval_token_ids(tok, "wikitext2", seqlen)[: a.heldout * seqlen].view(a.heldout, seqlen)
    stats = gather(model, calib, {"sq_sum", "hessian", "last_tokens"}, device, tokens_per_sample=TOKENS)
    hess = {"calib": {n: st.hessian for n, st in stats.items()}}
    for name, x in (("c4_new", c4_new), ("wiki", wiki)):
        hess[name] = {n: st.hessian for n, st in gather(model, x, {"hessian"}, device).items()}
    data = {"protocol": proto, "environment": environment(), "layers": {}, "summary": {}}
    for s in a.sparsity:
        rows = diagnose(model, stats, hess, s)
        data["layers"][f"{s:.2f}"] = rows
        for arm in TRIM_ARMS:
            summ = data["summary"][f"{s:.2f} {arm}"] = summarise(rows, arm)
            print(f"{s:.2f} {arm}: " + ", ".join(f"{k} {v['trim_better']}/{v['layers']} {v['median_change']:+.1%}"
                                                for k, v in summ.items() if isinstance(v, dict) and "trim_better" in v),
                  flush=True)
    data["seconds"] = round(time.time() - t0, 1)
    data["layers"] = {s: slim(rows) for s, rows in data["layers"].items()}
    old = load_results(out)
    if "ablation" in old:
        data["ablation"] = old["ablation"]
    save_results(out, data, markdown)


if __name__ == "__main__":
    main()
