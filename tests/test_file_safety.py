"""What prunekit promises about users' files (README, "What prunekit promises about your files"):
the saved folder is the model that was evaluated, inputs are never touched, outputs appear whole or not at
all, interrupts leave nothing behind, and bad input is one line with exit code 2 before any work."""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import prunekit
from prunekit.core import interrupts
from prunekit.cli import main
from prunekit.core.errors import PrunekitError
from prunekit.core.outputs import atomic_dir, clean_stale

from conftest import STORIES_HF, TINY_TEXT, tiny_model

REPO = Path(__file__).resolve().parents[1]
CALIB = ["--calib", str(TINY_TEXT), "--nsamples", "4", "--seqlen", "64"]


def digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(Path(path).rglob("*")):
        if f.is_file():
            h.update(str(f.relative_to(path)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


@pytest.fixture
def model_dir(tmp_path):
    """A private copy of stories260K, with an unrelated file beside it."""
    d = tmp_path / "models" / "stories"
    shutil.copytree(STORIES_HF, d)
    (tmp_path / "models" / "notes.txt").write_text("mine")
    return d


def prune_cli(model, out, *extra, metric="wanda", sparsity="0.5"):
    args = ["prune", "--model", str(model), "--metric", metric, *CALIB, "--out", str(out), *extra]
    if sparsity is not None:
        args[5:5] = ["--sparsity", sparsity]
    return main(args)


def one_line_error(capsys, *words):
    """The error is one line, the last thing on stderr (progress bars may come before it), no traceback."""
    err = capsys.readouterr().err
    last = err.replace("\r", "\n").strip().splitlines()[-1]
    assert last.startswith("prunekit: error:") and err.count("prunekit: error:") == 1, err
    assert "Traceback" not in err, err
    for w in words:
        assert w in last, (w, last)
    return last


# ------------------------------------------------------------------------------------------ 1. STADE's biases

def test_stade_saved_model_reloads_as_evaluated(tmp_path):
    """LLaMA declares biases by config flags: STADE's corrections are saved and a plain reload keeps them."""
    model, tok = prunekit.load_model(str(STORIES_HF))
    cfg = prunekit.make_config(model=str(STORIES_HF), metric="stade", sparsity=0.6, calib=str(TINY_TEXT),
                               nsamples=4, seqlen=64)
    report = prunekit.prune(model, tok, cfg)
    assert report["allocation"]["config_flags_set"] == {"attention_bias": True, "mlp_bias": True}
    prunekit.save_pruned(model, tok, report, cfg, tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert again.config.attention_bias and again.config.mlp_bias
    q = again.model.layers[0].self_attn.q_proj
    assert q.bias is not None and bool((q.bias != 0).any())  # a correction, not just the zero bias
    x = torch.randint(0, 512, (2, 48))
    with torch.no_grad():
        assert torch.equal(model(x).logits, again(x).logits)


def test_stade_refused_where_a_reload_cannot_hold_the_bias(tmp_path, calib_ids, capsys):
    """Qwen2's o_proj and MLP are bias-free by construction: refuse before any work, or prune without the
    correction when asked; never save tensors a reload drops."""
    model = tiny_model("qwen2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PrunekitError, match=r"no bias in .*o_proj.*bias_correction=false"):
        prunekit.prune(model, None, {"metric": "stade", "sparsity": 0.5}, calib_ids=calib_ids)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing was done
    rep = prunekit.prune(model, None, {"metric": "stade", "sparsity": 0.5,
                                       "metric_params": {"bias_correction": False}}, calib_ids=calib_ids)
    assert rep["method"]["metric_params"] == {"bias_correction": False}
    assert model.model.layers[0].self_attn.o_proj.bias is None
    assert main(["prune", "--model", str(STORIES_HF), "--metric", "stade", "--metric-param", "bias_correction=1",
                 "--out", str(tmp_path / "o")]) == 2
    one_line_error(capsys, "bias_correction", "true or false")


# ------------------------------------------------------------------------------------ 2./4. inputs are never outputs

@pytest.mark.parametrize("where", ["same", "parent", "inside"])
def test_prune_out_never_overlaps_the_input(model_dir, where, capsys):
    out = {"same": model_dir, "parent": model_dir.parent, "inside": model_dir / "pruned"}[where]
    before, around = digest(model_dir), digest(model_dir.parent)
    assert prune_cli(model_dir, out, "--overwrite") == 2
    one_line_error(capsys, "input")
    assert digest(model_dir) == before and digest(model_dir.parent) == around


def test_out_containing_the_current_folder_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("x")
    assert prune_cli(STORIES_HF, ".", "--overwrite") == 2
    one_line_error(capsys, "current folder")
    assert (tmp_path / "keep.txt").read_text() == "x"


def test_calibration_file_is_an_input_too(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(TINY_TEXT, data / "c.txt")
    assert main(["prune", "--model", str(STORIES_HF), "--calib", str(data / "c.txt"), "--out", str(data),
                 "--overwrite"]) == 2
    one_line_error(capsys, "input")
    assert (data / "c.txt").read_bytes() == TINY_TEXT.read_bytes()


@pytest.mark.parametrize("where", ["same", "parent", "inside"])
def test_analyze_out_never_overlaps_the_input(model_dir, where, capsys):
    out = {"same": model_dir, "parent": model_dir.parent, "inside": model_dir / "esd"}[where]
    before = digest(model_dir.parent)
    assert main(["analyze", "--model", str(model_dir), "--calib", "none", "--out", str(out), "--overwrite"]) == 2
    one_line_error(capsys, "input")
    assert digest(model_dir.parent) == before


def _search(model, out, *extra):
    return main(["search", "--method", "dsa", "--budget", "1", "--model", str(model), "--sparsity", "0.6",
                 "--calib", str(TINY_TEXT), "--nsamples", "4", "--seqlen", "32", "--heldout", "2",
                 "--heldout-seqlen", "32", "--param", "population=2", "--param", "elite=1", "--out", str(out), *extra])


def test_search_out_must_be_a_search_folder(model_dir, tmp_path, capsys):
    before = digest(model_dir)
    for out in (model_dir, model_dir.parent, model_dir / "s"):
        assert _search(model_dir, out) == 2
        one_line_error(capsys, "input")
    pruned = tmp_path / "pruned"
    assert prune_cli(STORIES_HF, pruned) == 0
    recipe = (pruned / "recipe.yaml").read_text()
    assert _search(STORIES_HF, pruned) == 2
    one_line_error(capsys, "not a search folder")
    assert (pruned / "recipe.yaml").read_text() == recipe and digest(model_dir) == before
    f = tmp_path / "afile"
    f.write_text("x")
    assert _search(STORIES_HF, f) == 2
    one_line_error(capsys, "not a folder")
    s = tmp_path / "s"
    assert _search(STORIES_HF, s) == 0 and (s / ".prunekit-search").is_file()
    capsys.readouterr()
    assert _search(STORIES_HF, s) == 0  # its own folder: resumed


# ----------------------------------------------------------------------------------- 3. the final rename never clobbers

def test_target_appearing_during_the_run_is_not_replaced(tmp_path):
    out = tmp_path / "o"
    with pytest.raises(PrunekitError, match=r"exists \(another run wrote it while this one worked\?\).*conflict"):
        with atomic_dir(out) as tmp:
            (tmp / "mine.txt").write_text("new")
            out.mkdir()  # another run finished first
            (out / "theirs.txt").write_text("old")
    assert [p.name for p in out.iterdir()] == ["theirs.txt"]
    kept = [p for p in tmp_path.iterdir() if ".conflict-" in p.name]
    assert len(kept) == 1 and (kept[0] / "mine.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["o", kept[0].name])  # no hidden temp folder


def test_two_cli_runs_on_one_new_out(tmp_path, monkeypatch, capsys):
    out = tmp_path / "o"
    import prunekit.pruning.pipeline as pipeline

    real = pipeline.prune

    def racing(*a, **k):  # a second run writes the same output while this one prunes
        monkeypatch.setattr(pipeline, "prune", real)
        assert prune_cli(STORIES_HF, out) == 0
        return real(*a, **k)

    monkeypatch.setattr(pipeline, "prune", racing)
    first = digest(out) if out.exists() else None
    assert prune_cli(STORIES_HF, out, metric="magnitude") == 2
    last = one_line_error(capsys, "another run wrote it", "conflict-")
    assert first is None and json.loads((out / "report.json").read_text())["method"]["metric"] == "wanda"
    kept = Path(last.rsplit("output is in ", 1)[1])
    assert json.loads((kept / "report.json").read_text())["method"]["metric"] == "magnitude"


# ------------------------------------------------------------------------------------------ 5. meaningless values

def test_nm_pattern_fixes_the_sparsity(capsys, tmp_path):
    with pytest.raises(PrunekitError, match=r"pattern 2:4 prunes exactly 2/4 = 0.5.*sparsity 0.7"):
        prunekit.make_config(pattern="2:4", sparsity=0.7)
    assert prunekit.make_config(pattern="1:4").target() == 0.25  # the default 0.5 is not the user's choice
    assert prunekit.make_config(pattern="2:4", sparsity=0.5).target() == 0.5
    assert prune_cli(STORIES_HF, tmp_path / "o", "--pattern", "2:4", sparsity="0.7") == 2
    one_line_error(capsys, "2:4")


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_non_finite_metric_params_are_refused(value):
    with pytest.raises(PrunekitError, match="finite number"):
        prunekit.make_config(metric="ria", metric_params={"alpha": float(value.replace(".", "", 1))})


def test_partial_model_is_refused(tmp_path, capsys):
    d = tmp_path / "m"
    shutil.copytree(STORIES_HF, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_hidden_layers"] += 2  # the weights hold 5 blocks; transformers would invent 2 at random
    (d / "config.json").write_text(json.dumps(cfg))
    assert prune_cli(d, tmp_path / "o") == 2
    one_line_error(capsys, "lacks", "initialised at random")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv,words", [
    (["--max-windows", "0", "--eval", str(TINY_TEXT)], ["--max-windows", ">= 1"]),
    (["--max-windows", "-1", "--eval", str(TINY_TEXT)], ["--max-windows", ">= 1"]),
    (["--batch-size", "0"], ["--batch-size", ">= 1"]),
    (["--batch-size", "-2"], ["--batch-size", ">= 1"]),
    (["--nsamples", "0"], ["--nsamples"]),
    (["--ignore", "*"], ["match every prunable layer"]),
    (["--sparsity", "nan"], ["sparsity"]),
])
def test_bad_prune_values_are_one_line(tmp_path, argv, words, capsys):
    assert main(["prune", "--model", str(STORIES_HF), *CALIB, "--out", str(tmp_path / "o"), *argv]) == 2
    one_line_error(capsys, *words)
    assert list(tmp_path.iterdir()) == []


def test_empty_out_is_refused(capsys):
    assert main(["prune", "--model", str(STORIES_HF), "--out", ""]) == 2
    one_line_error(capsys, "out", "empty")
    with pytest.raises(PrunekitError, match="empty"):
        prunekit.make_config(out="  ")


# --------------------------------------------------------------------------------- 6./7. verify what a user loads

@pytest.fixture
def pruned(tmp_path):
    out = tmp_path / "pruned"
    assert prune_cli(STORIES_HF, out) == 0
    return out


def test_verify_counts_from_the_weights_and_every_listed_layer(pruned, capsys):
    assert main(["verify", "--model", str(pruned)]) == 0
    assert "probe NLL" in capsys.readouterr().out
    name = "model.layers.2.mlp.down_proj"
    masks = load_file(pruned / "masks.safetensors")
    from safetensors import safe_open

    with safe_open(str(pruned / "masks.safetensors"), "pt") as f:
        meta = f.metadata()
    del masks[name]  # the mask of one layer is gone and its dense weights are back
    save_file(masks, str(pruned / "masks.safetensors"), metadata=meta)
    w = load_file(pruned / "model.safetensors")
    w[f"{name}.weight"] = load_file(STORIES_HF / "model.safetensors")[f"{name}.weight"]
    save_file(w, str(pruned / "model.safetensors"), metadata={"format": "pt"})
    assert main(["verify", "--model", str(pruned)]) == 2
    one_line_error(capsys, "without a mask", name)


def test_verify_catches_dense_weights_under_an_intact_mask_file(pruned, capsys):
    name = "model.layers.1.self_attn.q_proj"
    w = load_file(pruned / "model.safetensors")
    w[f"{name}.weight"] = load_file(STORIES_HF / "model.safetensors")[f"{name}.weight"]
    save_file(w, str(pruned / "model.safetensors"), metadata={"format": "pt"})
    assert main(["verify", "--model", str(pruned)]) == 2
    one_line_error(capsys, name, "not zero")


def test_verify_catches_a_model_that_is_not_the_evaluated_one(pruned, capsys):
    w = load_file(pruned / "model.safetensors")
    w["model.norm.weight"] = w["model.norm.weight"] * 1.5  # no pruned weight changes; the model does
    save_file(w, str(pruned / "model.safetensors"), metadata={"format": "pt"})
    assert main(["verify", "--model", str(pruned)]) == 2
    one_line_error(capsys, "not the model that was evaluated", "probe NLL")


def test_verify_compares_the_sparsity_with_the_report(pruned, capsys):
    rep = json.loads((pruned / "report.json").read_text())
    rep["saved"]["overall_sparsity"] = 0.6
    (pruned / "report.json").write_text(json.dumps(rep))
    assert main(["verify", "--model", str(pruned)]) == 2
    one_line_error(capsys, "the report says 0.6")


def test_a_folder_that_would_not_reload_as_evaluated_is_never_written(tmp_path, monkeypatch):
    """The save-time reload check: a bias a reload would drop (what STADE did before) stops the save."""
    import prunekit.pruning.run as run

    monkeypatch.setattr(run, "declare_biases", lambda *a, **k: [])  # the old behaviour: biases the config omits
    model, tok = prunekit.load_model(str(STORIES_HF))
    cfg = prunekit.make_config(model=str(STORIES_HF), metric="stade", sparsity=0.6, calib=str(TINY_TEXT),
                               nsamples=4, seqlen=64)
    report = prunekit.prune(model, tok, cfg)
    with pytest.raises(PrunekitError, match="does not use|does not reload"):
        prunekit.save_pruned(model, tok, report, cfg, tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


OUTPUT_KINDS = {
    **{m: ["--metric", m] for m in ("magnitude", "wanda", "sparsegpt", "ria", "stade", "ace")},
    "2:4": ["--metric", "wanda", "--pattern", "2:4"],
    "2:4-sparsegpt": ["--metric", "sparsegpt", "--pattern", "2:4"],
    "reconstruct": ["--metric", "wanda", "--reconstruct", "sparsegpt"],
    "reconstruct-admm": ["--metric", "wanda", "--reconstruct", "admm"],
    "alps": ["--metric", "alps", "--sparsity", "0.7"],
    "admm-2:4": ["--metric", "admm", "--pattern", "2:4"],
    "refine-swaps": ["--metric", "wanda", "--refine", "swaps", "--reconstruct", "admm"],
    "refine-dsnot": ["--metric", "wanda", "--pattern", "2:4", "--refine", "dsnot"],
    "atp": ["--metric", "wanda", "--sparsity", "0.6", "--allocation", "atp", "--allocation-param", "beta=0.02"],
    "trim": ["--metric", "wanda", "--rowwise", "trim"],
    **{a: ["--metric", "wanda", "--sparsity", "0.6", "--allocation", a]
       for a in ("global", "er", "er-plus", "owl", "alphapruning", "farms", "mrp")},
    "dsa": ["--metric", "wanda", "--sparsity", "0.6", "--allocation", "dsa", "--allocation-param",
            "program=pre:abs|red:mean|tr:none|post:none"],
    "per-block": ["--metric", "wanda", "--sparsity", "0.3,0.4,0.5,0.6,0.7"],
    "prune-comp": ["--metric", "wanda", "--remove-blocks", "1", "--removal", "prune-comp"],
    "bi": ["--metric", "wanda", "--remove-blocks", "1", "--removal", "bi"],
    "calib-select": ["--metric", "wanda", "--calib-select", "prototype:hard", "--calib-pool", "8"],
    "compressed": ["--metric", "sparsegpt", "--sparsity", "0.7", "--save-format", "compressed"],
}


@pytest.mark.parametrize("kind", list(OUTPUT_KINDS))
def test_every_kind_of_output_reloads_as_evaluated(tmp_path, kind, capsys):
    out = tmp_path / kind
    argv = ["prune", "--model", str(STORIES_HF), *CALIB, "--out", str(out), *OUTPUT_KINDS[kind]]
    if "--sparsity" not in argv and "--pattern" not in argv:
        argv += ["--sparsity", "0.5"]
    assert main(argv) == 0, capsys.readouterr().err
    rep = json.loads((out / "report.json").read_text())
    probe = rep["probe"]
    assert probe["tokens"] > 0 and probe["reloaded_nll"] == pytest.approx(probe["nll"], rel=1e-4)
    capsys.readouterr()
    assert main(["verify", "--model", str(out)]) == 0, capsys.readouterr().err
    assert "probe NLL" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- 8. interrupts

def _spawn(args, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "prunekit.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **kw)


SLOW_SAVE = """
import sys, time
import prunekit.pruning.save
from prunekit.cli import main
real = prunekit.pruning.save.save_masks
def slow(*a, **k):  # the model is written into the temporary folder; the kill comes now
    real(*a, **k)
    time.sleep(60)
prunekit.pruning.save.save_masks = slow
import prunekit.pruning.pipeline
prunekit.pruning.pipeline.save_masks = slow
sys.exit(main(sys.argv[1:]))
"""


def _kill_during_save(tmp_path, sig, *extra):
    out = tmp_path / "o"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SAVE, "prune", "--model", str(STORIES_HF), "--metric",
                             "wanda", "--sparsity", "0.5", *CALIB, "--out", str(out), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while not any((p / "masks.safetensors").exists() for p in tmp_path.glob(".o.tmp-*")):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_during_save_leaves_nothing_and_keeps_the_old_output(tmp_path, sig):
    out = tmp_path / "o"
    out.mkdir()
    (out / "previous.txt").write_text("the last run's output")
    rc, err = _kill_during_save(tmp_path, sig, "--overwrite")
    assert rc == (143 if sig == signal.SIGTERM else 130), err
    assert f"interrupted ({signal.Signals(sig).name}); no output was written" in err.strip().splitlines()[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]
    assert (out / "previous.txt").read_text() == "the last run's output"


@pytest.mark.slow
def test_sigkill_during_save_is_cleaned_by_the_next_run(tmp_path):
    rc, _ = _kill_during_save(tmp_path, signal.SIGKILL)
    assert rc == -9 and len(list(tmp_path.glob(".o.tmp-*"))) == 1  # what a kill -9 leaves
    assert prune_cli(STORIES_HF, tmp_path / "o", metric="magnitude") == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def _wait_for_startup_guard(proc, timeout=30.0):
    """Until prunekit's first line runs, a Ctrl-C meets Python's own start-up (site, the import system), which no
    program can catch. Its guard catches SIGTERM, which Python leaves alone: wait until the kernel shows it
    caught (SigCgt in /proc/PID/status)."""
    status = Path(f"/proc/{proc.pid}/status")
    if not status.exists():
        pytest.skip("no /proc to tell when prunekit's start-up guard is in place")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            caught = next(int(line.split()[1], 16) for line in status.read_text().splitlines()
                          if line.startswith("SigCgt:"))
        except (OSError, StopIteration):
            caught = 0
        if caught & (1 << (signal.SIGTERM - 1)):
            return
        time.sleep(0.002)
    pytest.fail("the start-up guard was never installed")


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.3, 0.6, 1.2])
def test_sigint_during_startup_is_one_line(delay):
    """From prunekit's first line on (the command line's imports take seconds), a stop is one line and exit 130."""
    proc = _spawn(["prune", "--model", str(STORIES_HF), "--out", "/nonexistent/never"])
    _wait_for_startup_guard(proc)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    if proc.returncode == 2:  # it got as far as the output check: not the case this test is about
        pytest.skip("start-up finished before the signal")
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("prunekit: interrupted")


def test_a_swallowed_interrupt_still_stops_the_save(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "old.txt").write_text("keep")
    try:
        with pytest.raises(KeyboardInterrupt):
            with atomic_dir(out, overwrite=True) as tmp:
                (tmp / "new.txt").write_text("x")
                try:  # a KeyboardInterrupt raised where Python cannot propagate it ("Exception ignored in")
                    interrupts._handler(signal.SIGINT, None)
                except KeyboardInterrupt:
                    pass
    finally:
        interrupts.reset()
    assert [p.name for p in tmp_path.iterdir()] == ["o"] and (out / "old.txt").read_text() == "keep"


def test_stale_siblings_of_dead_runs_are_cleaned(tmp_path, caplog):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    out = tmp_path / "o"
    (tmp_path / f".o.tmp-{dead}-abcdef").mkdir()
    (tmp_path / f".o.old-{dead}-123456").mkdir()  # an overwrite killed between its two renames: o is missing
    (tmp_path / f".o.old-{dead}-123456" / "previous.txt").write_text("previous output")
    (tmp_path / f".o.tmp-{os.getpid()}-fedcba").mkdir()  # a live process's: left alone
    done = clean_stale(out)
    assert len(done) == 2 and (out / "previous.txt").read_text() == "previous output"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["o", f".o.tmp-{os.getpid()}-fedcba"])
    assert prune_cli(STORIES_HF, tmp_path / "p") == 0  # and a run cleans before it writes
    (tmp_path / f".p.tmp-{dead}-aaaaaa").mkdir()
    assert prune_cli(STORIES_HF, tmp_path / "p", "--overwrite") == 0
    assert not (tmp_path / f".p.tmp-{dead}-aaaaaa").exists()
    assert "left by an interrupted run" in caplog.text


# -------------------------------------------------------------------------------- 9. one line, not a traceback

def test_damaged_files_are_one_line(tmp_path, pruned, capsys):
    bad_model = tmp_path / "bad"
    shutil.copytree(STORIES_HF, bad_model)
    data = (bad_model / "model.safetensors").read_bytes()
    (bad_model / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert prune_cli(bad_model, tmp_path / "o") == 2
    one_line_error(capsys, "cannot load model")
    (pruned / "model.safetensors").write_bytes((pruned / "model.safetensors").read_bytes()[:1000])
    assert main(["verify", "--model", str(pruned)]) == 2
    one_line_error(capsys, "cannot load model")
    (pruned / "masks.safetensors").write_bytes(b"\x00garbage" * 10)
    assert main(["verify", "--model", str(pruned)]) == 2
    one_line_error(capsys, "not a readable prunekit mask file")
    (pruned / "report.json").unlink()
    assert main(["verify", "--model", str(pruned)]) == 2
    one_line_error(capsys, "no report.json")


@pytest.mark.parametrize("name,content,words", [
    ("bin.txt", bytes(range(256)) * 8, ["not UTF-8"]),
    ("bad.jsonl", b'{"text": "ok"}\n{broken\n', ["line 2 is not JSON"]),
    ("num.jsonl", b"3\n", ["line 1"]),
    ("bad.parquet", b"PAR1 this is not parquet", ["cannot read"]),
])
def test_unreadable_text_files_are_one_line(tmp_path, name, content, words, capsys):
    f = tmp_path / name
    f.write_bytes(content)
    assert main(["prune", "--model", str(STORIES_HF), "--calib", str(f), "--nsamples", "2", "--seqlen", "16",
                 "--out", str(tmp_path / "o")]) == 2
    one_line_error(capsys, *words)
    assert main(["eval", "--model", str(STORIES_HF), "--ppl", str(f), "--seqlen", "16", "--max-windows", "1"]) == 2
    one_line_error(capsys, *words)


def test_bad_recipes_are_one_line(tmp_path, capsys):
    binary = tmp_path / "r.yaml"
    binary.write_bytes(bytes(range(256)))
    malformed = tmp_path / "m.yaml"
    malformed.write_text("metric: wanda\nsparsity: [0.5\n  bad: : x\n")
    for recipe, words in ((binary, ["UTF-8"]), (tmp_path, ["is a folder"]), (malformed, ["not valid YAML"])):
        assert main(["prune", "--recipe", str(recipe), "--out", str(tmp_path / "o")]) == 2
        one_line_error(capsys, *words)


def test_unwritable_or_impossible_outputs_fail_before_any_work(tmp_path, capsys, monkeypatch):
    import prunekit.pruning.pipeline as pipeline

    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    for out, words in ((Path("/proc/prunekit-out"), ["cannot write"]), (tmp_path / ("x" * 300), ["bytes long"])):
        assert prune_cli(STORIES_HF, out) == 2
        one_line_error(capsys, *words)
    long = tmp_path / ("y" * 250)  # a long but legal name works: temporary siblings shorten theirs
    monkeypatch.undo()
    assert prune_cli(STORIES_HF, long, metric="magnitude") == 0 and (long / "report.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["y" * 250]


def test_eval_json_checked_before_the_evaluation(tmp_path, capsys, monkeypatch):
    import prunekit.core.loading as loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(["eval", "--model", str(STORIES_HF), "--json", str(tmp_path / "nodir" / "x.json")]) == 2
    one_line_error(capsys, "does not exist")
    assert main(["eval", "--model", str(STORIES_HF), "--json", str(STORIES_HF / "r.json")]) == 2
    one_line_error(capsys, "input")
    assert main(["eval", "--model", str(STORIES_HF), "--max-windows", "-1"]) == 2
    one_line_error(capsys, "--max-windows")


def test_search_parameters_are_checked_before_any_work(tmp_path, capsys):
    for param, words in (("populaton=4", ["no parameter 'populaton'", "population"]),
                         ("population=abc", ["population must be an integer, got 'abc'"]),
                         ("population=2.5", ["population must be an integer, got 2.5"])):
        assert _search(STORIES_HF, tmp_path / "s", "--param", param) == 2
        one_line_error(capsys, *words)
    assert main(["search", "--method", "tpe", "--budget", "1", "--model", str(STORIES_HF), "--sparsity", "0.5",
                 "--param", "kv_budget=0.3", "--out", str(tmp_path / "t")]) == 2
    one_line_error(capsys, "kv_budget", "head_dim 8")


# --------------------------------------------------------------------------------------------- 10. smaller ones

def test_resume_mismatch_names_the_cli_flag(tmp_path, capsys):
    s = tmp_path / "s"
    assert _search(STORIES_HF, s) == 0
    capsys.readouterr()
    assert _search(STORIES_HF, s, "--seed", "3") == 2
    one_line_error(capsys, "--no-resume")


def test_tpe_default_kv_budget_fits_a_small_head_dim(tmp_path):
    from prunekit.search.tpe import check_kv_setup, kv_memory_fraction

    model = AutoModelForCausalLM.from_pretrained(STORIES_HF)  # head_dim 8: 2 bits already take 0.375 of fp16
    budget = check_kv_setup(model, True, (2, 8), "auto")
    assert budget == pytest.approx(kv_memory_fraction(model, [4] * 5)) and budget >= kv_memory_fraction(model, [2] * 5)
    with pytest.raises(PrunekitError, match="below the smallest KV cache"):
        check_kv_setup(model, True, (2, 8), 0.3)
