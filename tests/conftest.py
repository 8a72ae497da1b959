import os
from pathlib import Path

import pytest
import torch

import prunekit.methods  # noqa: F401  (registers every method, as prunekit.pruning does)

SHARED = Path(os.environ.get("PRUNEKIT_SHARED", Path(__file__).resolve().parents[2] / "shared"))
os.environ.setdefault("PRUNEKIT_DATA_DIR", str(SHARED / "data"))
os.environ.setdefault("PRUNEKIT_TASKS_DIR", str(SHARED / "tasks"))  # the same shared folder as the data and models
STORIES_HF = SHARED / "models" / "stories260K" / "hf"
TINY_TEXT = SHARED / "data" / "TinyStories-valid-excerpt.txt"


def tiny_config(family: str, hidden: int = 32, layers: int = 3, vocab: int = 128, ctx: int = 128):
    import transformers as tf

    if family in ("llama", "mistral", "qwen2"):
        cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config}[family]
        return cls(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=ctx, tie_word_embeddings=False)
    if family == "opt":
        return tf.OPTConfig(vocab_size=vocab, hidden_size=hidden, ffn_dim=2 * hidden, num_hidden_layers=layers,
                            num_attention_heads=4, max_position_embeddings=ctx, word_embed_proj_dim=hidden)
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=ctx)
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4, n_positions=ctx)
    raise ValueError(family)


FAMILIES = ["llama", "mistral", "qwen2", "opt", "gpt_neox", "gpt2"]


# mixture-of-experts model types prunekit supports (transformers 5 fused experts); the first four are the issue's
MOE_TYPES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "phimoe", "minimax_m2", "deepseek_v2", "deepseek_v3",
             "dots1", "glm4_moe", "ernie4_5_moe", "cohere2_moe", "exaone_moe", "solar_open", "granitemoe",
             "granitemoeshared", "gpt_oss"]
_MOE_SIZES = dict(hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=128, max_position_embeddings=128,
                  num_local_experts=4, num_experts=4, n_routed_experts=4, moe_num_experts=4, num_experts_per_tok=2,
                  moe_k=2, shared_expert_intermediate_size=24, n_shared_experts=1, first_k_dense_replace=0,
                  kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, n_group=1,
                  topk_group=1, decoder_sparse_step=1, moe_layer_start_index=0, pad_token_id=0, bos_token_id=1,
                  eos_token_id=2, tie_word_embeddings=False)


def tiny_moe_config(model_type: str, **kw):
    """A tiny random config of an MoE model type: 2 blocks, 4 experts, top-2 (every size the type knows)."""
    from transformers import AutoConfig

    base = AutoConfig.for_model(model_type)
    sizes = dict(_MOE_SIZES, **kw)
    if model_type.startswith("deepseek"):  # multi-head latent attention: as many key/value heads as heads
        sizes["num_key_value_heads"] = sizes["num_attention_heads"]
    return AutoConfig.for_model(model_type, **{k: v for k, v in sizes.items() if hasattr(base, k)})


def tiny_moe(model_type: str, seed: int = 0, dtype=torch.float32, **kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_moe_config(model_type, **kw)).to(dtype)
    if dtype == torch.float64:  # the default grouped_mm experts take float32 / half only
        model.set_experts_implementation("eager")
    model.eval()
    return model


def tiny_model(family: str, seed: int = 0, **kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **kw))
    model.eval()
    return model


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture
def calib_ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 128, (6, 24), generator=g)


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(SHARED / "tokenizers" / "gpt2"))


@pytest.fixture
def one_thread():
    """2 shared CPU cores: OpenMP threads spinning against other processes can slow SVDs 100x."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def check_exact_row_counts(weights: dict, requested: dict, per_row: bool = True) -> None:
    """What ``row_rounding: exact`` promises, checked from the zeros alone: every layer prunes exactly
    ``floor(numel * s)`` weights, and (``per_row``: no row-wise allocator) each row ``floor(total / rows)`` or
    one more."""
    for name, W in weights.items():
        rows, d_in = W.shape
        z = (W == 0).sum(1)
        total = int(rows * d_in * float(requested[name]))
        assert int(z.sum()) == total, (name, int(z.sum()), total)
        if per_row:
            base = total // rows
            assert bool(((z == base) | (z == base + 1)).all()), name


# ----------------------------------------------------------------------------------------------------------
# One random linear layer with correlated inputs, for the metric, solver and statistics tests.

ALL_STATS = frozenset({"sq_sum", "sum", "hessian"})


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


def correlated_inputs(n=2048, d=128, seed=0, mean=0.0):
    """Correlated features: a random mixing of fewer latent factors plus feature-specific noise."""
    import math

    g = generator(seed)
    latent = torch.randn(n, d // 4, generator=g)
    mix = torch.randn(d // 4, d, generator=g) / math.sqrt(d // 4)
    scale = 0.2 + 2.0 * torch.rand(d, generator=g)
    X = latent @ mix + 0.3 * torch.randn(n, d, generator=g)
    return X * scale + mean


def stats_of(X, needs=ALL_STATS, chunks=4):
    """The LayerStats of inputs X, fed in several update() calls, as the engine's hooks do."""
    from prunekit.core.stats import LayerStats

    st = LayerStats(frozenset(needs), X.shape[-1])
    for part in X.chunk(chunks, 0):
        st.update(part)
    return st


def correlated_layer():
    """(W, X, stats): a 64 x 128 weight, 2048 correlated input rows and their statistics."""
    X = correlated_inputs()
    W = torch.randn(64, 128, generator=generator(1))
    return W, X, stats_of(X)


def calib_and_heldout(n_calib=6, n_held=4, seqlen=16):
    """Seeded random token windows for a tiny model: (calibration ids, held-out ids)."""
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 128, (n_calib, seqlen), generator=g), torch.randint(0, 128, (n_held, seqlen), generator=g)


# ----------------------------------------------------------------------------------------------------------
# The layer least-squares problem, brute force: the references of the weight-update and refinement tests.

@pytest.fixture(scope="module")
def lsq_small():
    """(W, X, stats): a 12 x 32 weight, 512 correlated input rows and their statistics."""
    X = correlated_inputs(n=512, d=32, seed=3)
    W = torch.randn(12, 32, generator=generator(4))
    return W, X, stats_of(X)


@pytest.fixture(scope="module")
def lsq_layer():
    """``correlated_layer()``, once per test module."""
    return correlated_layer()


def damped(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """H with the dead diagonal set to 1 and the damping added, in float64 (the objective's matrix)."""
    Hd = H.double().clone()
    dead = ~(Hd.diagonal() > 0)
    Hd[dead, :] = 0
    Hd[:, dead] = 0
    Hd.diagonal()[dead] = 1.0
    Hd.diagonal().add_(percdamp * float(Hd.diagonal().mean()))
    return Hd


def brute_force_optimum(W: torch.Tensor, Hd: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Row by row, the exact least-squares weights on the kept columns (float64 solve)."""
    out = torch.zeros_like(W, dtype=torch.float64)
    for r in range(W.shape[0]):
        K = (~mask[r]).nonzero().flatten()
        if K.numel():
            rhs = (Hd @ W[r].double())[K]
            out[r, K] = torch.linalg.solve(Hd[K][:, K], rhs)
    return out


def objective(W: torch.Tensor, V: torch.Tensor, Hd: torch.Tensor) -> float:
    R = (W.double() - V.double())
    return float(((R @ Hd) * R).sum())
