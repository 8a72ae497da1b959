"""Time the ESD power-law fits (AlphaPruning alphas) of every linear matrix of a randomly initialised
model with given shapes; prints one JSON object.

    python -m bench.esd_timing                 # SmolLM2-135M shapes (30 blocks, 576 / 1536, kv 192)
    python -m bench.esd_timing --llama7b       # LLaMA-7B shapes (32 blocks, 4096 / 11008), CUDA if available
    python -m bench.esd_timing --farms         # also time FARMS alphas
    python -m bench.esd_timing --blocks 1 --hidden 64 --mlp 128 --kv 64     # a quick check
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from prunekit.core.esd import farms_fit, spectral_stats_many
from prunekit.core.families import block_linears, weight_view

from bench.lib.env import host
from bench.lib.models import load
from bench.lib.results import RESULTS, merge_results
from bench.lib.timing import sync


def shapes(blocks: int, hidden: int, mlp: int, kv: int) -> dict[str, tuple[int, int]]:
    per = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (kv, hidden), "self_attn.v_proj": (kv, hidden),
           "self_attn.o_proj": (hidden, hidden), "mlp.gate_proj": (mlp, hidden), "mlp.up_proj": (mlp, hidden),
           "mlp.down_proj": (hidden, mlp)}
    return {f"model.layers.{b}.{k}": s for b in range(blocks) for k, s in per.items()}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama7b", action="store_true", help="32 blocks, hidden 4096, MLP 11008, kv 4096")
    ap.add_argument("--blocks", type=int)
    ap.add_argument("--hidden", type=int)
    ap.add_argument("--mlp", type=int)
    ap.add_argument("--kv", type=int)
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--xmin-mode", default="all", choices=["all", "peak"])
    ap.add_argument("--farms", action="store_true", help="also time FARMS alphas (max_side 2000, grid 12)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--real", action="store_true", help="the real SmolLM2 weights instead of random ones")
    ap.add_argument("--save", action="store_true", help="merge the result into bench/results/esd_timing.json")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.llama7b:
        d = dict(blocks=32, hidden=4096, mlp=11008, kv=4096)
    else:
        d = dict(blocks=30, hidden=576, mlp=1536, kv=192)
    for k in d:
        if getattr(a, k) is not None:
            d[k] = getattr(a, k)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    shp = shapes(**d)

    g = torch.Generator(device=device).manual_seed(a.seed)
    t0 = time.perf_counter()
    if a.real:
        model, _ = load("smollm2")
        weights = {n: weight_view(m).to(device) for dd in block_linears(model) for n, m in dd.items()}
        shp = {n: tuple(w.shape) for n, w in weights.items()}
    else:
        weights = {k: torch.randn(s, generator=g, device=device) * 0.02 for k, s in shp.items()}  # N(0, 0.02) init
    sync(device)
    t_init = time.perf_counter() - t0

    t0 = time.perf_counter()
    stats = spectral_stats_many(weights, device=device, xmin_mode=a.xmin_mode)
    sync(device)
    t_alpha = time.perf_counter() - t0
    alphas = [v["alpha"] for v in stats.values()]
    out = {
        "model": "SmolLM2-135M-Instruct (real weights)" if a.real else
                 ("llama7b-shapes (random)" if a.llama7b else "smollm2-135m-shapes (random)"), **d,
        "n_matrices": len(weights), "params": sum(s[0] * s[1] for s in shp.values()),
        "device": str(device),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else host()["processor"]),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "xmin_mode": a.xmin_mode,
        "init_s": round(t_init, 3), "alpha_s": round(t_alpha, 3),
        "alpha_mean": sum(alphas) / len(alphas), "alpha_min": min(alphas), "alpha_max": max(alphas),
    }
    if a.farms:
        t0 = time.perf_counter()
        fa = [farms_fit(w, device=device, xmin_mode=a.xmin_mode).alpha for w in weights.values()]
        sync(device)
        out.update(farms_s=round(time.perf_counter() - t0, 3), farms_alpha_mean=sum(fa) / len(fa))
    print(json.dumps(out))
    if a.save:
        merge_results(RESULTS / "esd_timing.json",
                      {f"{out['model']}|{out['device']}|threads={out['threads']}|farms={a.farms}": out})
    return out


if __name__ == "__main__":
    main()
