"""The lmms-eval modules llmc uses, imported without losing the caller's loguru handlers.

Importing ``lmms_eval.models`` (and ``lmms_eval.llm_judge.launcher``, pulled in by the
evaluator) calls ``loguru.logger.remove()`` and adds its own stdout handler: a job's log
file sink would silently vanish and removing it later would raise. Here the import runs
with ``remove`` disabled and the handlers lmms-eval added are dropped afterwards, so the
handlers are exactly what they were. Every llmc module imports lmms-eval through this one.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

from loguru import logger
from loguru._logger import Logger


@contextlib.contextmanager
def loguru_handlers_kept() -> Iterator[None]:
    """Run the body (imports) with ``logger.remove`` disabled; drop the handlers it added."""
    before = set(logger._core.handlers)
    remove = Logger.remove
    Logger.remove = lambda self, handler_id=None: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        Logger.remove = remove  # type: ignore[method-assign]
        for handler_id in set(logger._core.handlers) - before:
            logger.remove(handler_id)


with loguru_handlers_kept():
    from lmms_eval import evaluator, models
    from lmms_eval.api.model import lmms
    from lmms_eval.tasks import TaskManager
    from lmms_eval.tasks.mme import utils as mme_utils

__all__ = ["TaskManager", "evaluator", "lmms", "loguru_handlers_kept", "mme_utils", "models"]
