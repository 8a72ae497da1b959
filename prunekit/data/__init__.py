"""Calibration and evaluation text: local files, an offline mirror (PRUNEKIT_DATA_DIR), or `datasets` online."""
from .sources import (  # noqa: F401
    calibration_windows,
    data_dir,
    eval_token_ids,
    load_documents,
    NAMED_SETS,
)
