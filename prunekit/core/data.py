"""Text sources.

A *source* is either a file path (``.txt``: one document; ``.jsonl``: one document per line, a JSON
string or an object with a ``text`` field; ``.parquet``: its ``text`` column) or a named set:

- ``c4``: C4 English. Offline mirror ``$PRUNEKIT_DATA_DIR/c4/*.parquet``; online
  ``datasets.load_dataset("allenai/c4", ...)``. Evaluation uses the first 1,100 documents of the
  validation split (the papers' convention); calibration from the offline mirror (which is the
  validation split too) uses the documents after those 1,100, so calibration never sees evaluation text.
- ``wikitext2``: WikiText-2 raw test rows joined with "\\n\\n". Offline
  ``$PRUNEKIT_DATA_DIR/wikitext2/wiki.test.hf_rows.jsonl`` (or ``wiki.test.raw``); online
  ``datasets.load_dataset("Salesforce/wikitext", "wikitext-2-raw-v1")``. Calibration from
  ``wikitext2`` uses the *train* split online; offline only the test split exists, and that is said in
  a warning because it overlaps the evaluation text.
"""
from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path

import torch

from .errors import PrunekitError

log = logging.getLogger(__name__)

NAMED_SETS = ("c4", "wikitext2")
C4_EVAL_DOCS = 1100


def data_dir() -> Path | None:
    env = os.environ.get("PRUNEKIT_DATA_DIR")
    if env:
        return Path(env)
    for cand in (Path.cwd() / "../shared/data", Path(__file__).resolve().parents[3] / "shared" / "data"):
        if cand.is_dir():
            return cand.resolve()
    return None


