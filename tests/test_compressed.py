"""The compressed output format (prunekit/pruning/compressed.py): kept values + packed masks, rebuilt exactly."""
import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import prunekit
from prunekit.cli import main
from prunekit.core.errors import PrunekitError
from prunekit.core.families import block_linears, weight_view
from prunekit.pruning.compressed import compress_folder, load_pretrained, to_semi_structured

from conftest import STORIES_HF, TINY_TEXT, tiny_model

CALIB = ["--calib", str(TINY_TEXT), "--nsamples", "4", "--seqlen", "64"]


def _prune_and_save(tmp_path, model, cfg, calib_ids, fmt):
    rep = prunekit.prune(model, None, cfg, calib_ids=calib_ids)
    c = prunekit.make_config(**cfg, save_format=fmt)
    prunekit.save_pruned(model, None, rep, c, tmp_path / fmt)
    return rep


@pytest.mark.parametrize("cfg", [{"metric": "wanda", "sparsity": 0.5}, {"metric": "sparsegpt", "sparsity": 0.7},
                                 {"metric": "wanda", "pattern": "2:4"}], ids=["wanda50", "sparsegpt70", "2:4"])
def test_compressed_rebuilds_the_dense_weights_bit_for_bit(tmp_path, calib_ids, cfg):
    model = tiny_model("llama", hidden=64).to(torch.bfloat16)
    _prune_and_save(tmp_path, model, cfg, calib_ids, "dense")
    _prune_and_save(tmp_path, tiny_model("llama", hidden=64).to(torch.bfloat16), cfg, calib_ids, "compressed")
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense").state_dict()
    rebuilt = load_pretrained(tmp_path / "compressed").state_dict()
    assert dense.keys() == rebuilt.keys()
    for k in dense:
        assert dense[k].dtype == rebuilt[k].dtype == torch.bfloat16 and torch.equal(dense[k], rebuilt[k]), k
    assert not list((tmp_path / "compressed").glob("model.safetensors"))
    with pytest.raises(OSError):  # a plain from_pretrained finds no weights instead of a random model
        AutoModelForCausalLM.from_pretrained(tmp_path / "compressed")


@pytest.mark.parametrize("s,bound", [(0.5, 0.57), (0.7, 0.37)])
def test_bf16_sizes(tmp_path, calib_ids, s, bound):
    """The pruned layers' bytes, read from the written file, against the issue's bounds and the formula
    (1 - s) * 2 + 1/8 bytes per bf16 weight."""
    model = tiny_model("llama", hidden=64).to(torch.bfloat16)
    rep = _prune_and_save(tmp_path, model, {"metric": "wanda", "sparsity": s}, calib_ids, "compressed")
    numel = sum(l["numel"] for l in rep["layers"])
    stored = 0
    with safe_open(str(tmp_path / "compressed" / "model.compressed.safetensors"), "pt") as f:
        for k in f.keys():
            if k.endswith((".kept", ".pruned")):
                t = f.get_tensor(k)
                stored += t.numel() * t.element_size()
    assert stored / (2 * numel) <= bound
    assert stored == pytest.approx(numel * ((1 - s) * 2 + 1 / 8), rel=0.01)
    saved = json.loads((tmp_path / "compressed" / "report.json").read_text())["saved"]
    assert saved["format"] == "compressed" and saved["pruned_compressed_bytes"] == stored


def test_cli_compress_decompress_round_trip(tmp_path, capsys):
    out = tmp_path / "dense"
    assert main(["prune", "--model", str(STORIES_HF), "--metric", "wanda", "--sparsity", "0.6", *CALIB,
                 "--out", str(out)]) == 0
    assert main(["compress", "--model", str(out), "--out", str(tmp_path / "c")]) == 0
    assert "weights identical" in capsys.readouterr().out
    assert main(["verify", "--model", str(tmp_path / "c")]) == 0
    assert "compressed format" in capsys.readouterr().out
    assert main(["decompress", "--model", str(tmp_path / "c"), "--out", str(tmp_path / "d")]) == 0
    a = AutoModelForCausalLM.from_pretrained(out).state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "d").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()
    capsys.readouterr()
    assert main(["compress", "--model", str(tmp_path / "c"), "--out", str(tmp_path / "e")]) == 2
    assert "already compressed" in capsys.readouterr().err
    assert main(["compress", "--model", str(STORIES_HF), "--out", str(tmp_path / "f")]) == 2
    assert "not a prunekit output folder" in capsys.readouterr().err
    assert main(["compress", "--model", str(out), "--out", str(out / "inside")]) == 2


def test_sharded_folders(tmp_path, calib_ids):
    model = tiny_model("llama", hidden=64)
    rep = prunekit.prune(model, None, {"metric": "wanda", "sparsity": 0.5}, calib_ids=calib_ids)
    from prunekit.pruning.save import save_masks

    model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    save_masks(tmp_path / "masks.safetensors", rep.masks, {l["name"]: l["shape"] for l in rep["layers"]})
    compress_folder(tmp_path)
    assert (tmp_path / "model.compressed.safetensors.index.json").is_file()
    rebuilt = load_pretrained(tmp_path)
    for d, r in zip(block_linears(model), block_linears(rebuilt)):
        for n in d:
            assert torch.equal(weight_view(d[n]), weight_view(r[n]))


def test_sparse_kernels_need_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(PrunekitError, match="needs a CUDA GPU"):
        to_semi_structured(tiny_model("llama"))
