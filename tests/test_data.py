"""Text sources (prunekit.core.data): calibration windows (seeded, each from a single document, never from
C4's evaluation documents), local file formats, the WikiText-2 evaluation stream, and a calibration text
too short for the windows asked for."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from prunekit.core.data import calibration_windows, eval_token_ids, load_documents
from prunekit.core.data import C4_EVAL_DOCS
from prunekit.core.errors import PrunekitError

from conftest import TINY_TEXT


def test_windows_shape_and_seed(gpt2_tokenizer):
    a = calibration_windows(gpt2_tokenizer, "c4", 8, 64, seed=0)
    b = calibration_windows(gpt2_tokenizer, "c4", 8, 64, seed=0)
    c = calibration_windows(gpt2_tokenizer, "c4", 8, 64, seed=1)
    assert a.shape == (8, 64) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_windows_come_from_single_documents(gpt2_tokenizer):
    docs = load_documents("c4", "calibration")
    w = calibration_windows(gpt2_tokenizer, "c4", 4, 32, seed=3)
    encoded = [gpt2_tokenizer(d, add_special_tokens=False).input_ids for d in docs]
    for row in w.tolist():
        assert any(any(e[i:i + 32] == row for i in range(len(e) - 31)) for e in encoded if len(e) > 32)


def test_c4_calibration_never_sees_eval_documents():
    cal = load_documents("c4", "calibration")
    ev = load_documents("c4", "eval")
    assert len(ev) == C4_EVAL_DOCS and not set(cal) & set(ev)


@pytest.mark.parametrize("kind", ["txt", "jsonl", "jsonl-obj", "parquet"])
def test_local_file_formats(tmp_path, gpt2_tokenizer, kind):
    text = TINY_TEXT.read_text()
    paras = [p for p in text.split("\n") if p.strip()]
    if kind == "txt":
        f = tmp_path / "a.txt"
        f.write_text(text)
    elif kind.startswith("jsonl"):
        f = tmp_path / "a.jsonl"
        f.write_text("\n".join(json.dumps(p if kind == "jsonl" else {"text": p}) for p in paras))
    else:
        f = tmp_path / "a.parquet"
        pq.write_table(pa.table({"text": paras}), f)
    docs = load_documents(str(f))
    assert "".join(docs).replace("\n", "") == "".join(paras) if kind != "txt" else docs == [text]
    w = calibration_windows(gpt2_tokenizer, str(f), 5, 48, seed=0)
    assert w.shape == (5, 48)


def test_wikitext_is_rows_joined(gpt2_tokenizer):
    ids = eval_token_ids(gpt2_tokenizer, "wikitext2")
    # MANIFEST: the joined rows are 287,644 GPT-2 tokens
    assert ids.numel() == 287644


def test_calibration_text_too_short(tmp_path, gpt2_tokenizer):
    f = tmp_path / "short.txt"
    f.write_text("just a few words of text here")
    with pytest.raises(PrunekitError, match=r"calibration text too short: \d+ tokens for 4 samples x 16 tokens"):
        calibration_windows(gpt2_tokenizer, str(f), 4, 16)
