"""The benchmark protocols: calibration windows, evaluation windows and evaluation text, by name.

A protocol is a plain dict stored as is in every results file (a file made under another protocol is not
merged with a new run, see :mod:`bench.lib.results`), so existing keys and values must not change."""
from __future__ import annotations

PROTOCOLS = {
    # CPU: seqlen 512, 64 C4 calibration windows, the first 64 WikiText-2 windows
    "S": {"seqlen": 512, "nsamples": 64, "eval_windows": 64, "calib": "c4", "seed": 0},
    # GPU: the papers' protocol, full WikiText-2 test split
    "P": {"seqlen": 2048, "nsamples": 128, "eval_windows": None, "calib": "c4", "seed": 0},
    # S, evaluated on C4 instead: 64 windows of the first 1,100 C4 validation documents (calibration draws from
    # the documents after them), a held-out check on a second text source
    "S-c4": {"seqlen": 512, "nsamples": 64, "eval_windows": 64, "calib": "c4", "seed": 0, "eval": "c4"},
    # across models (CPU): Qwen2.5-Coder-0.5B (630 M parameters, ~4x SmolLM2's time per token) with 32 C4 windows of
    # 512 tokens and the first 32 WikiText-2 windows, so a pipeline takes minutes; SmolLM2 under the same windows,
    # for the side-by-side table. A protocol that names a model is that model's file.
    "qwen05": {"seqlen": 512, "nsamples": 32, "eval_windows": 32, "calib": "c4", "seed": 0,
               "model": "qwen2.5-coder-0.5b"},
    # qwen05 evaluated on C4 (as S-c4): is AlphaPruning's effect on Qwen the evaluation text's?
    "qwen05-c4": {"seqlen": 512, "nsamples": 32, "eval_windows": 32, "calib": "c4", "seed": 0,
                  "model": "qwen2.5-coder-0.5b", "eval": "c4"},
    # GPU: protocol P on Qwen2.5-Coder-1.5B (1.78 B parameters as loaded); its GGUF reaches a device machine in
    # parts (bench/device/prepare_qwen15.sh)
    "qwen15-P": {"seqlen": 2048, "nsamples": 128, "eval_windows": None, "calib": "c4", "seed": 0,
                 "model": "qwen2.5-coder-1.5b"},
    "smollm2-32": {"seqlen": 512, "nsamples": 32, "eval_windows": 32, "calib": "c4", "seed": 0, "model": "smollm2"},
    # mixture of experts (CPU, bench.moe): SmolLM2 upcycled to 8 experts is ~5x its size; 16 C4 windows of 256 tokens
    # and the first 16 WikiText-2 windows of 256
    "moe": {"seqlen": 256, "nsamples": 16, "eval_windows": 16, "calib": "c4", "seed": 0},
}

# evaluation set -> (short name, how its text is built)
EVAL_SETS = {"wikitext2": ("WikiText-2", "WikiText-2 test (rows joined with \\n\\n)"),
             "c4": ("C4", "C4 (the first 1,100 validation documents joined with ' ', disjoint from the calibration "
                    "documents)")}


def eval_set(proto: dict) -> str:
    return proto.get("eval", "wikitext2")


def config_fields(proto: dict) -> dict:
    """The prunekit config fields a protocol fixes: calibration source, windows, their length, the seed."""
    return {k: proto[k] for k in ("calib", "nsamples", "seqlen", "seed")}


def select(name: str | None, device: str) -> tuple[str, dict]:
    """(name, a copy of the protocol): ``name``, or the device's default (P on a GPU, S on the CPU)."""
    name = name or ("P" if device.startswith("cuda") else "S")
    return name, dict(PROTOCOLS[name])