def _read_file(path: Path) -> list[str]:
    """Documents of a text file; anything unreadable is one PrunekitError naming the file."""
    try:
        return _documents_of(path)
    except UnicodeDecodeError as e:
        raise PrunekitError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    except PrunekitError:
        raise
    except Exception as e:  # a truncated or foreign parquet file (ArrowInvalid, OSError ...)
        raise PrunekitError(f"cannot read {path} ({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None


def _documents_of(path: Path) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".txt" or suffix == ".raw":
        return [path.read_text(encoding="utf-8")]
    if suffix == ".jsonl":
        return [d for d in _jsonl_rows(path) if d]
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if "text" not in table.column_names:
            raise PrunekitError(f"{path} has no 'text' column (columns: {table.column_names})")
        docs = table.column("text").to_pylist()
        if not all(isinstance(t, str) or t is None for t in docs):
            raise PrunekitError(f"{path}: the 'text' column does not hold strings")
        return [t for t in docs if t]
    raise PrunekitError(f"unsupported text file {path.name}: use .txt, .jsonl or .parquet")


def _jsonl_rows(path: Path) -> list[str]:
    """Every row (empty ones too: they shape the "\n\n" joins) of a JSON-lines file of strings or {"text": ...}."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise PrunekitError(f"{path}: line {i} is not JSON ({e.msg})") from None
                text = obj if isinstance(obj, str) else obj.get("text", "") if isinstance(obj, dict) else None
                if not isinstance(text, str):
                    raise PrunekitError(f"{path}: line {i} is neither a JSON string nor an object with a 'text' string")
                rows.append(text)
    return rows


def _online(name: str, split: str) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise PrunekitError(
            f"no offline copy of '{name}' (set PRUNEKIT_DATA_DIR) and the 'datasets' package is not installed"
        ) from None
    try:
        if name == "c4":
            files = {"train": "en/c4-train.00000-of-01024.json.gz", "validation": "en/c4-validation.00000-of-00008.json.gz"}
            ds = datasets.load_dataset("allenai/c4", data_files={split: files[split]}, split=split)
        else:
            ds = datasets.load_dataset("Salesforce/wikitext", "wikitext-2-raw-v1", split=split)
    except Exception as e:  # network errors come in many types
        raise PrunekitError(f"cannot load '{name}' online ({type(e).__name__}: {str(e)[:200]}); "
                            "set PRUNEKIT_DATA_DIR to an offline mirror") from None
    return list(ds["text"])


def load_documents(source: str, purpose: str = "calibration") -> list[str]:
    """Documents of a source. purpose: 'calibration' or 'eval' (chooses the split for named sets)."""
    p = Path(source)
    if source not in NAMED_SETS:
        if not p.is_file():
            raise PrunekitError(f"calibration/eval source {source!r} is neither a file nor one of {', '.join(NAMED_SETS)}")
        return _read_file(p)
    d = data_dir()
    if source == "c4":
        files = sorted((d / "c4").glob("*.parquet")) if d else []
        if files:
            docs = [t for f in files for t in _read_file(f)]
            if purpose == "eval":
                return docs[:C4_EVAL_DOCS]
            return docs[C4_EVAL_DOCS:] if len(docs) > C4_EVAL_DOCS else docs
        return _online("c4", "validation" if purpose == "eval" else "train")[: C4_EVAL_DOCS if purpose == "eval" else None]
    # wikitext2
    if d and (d / "wikitext2").is_dir():
        rows = d / "wikitext2" / "wiki.test.hf_rows.jsonl"
        if purpose == "calibration":
            log.warning("offline WikiText-2 has only the test split: calibration text overlaps evaluation text")
        if rows.is_file():
            return ["\n\n".join(_jsonl_rows(rows))]
        raw = d / "wikitext2" / "wiki.test.raw"
        if raw.is_file():
            return [raw.read_text(encoding="utf-8")]
    rows = _online("wikitext2", "test" if purpose == "eval" else "train")
    return ["\n\n".join(rows)]


def eval_token_ids(tokenizer, source: str, seqlen: int | None = None) -> torch.Tensor:
    """Token ids (1-D) of an evaluation set, tokenised once.

    wikitext2: rows joined with "\\n\\n". c4: the first 1,100 validation documents joined with " ",
    cut to 256 windows of seqlen (the papers' convention).
    """
    docs = load_documents(source, "eval")
    text = " ".join(docs) if source == "c4" else "\n\n".join(docs)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    if source == "c4" and seqlen:
        ids = ids[: 256 * seqlen]
    return ids


def calibration_windows(tokenizer, source: str, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """(nsamples, seqlen) token windows, C4-style: a random document longer than seqlen, a random window in it.

    Documents are drawn with a seeded RNG; when no document is long enough (a single text file, or
    seqlen larger than every document), windows are drawn from the documents joined with "\\n\\n".
    """
    if nsamples < 1 or seqlen < 2:
        raise PrunekitError(f"need nsamples >= 1 and seqlen >= 2 (got {nsamples}, {seqlen})")
    docs = [d for d in load_documents(source, "calibration") if d and d.strip()]
    if not docs:
        raise PrunekitError(f"calibration source {source!r} has no text")
    rng = random.Random(seed)
    encoded: dict[int, list[int]] = {}

    def enc(i: int) -> list[int]:
        if i not in encoded:
            encoded[i] = tokenizer(docs[i], add_special_tokens=False).input_ids
        return encoded[i]

    out = []
    if len(docs) > 1:
        order = list(range(len(docs)))
        tries = 0
        max_tries = max(50 * nsamples, 2 * len(docs))
        while len(out) < nsamples and tries < max_tries:
            tries += 1
            ids = enc(rng.randrange(len(docs)))
            if len(ids) > seqlen:
                start = rng.randrange(len(ids) - seqlen)
                out.append(ids[start:start + seqlen])
            elif len(encoded) == len(order) and not any(len(v) > seqlen for v in encoded.values()):
                break
    if len(out) < nsamples:
        if out:
            log.info("only %d of %d windows from single long documents; the rest from the joined text", len(out), nsamples)
        stream = tokenizer("\n\n".join(docs), add_special_tokens=False).input_ids
        if len(stream) < nsamples * seqlen:
            raise PrunekitError(
                f"calibration text too short: {len(stream)} tokens for {nsamples} samples x {seqlen} tokens "
                f"(= {nsamples * seqlen}); use more text, fewer samples or a shorter seqlen"
            )
        while len(out) < nsamples:
            start = rng.randrange(len(stream) - seqlen + 1)
            out.append(stream[start:start + seqlen])
    return torch.tensor(out, dtype=torch.long)
