"""The ``lmms_eval.models`` entry point: ``--model llmc`` for ``python -m lmms_eval``.

lmms-eval loads its entry points while ``lmms_eval.models`` itself is still being imported
(its registry is built at import time), and llmc's own evaluation imports ``lmms_eval.models``
(through :mod:`llmc.eval.lmms_compat`). So this module imports nothing of llmc's evaluation at
load time, and lmms-eval only when the manifest is asked for: by then the registry module
exists, and loading the entry point from inside an llmc job is no circular import.
"""
from __future__ import annotations

from typing import Any

MODEL_NAME = "llmc"
CLASS_PATH = "llmc.eval.lmms_wrapper.LLMCLMM"


def lmms_manifest() -> Any:
    """Entry point payload (an lmms-eval ``ModelManifest``) naming :class:`llmc.eval.lmms_wrapper.LLMCLMM`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=CLASS_PATH)
