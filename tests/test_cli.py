"""The command line (prunekit.cli): each subcommand's options reach the code they configure and show up in
the outputs (block removal, calibration selection, zero-shot evaluation, search, row-wise and metric
parameters, the methods listing); bad values are refused before any work, in one line, writing nothing."""
import json

from transformers import AutoModelForCausalLM

from prunekit.cli import main

from conftest import STORIES_HF, TINY_TEXT


def test_remove_blocks_then_prune_saves_a_smaller_model(tmp_path):
    out = tmp_path / "o"
    assert main(["prune", "--model", str(STORIES_HF), "--metric", "wanda", "--sparsity", "0.5", "--remove-blocks", "2",
                 "--calib-select", "prototype:hard", "--calib-pool", "12", "--calib", str(TINY_TEXT),
                 "--nsamples", "6", "--seqlen", "64", "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert len(rep["allocation"]["layer_removal"]["removed"]) == 2
    assert len(rep["allocation"]["calib_select"]["samples"]) == 6
    m = AutoModelForCausalLM.from_pretrained(out)
    assert m.config.num_hidden_layers == 3 and len(m.model.layers) == 3
    assert rep["saved"]["overall_sparsity"] == 0.5


def test_eval_tasks_json(tmp_path, capsys):
    out = tmp_path / "z.json"
    assert main(["eval", "--model", str(STORIES_HF), "--tasks", "rte,piqa", "--limit", "8", "--json", str(out)]) == 0
    z = json.loads(out.read_text())["results"]["zeroshot"]
    assert z["tasks"]["rte"]["n"] == 8 and 0 <= z["tasks"]["piqa"]["acc"] <= 1
    assert "rte: acc" in capsys.readouterr().out


def test_search_cli_writes_a_reusable_recipe(tmp_path):
    out = tmp_path / "s"
    assert main(["search", "--method", "dsa", "--budget", "3", "--model", str(STORIES_HF), "--sparsity", "0.6",
                 "--calib", str(TINY_TEXT), "--nsamples", "4", "--seqlen", "32", "--heldout", "2",
                 "--heldout-seqlen", "32", "--out", str(out), "--param", "population=3", "--metric", "ria",
                 "--metric-param", "alpha=1"]) == 0
    import yaml

    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe["allocation"] == "dsa" and "program" in recipe["allocation_params"]
    assert recipe["metric"] == "ria" and recipe["metric_params"] == {"alpha": 1.0}
    assert json.loads((out / "dsa_result.json").read_text())["metric_params"] == {"alpha": 1.0}
    assert main(["prune", "--recipe", str(out / "recipe.yaml"), "--out", str(tmp_path / "p")]) == 0
    rep = json.loads((tmp_path / "p" / "report.json").read_text())
    assert rep["method"]["allocation"] == "dsa"
    assert rep["method"]["metric_params"] == {"alpha": 1.0}


def test_rowwise_params_from_the_cli(tmp_path):
    out = tmp_path / "t"
    assert main(["prune", "--model", str(STORIES_HF), "--metric", "wanda", "--sparsity", "0.5", "--rowwise", "trim",
                 "--rowwise-param", "tokens_per_sample=2", "--rowwise-param", "iters=3", "--calib", str(TINY_TEXT),
                 "--nsamples", "4", "--seqlen", "32", "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["config"]["rowwise_params"] == {"tokens_per_sample": 2, "iters": 3}
    assert rep["method"]["rowwise"] == "trim" and all("rowwise" in l for l in rep["layers"])
    assert rep["method"]["rowwise_params"] == {"tokens_per_sample": 2, "iters": 3}
    assert "rowwise trim (iters=3, tokens_per_sample=2)" in (out / "report.md").read_text()


def test_rowwise_skip_from_the_cli(tmp_path, capsys):
    out = tmp_path / "t"
    assert main(["prune", "--model", str(STORIES_HF), "--metric", "wanda", "--sparsity", "0.5", "--rowwise", "trim",
                 "--rowwise-skip", "*.mlp.up_proj", "--rowwise-skip", "o_proj", "--calib", str(TINY_TEXT),
                 "--nsamples", "4", "--seqlen", "32", "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["method"]["rowwise_skip"] == ["*.mlp.up_proj", "o_proj"]
    skipped = {l["name"] for l in rep["layers"] if "rowwise" not in l}
    assert skipped and all(n.endswith((".mlp.up_proj", ".self_attn.o_proj")) for n in skipped)
    assert len(skipped) == 2 * len(rep["blocks"])
    assert "rowwise trim except *.mlp.up_proj, o_proj" in (out / "report.md").read_text()
    assert "/ rowwise trim except *.mlp.up_proj, o_proj:" in capsys.readouterr().out  # the summary line says it too


def test_methods_lists_every_registered_method(capsys):
    from prunekit.core.allocation import ALLOCATORS
    from prunekit.core.metric import METRICS
    from prunekit.core.rowwise import ROWWISE

    assert main(["methods"]) == 0
    text = capsys.readouterr().out
    out = {line.split(":", 1)[0]: line.split(":", 1)[1] for line in text.splitlines() if not line.startswith(" ")}
    assert set(out["metrics"].replace(",", " ").split()) == set(METRICS)
    assert set(out["allocations"].replace(",", " ").split()) == set(ALLOCATORS)
    assert set(ROWWISE) <= set(out["rowwise"].split(" (")[0].replace(",", " ").split())
    assert "inputs=last" in text and "sparsegpt" in out["reconstruct"] and "'auto' for eps" in text


def test_metric_and_reconstruct_params_from_the_cli(tmp_path, monkeypatch):
    """--metric-param / --reconstruct-param reach SparseGPT (damping and block size seen by the solver) and
    the report records the values used."""
    from prunekit.methods import sparsegpt as sg

    seen = []
    real_factor, real_sweep = sg.factor_hessian, sg._sweep
    monkeypatch.setattr(sg, "factor_hessian", lambda H, dev, percdamp, *a, **kw: (seen.append(("damp", percdamp)),
                                                                                   real_factor(H, dev, percdamp, *a, **kw))[1])
    monkeypatch.setattr(sg, "_sweep", lambda W, U, s, p, m, blocksize, *a: (seen.append(("block", blocksize)),
                                                                            real_sweep(W, U, s, p, m, blocksize, *a))[1])
    common = ["--model", str(STORIES_HF), "--sparsity", "0.5", "--calib", str(TINY_TEXT), "--nsamples", "4",
              "--seqlen", "32"]
    out = tmp_path / "a"
    assert main(["prune", "--metric", "sparsegpt", "--metric-param", "percdamp=0.1", "--metric-param", "blocksize=16",
                 *common, "--out", str(out)]) == 0
    assert set(seen) == {("damp", 0.1), ("block", 16)}
    rep = json.loads((out / "report.json").read_text())
    assert rep["method"]["metric_params"] == {"blocksize": 16, "percdamp": 0.1, "max_damp_tries": 8, "sweep": "auto"}
    assert "metric **sparsegpt** (blocksize=16, percdamp=0.1" in (out / "report.md").read_text()
    seen.clear()
    out = tmp_path / "b"
    assert main(["prune", "--metric", "wanda", "--reconstruct", "sparsegpt", "--reconstruct-param", "percdamp=0.2",
                 *common, "--out", str(out)]) == 0
    assert set(seen) == {("damp", 0.2), ("block", 128)}
    rep = json.loads((out / "report.json").read_text())
    assert rep["method"]["reconstruct_params"]["percdamp"] == 0.2 and rep["method"]["metric_params"] == {}


def test_bad_metric_params_are_refused_before_any_work(capsys):
    common = ["prune", "--model", str(STORIES_HF), "--sparsity", "0.5"]
    for args, words in [(["--metric", "sparsegpt", "--metric-param", "damping=0.1"], ["damping", "percdamp"]),
                        (["--metric", "sparsegpt", "--metric-param", "percdamp=-1"], ["percdamp", ">= 0"]),
                        (["--metric", "sparsegpt", "--metric-param", "blocksize=2.5"], ["blocksize", "integer"]),
                        (["--metric", "sparsegpt", "--metric-param", "blocksize=true"], ["blocksize", "integer"]),
                        (["--metric", "sparsegpt", "--metric-param", "blocksize=.inf"], ["blocksize", "integer"]),
                        (["--metric", "sparsegpt", "--metric-param", "sweep=fast"], ["sweep", "triangular"]),
                        (["--metric", "wanda", "--metric-param", "alpha=1"], ["wanda", "none"]),
                        (["--metric", "wanda", "--reconstruct-param", "percdamp=0.1"], ["reconstruct_params"]),
                        (["--metric", "wanda", "--refine", "swaps", "--refine-param", "candidates=-1"],
                         ["candidates", ">= 0"]),
                        (["--metric", "wanda", "--refine-param", "max_swaps=3"], ["refine_params set without refine"]),
                        (["--metric", "wanda", "--refine", "grow"], ["unknown refine method", "dsnot, swaps"]),
                        (["--metric", "admm", "--metric-param", "iters=0"], ["iters", ">= 1"])]:
        assert main(common + args) != 0, args
        err = capsys.readouterr().err
        assert all(w in err for w in words), (args, err)


def test_cli_error_is_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["prune", "--model", str(STORIES_HF), "--metric", "nope", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown metric 'nope'" in err
    assert not out.exists()
