"""Bad input gets a clear one-line error and writes nothing; saved models reload exactly."""
import hashlib
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import prunekit
from prunekit.cli import main
from prunekit.core.data import calibration_windows
from prunekit.core.errors import PrunekitError
from prunekit.core.masks import unpack_mask
from prunekit.core.families import block_linears, weight_view
from prunekit.pruning.save import load_masks

from conftest import STORIES_HF, TINY_TEXT, tiny_model


def folder_digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        if f.is_file():
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def test_unknown_metric_lists_valid_ones():
    with pytest.raises(PrunekitError, match=r"unknown metric 'foo'; valid: .*magnitude.*wanda"):
        prunekit.make_config(metric="foo")


@pytest.mark.parametrize("s", [1.0, -0.1, 1.5])
def test_sparsity_out_of_range(s):
    with pytest.raises(PrunekitError, match=r"sparsity must be in \[0, 1\)"):
        prunekit.make_config(sparsity=s)


@pytest.mark.parametrize("pattern,msg", [("4:4", "0 < N < M"), ("5:4", "0 < N < M"), ("2-4", "unknown pattern")])
def test_bad_nm(pattern, msg):
    with pytest.raises(PrunekitError, match=msg):
        prunekit.make_config(pattern=pattern)


def test_nm_dimension_not_divisible(calib_ids):
    model = tiny_model("gpt2", hidden=36)  # 36 % 8 != 0 (GPT-2: no RoPE constraint on the head size)
    with pytest.raises(PrunekitError, match=r"input dimension 36 is not divisible by M=8"):
        prunekit.prune(model, None, {"metric": "wanda", "pattern": "4:8"}, calib_ids=calib_ids)


def test_seqlen_longer_than_context():
    model = tiny_model("llama", ctx=64)
    with pytest.raises(PrunekitError, match=r"seqlen 128 is longer than the model's context \(64 tokens\)"):
        prunekit.prune(model, None, {"metric": "wanda", "seqlen": 128})


def test_unsupported_architecture():
    from transformers import BertConfig, BertLMHeadModel

    model = BertLMHeadModel(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=32, is_decoder=True))
    with pytest.raises(PrunekitError, match=r"unsupported architecture 'bert'; supported model types: .*llama.*opt"):
        prunekit.prune(model, None, {"metric": "magnitude"})


def test_calibration_text_too_short(tmp_path, gpt2_tokenizer):
    f = tmp_path / "short.txt"
    f.write_text("just a few words of text here")
    with pytest.raises(PrunekitError, match=r"calibration text too short: \d+ tokens for 4 samples x 16 tokens"):
        calibration_windows(gpt2_tokenizer, str(f), 4, 16)


def test_unknown_model_path():
    with pytest.raises(PrunekitError, match="model folder not found"):
        prunekit.load_model("./no/such/folder")


def test_unknown_hub_id_offline(monkeypatch):
    """An unknown hub id with the hub offline is one PrunekitError naming the id. huggingface_hub reads
    HF_HUB_OFFLINE once, at import, so the environment variable alone would leave it online (a network
    lookup that retries for ~20 s where there is no network): its constant is patched too."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PrunekitError, match=r"cannot load model 'nobody/no-such-model-xyz'"):
        prunekit.load_model("nobody/no-such-model-xyz")


def _cli_prune(out, *extra):
    return main(["prune", "--model", str(STORIES_HF), "--metric", "wanda", "--sparsity", "0.5",
                 "--calib", str(TINY_TEXT), "--nsamples", "4", "--seqlen", "64", "--out", str(out), *extra])


def test_cli_error_is_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["prune", "--model", str(STORIES_HF), "--metric", "nope", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown metric 'nope'" in err
    assert not out.exists()


def test_existing_output_refused_without_overwrite(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert _cli_prune(out) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "precious"


def test_save_reload_exact_zeros_and_logits(tmp_path):
    before = folder_digest(STORIES_HF)
    out = tmp_path / "pruned"
    assert _cli_prune(out, "--eval", str(TINY_TEXT), "--max-windows", "4") == 0
    assert folder_digest(STORIES_HF) == before  # the input model on disk is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned"]  # no temp folders left
    for f in ("model.safetensors", "masks.safetensors", "recipe.yaml", "report.json", "report.md", "config.json"):
        assert (out / f).is_file(), f
    model = AutoModelForCausalLM.from_pretrained(out)
    masks = load_masks(out / "masks.safetensors")
    for d in block_linears(model):
        for name, mod in d.items():
            W = weight_view(mod)
            assert ((W == 0).sum(1) == W.shape[1] // 2).all()  # Wanda: 50% per row, exactly
            assert torch.equal(W[masks[name]], torch.zeros_like(W[masks[name]]))
    import json

    rep = json.loads((out / "report.json").read_text())
    assert rep["saved"]["overall_sparsity"] == pytest.approx(0.5, abs=1e-9)
    assert rep["protocol"]["seqlen"] == 64 and rep["protocol"]["nsamples"] == 4
    assert rep["eval"][str(TINY_TEXT)]["pruned"]["windows"] == 4
    cfg = prunekit.load_recipe(out / "recipe.yaml")
    assert cfg.metric == "wanda" and cfg.sparsity == 0.5


def test_reloaded_logits_equal_in_memory(tmp_path):
    model, tok = prunekit.load_model(str(STORIES_HF))
    cfg = prunekit.make_config(model=str(STORIES_HF), metric="wanda", sparsity=0.6, calib=str(TINY_TEXT),
                               nsamples=4, seqlen=64)
    report = prunekit.prune(model, tok, cfg)
    prunekit.save_pruned(model, tok, report, cfg, tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    x = torch.randint(0, 512, (2, 32))
    with torch.no_grad():
        assert torch.equal(model(x).logits, again(x).logits)


def test_failed_save_leaves_no_folder(tmp_path):
    model, tok = prunekit.load_model(str(STORIES_HF))
    cfg = prunekit.make_config(metric="magnitude", sparsity=0.5)
    report = prunekit.prune(model, tok, cfg)

    class Broken:
        def save_pretrained(self, path):
            (Path(path) / "partial.json").write_text("{")
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        prunekit.save_pruned(model, Broken(), report, cfg, tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_atomically(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "old.txt").write_text("x")
    assert _cli_prune(out, "--overwrite") == 0
    assert not (out / "old.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_packed_masks_roundtrip():
    from prunekit.core.masks import pack_mask

    m = torch.rand(7, 13) > 0.5
    assert torch.equal(unpack_mask(pack_mask(m), m.shape), m)


@pytest.mark.parametrize("n", [1, 8, 91, 4096])
def test_torch_bit_packing_equals_numpy_packbits(n):
    """pack_bits packs GPU masks on the GPU; here it runs on CPU tensors against numpy's packbits."""
    import numpy as np

    from prunekit.core.masks import pack_bits

    m = torch.rand(n, generator=torch.Generator().manual_seed(n)) > 0.5
    assert torch.equal(pack_bits(m), torch.from_numpy(np.packbits(m.numpy())))


def test_recipe_yaml_and_overrides(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("metric: magnitude\nsparsity: 0.6\npattern: '2:4'\n")
    cfg = prunekit.load_recipe(f, sparsity=0.5)
    assert (cfg.metric, cfg.sparsity, cfg.pattern) == ("magnitude", 0.5, "2:4")
    f.write_text("metric: magnitude\nbogus: 1\n")
    with pytest.raises(PrunekitError, match="bogus"):
        prunekit.load_recipe(f)
