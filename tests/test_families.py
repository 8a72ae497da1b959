"""Architecture knowledge (prunekit.core.families): a calibration length beyond the model's context and an
architecture outside the family table are refused with one clear error."""
import pytest

import prunekit
from prunekit.core.errors import PrunekitError

from conftest import tiny_model


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
