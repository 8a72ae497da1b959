"""Does ``auto``'s proxy rank allocations as the full prune does? (Qwen2.5-Coder-0.5B, Wanda 70%.)

    python -m bench.auto_proxy            # about 15 minutes on the 2-core CPU

``eps=auto`` chose AlphaPruning's eps 0.2 on Qwen where uniform is better on WikiText-2 and on C4. This prunes
uniform and AlphaPruning (eps 0.3) with the proxy's 16 calibration windows and with the protocol's 32, and measures
each on the proxy's 8 held-out windows (C4, seed 1000, as prunekit.pruning.auto draws them), on 32 such windows, and
on protocol qwen05-c4's C4 evaluation windows. Writes bench/results/auto_proxy.json.
"""
from __future__ import annotations

from bench.lib.env import environment
from bench.lib.models import ProtocolModel
from bench.lib.protocols import PROTOCOLS
from bench.lib.results import RESULTS, merge_results
from prunekit.core.data import calibration_windows
from prunekit.core.nll import nll_of_windows


def main():
    proto = dict(PROTOCOLS["qwen05-c4"])
    pm = ProtocolModel(proto["model"], proto, "cpu")
    held8 = calibration_windows(pm.tok, "c4", 8, proto["seqlen"], proto["seed"] + 1000)
    held32 = calibration_windows(pm.tok, "c4", 32, proto["seqlen"], proto["seed"] + 1000)
    out = {}
    for n in (16, 32):
        for alloc in ({}, {"allocation": "alphapruning"}):
            pm.prune({"metric": "wanda", "sparsity": 0.7, **alloc}, calib_ids=pm.calib[:n])
            key = f"calib {n} {alloc.get('allocation', 'uniform')}"
            out[key] = {"proxy_8_heldout_nll": float(nll_of_windows(pm.model, held8, "cpu", batch_size=4).mean()),
                        "heldout_32_nll": float(nll_of_windows(pm.model, held32, "cpu", batch_size=4).mean()),
                        "c4_eval_ppl": pm.evaluate()["ppl"]}
            print(key, out[key], flush=True)
    merge_results(RESULTS / "auto_proxy.json", {"qwen05 wanda 70%": {"protocol": proto, "runs": out,
                                                                   "environment": environment()}})


if __name__ == "__main__":
    main()
