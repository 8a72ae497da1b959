"""Saving a pruned model (prunekit.pruning.save, save_pruned, core/outputs.py's atomic folders): the saved
folder holds exact zeros where the masks say and reloads to the in-memory logits, the input model is
untouched, an existing output is refused without --overwrite and replaced whole with it, and a failed
save leaves no folder."""
import hashlib
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import prunekit
from prunekit.cli import main
from prunekit.core.families import block_linears, weight_view
from prunekit.pruning.save import load_masks

from conftest import STORIES_HF, TINY_TEXT


def folder_digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        if f.is_file():
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def _cli_prune(out, *extra):
    return main(["prune", "--model", str(STORIES_HF), "--metric", "wanda", "--sparsity", "0.5",
                 "--calib", str(TINY_TEXT), "--nsamples", "4", "--seqlen", "64", "--out", str(out), *extra])


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
