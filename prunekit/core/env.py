"""Versions and machine description recorded with every report and benchmark."""
from __future__ import annotations

import platform

import torch

from ..version import __version__


def versions() -> dict:
    import transformers

    return {"prunekit": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def machine() -> dict:
    import os

    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
