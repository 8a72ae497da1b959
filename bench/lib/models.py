"""The models a benchmark runs on, and what a protocol needs of them.

- :func:`load`: SmolLM2 (``smollm2``, prunekit's embedded default), ``stories260K`` (the tiny LLaMA of the shared
  folder, for quick checks of a script), ``llama7b-random`` (a LLaMA-7B-shaped model with random weights, no
  tokenizer: speed and memory only), or any model spec prunekit loads.
- :func:`calibration` and :class:`Evaluation`: a protocol's calibration windows, and perplexity on its
  evaluation windows (token ids computed once).
- :func:`dense_snapshot`: the dense weights of every prunable layer, to prune one loaded model many times.
- :class:`ProtocolModel`: all of the above for one model under one protocol, and a prune of it from dense.
- :func:`correlated_hessian`: a random layer Hessian, for benchmarks of SparseGPT's solver alone.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import prunekit
from prunekit.core.data import calibration_windows, eval_token_ids
from prunekit.core.families import block_linears
from prunekit.core.snapshot import WeightSnapshot
from prunekit.evaluate.perplexity import perplexity

from .paths import shared_dir
from .pipelines import pinned
from .protocols import config_fields, eval_set

RANDOM_LLAMA = "llama7b-random"
LLAMA_VOCAB = 32000
NAMES = {"smollm2": "SmolLM2-135M-Instruct", "qwen2.5-coder-0.5b": "Qwen2.5-Coder-0.5B-Instruct"}


def display_name(spec: str) -> str:
    """A model's name in report titles: SmolLM2's full name, else the spec's last path part."""
    return NAMES.get(spec) or Path(spec).name


def model_path(spec: str) -> str:
    """The spec prunekit loads for a benchmark model name (``stories260K``: the shared folder's copy)."""
    return str(shared_dir() / "models" / "stories260K" / "hf") if spec == "stories260K" else spec


def load(spec: str, dtype: str = "auto", device: str | None = None, blocks: int = 32):
    """(model, tokenizer) in eval mode, on ``device`` when given (else where prunekit loads it: the CPU).
    ``llama7b-random``: ``blocks`` blocks, no tokenizer (None)."""
    if spec == RANDOM_LLAMA:
        if dtype == "auto":
            dtype = "bfloat16" if torch.cuda.is_available() else "float32"
        model = random_llama(blocks, getattr(torch, dtype))
        return (model.to(device) if device else model), None
    return prunekit.load_model(model_path(spec), dtype, device)


def random_llama(blocks: int, dtype, hidden=4096, mlp=11008, heads=32, vocab=LLAMA_VOCAB):
    """A LLaMA with LLaMA-7B's layer shapes, ``blocks`` blocks and N(0, 0.02) weights (norms 1), on the CPU."""
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=blocks, num_attention_heads=heads,
                      num_key_value_heads=heads, vocab_size=vocab, max_position_embeddings=4096)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model = model.to_empty(device="cpu")
    # drawn on the GPU when there is one (7B normals on one CPU thread take minutes), then copied to the CPU
    gen_dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=gen_dev).manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.fill_(1.0)
            else:
                p.copy_((torch.randn(p.shape, generator=g, dtype=torch.float32, device=gen_dev) * 0.02).to(dtype))
    model.model.rotary_emb.__init__(cfg)  # buffers were left empty by to_empty
    model.eval()
    return model


def calibration(tok, proto: dict) -> torch.Tensor:
    """The protocol's calibration windows; without a tokenizer (a random model), seeded random token ids."""
    n, seqlen, seed = proto["nsamples"], proto["seqlen"], proto["seed"]
    if tok is None:
        return torch.randint(0, LLAMA_VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))
    return calibration_windows(tok, proto["calib"], n, seqlen, seed)


class Evaluation:
    """The protocol's evaluation: its text tokenised once; calling it gives a model's token perplexity record
    on the first ``eval_windows`` windows (all when None), from window ``offset`` on."""

    def __init__(self, tok, proto: dict, device, batch_size: int = 4, offset: int = 0):
        self.tok, self.device, self.batch_size = tok, device, batch_size
        self.source, self.seqlen, self.windows = eval_set(proto), proto["seqlen"], proto["eval_windows"]
        self.ids = eval_token_ids(tok, self.source, self.seqlen)[offset * self.seqlen:]

    def __call__(self, model) -> dict:
        return perplexity(model, self.tok, self.source, self.seqlen, self.windows, self.device,
                          batch_size=self.batch_size, ids=self.ids)


def dense_snapshot(model) -> WeightSnapshot:
    """The dense weights and biases of every prunable layer (all a prune changes, block removal aside);
    ``restore()`` also drops biases a metric added (STADE)."""
    return WeightSnapshot({n: m for d in block_linears(model) for n, m in d.items()})


class ProtocolModel:
    """One model under one protocol, pruned many times: loaded once (on ``device``), its dense weights kept, the
    protocol's calibration windows and evaluation prepared once."""

    def __init__(self, spec: str, proto: dict, device: str = "cpu", batch_size: int = 4):
        self.spec, self.proto, self.device = spec, proto, device
        self.model, self.tok = load(spec, device=device)
        self.dense = dense_snapshot(self.model)
        self.calib = calibration(self.tok, proto)
        self.evaluation = Evaluation(self.tok, proto, device, batch_size)

    def evaluate(self) -> dict:
        """The perplexity record of the model as it is now."""
        return self.evaluation(self.model)

    def prune(self, run: dict, calib_ids: torch.Tensor | None = None) -> tuple[dict, float]:
        """Restore the dense weights, prune as ``run`` (prunekit config fields; they override the protocol's) says,
        on the protocol's calibration windows (or ``calib_ids``): (prunekit's report, seconds)."""
        self.dense.restore()
        cfg = prunekit.make_config(**{"model": self.spec, "device": self.device, **config_fields(self.proto),
                                      **pinned(run)})
        t = time.time()
        report = prunekit.prune(self.model, self.tok, cfg, calib_ids=self.calib if calib_ids is None else calib_ids)
        return report, time.time() - t


def correlated_hessian(d: int, g: torch.Generator, device) -> torch.Tensor:
    """H = (2/n) X^T X for n = 2d correlated random inputs (X = Z A, Z and A Gaussian): a dense,
    well-conditioned-enough (d, d) Hessian for SparseGPT's benchmarks."""
    x = torch.randn(2 * d, d, generator=g, device=device) @ (torch.randn(d, d, generator=g, device=device) / d ** 0.5)
    return x.t() @ x * (2.0 / x.shape[0])
