"""Loading a model (prunekit.core.loading): a missing folder and an unknown hub id are one PrunekitError."""
import pytest

import prunekit
from prunekit.core.errors import PrunekitError


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
