"""The job's output folder: written in a hidden temporary sibling, published whole, finished work kept.

A job runs as named steps (``with job.step("quantize"):``) and records each output it finishes
(``job.keep("fake")``). On success the folder becomes ``save.save_path``. When a step fails:

* nothing finished yet: the temporary folder is removed (``save_path`` is left as it was);
* something finished (AWQ's searched scales, an export): the folder is published anyway, its
  marker saying ``status: failed`` with the step and the error, and :class:`JobFailed` is
  raised so the job still exits non-zero and says which step failed and what was kept.

Either way the log of the failed job is copied to ``<save_path>.failed.log``; a later successful
run of the same ``save_path`` removes that file.
"""
from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from loguru import logger

from llmc.export.atomic import new_temp, publish, remove_stale_temps
from llmc.strict import ConfigError

LOG_NAME = "llmc.log"
FAILED_LOG_HEADER = "# llmc: log of a failed job\n"


class JobFailed(RuntimeError):
    """A step failed after some outputs were finished; they are kept in the published folder."""

    def __init__(self, step: str, save: Path, kept: list[str], cause: BaseException) -> None:
        self.step, self.save, self.kept = step, save, kept
        super().__init__(f"step '{step}' failed: {type(cause).__name__}: {cause}. Finished outputs are kept in "
                         f"{save}: {', '.join(kept)} (log: {save / LOG_NAME})")


class JobFolder:
    """The temporary folder of one job (``.path``), its current step and its finished outputs."""

    def __init__(self, save: Path, log_level: str = "INFO") -> None:
        self.save = save
        self.path = new_temp(save)
        self.current = "start"
        self.kept: list[str] = []
        self._sink = logger.add(self.path / LOG_NAME, level=log_level)
        remove_stale_temps(save)  # after the sink: the job's log says what it removed

    @property
    def failed_log(self) -> Path:
        return self.save.parent / f"{self.save.name}.failed.log"

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        """Run a named step (the name is what a failure reports)."""
        self.current = name
        logger.debug(f"step: {name}")
        yield

    def keep(self, name: str) -> None:
        """``name`` (a file or folder in the job folder) is finished: a later failure keeps it."""
        self.kept.append(name)

    def succeed(self) -> Path:
        logger.remove(self._sink)
        publish(self.path, self.save, "complete", outputs=self.kept)
        if self.failed_log.is_file() and self.failed_log.read_text().startswith(FAILED_LOG_HEADER):
            self.failed_log.unlink()
        return self.save

    def fail(self, exc: BaseException) -> BaseException:
        """Record the failure; publish what was finished. Returns the exception to raise.

        A bad input found once the model is loaded (``ConfigError``: a pattern matching no layer, a
        group size that does not divide) leaves nothing behind: its message says it all."""
        logger.bind(file_only=True).opt(exception=exc).error(f"step '{self.current}' failed")
        logger.remove(self._sink)
        if isinstance(exc, ConfigError) and not self.kept:
            shutil.rmtree(self.path, ignore_errors=True)
            return exc
        self._write_failed_log()
        if not self.kept:
            shutil.rmtree(self.path, ignore_errors=True)
            return exc
        publish(self.path, self.save, "failed", failed_step=self.current, error=f"{type(exc).__name__}: {exc}",
                outputs=self.kept)
        return JobFailed(self.current, self.save, self.kept, exc)

    def _write_failed_log(self) -> None:
        target = self.failed_log
        if target.exists() and not target.read_text(errors="replace").startswith(FAILED_LOG_HEADER):
            logger.warning(f"{target} exists and is not llmc's: the failed job's log stays in its folder only")
            return
        target.write_text(FAILED_LOG_HEADER + (self.path / LOG_NAME).read_text(errors="replace"))
        logger.error(f"step '{self.current}' failed; the log of the failed job is at {target}")


class WorkerJob:
    """The job as seen by a rank other than 0 under torch.distributed: same steps, no folder, nothing
    written (rank 0's :class:`JobFolder` holds the job's log and outputs)."""

    path = None

    def __init__(self) -> None:
        self.current = "start"
        self.kept: list[str] = []

    step = JobFolder.step

    def keep(self, name: str) -> None:
        """Nothing is kept: a worker writes no output."""

    def succeed(self) -> None:
        return None

    def fail(self, exc: BaseException) -> BaseException:
        logger.bind(file_only=True).opt(exception=exc).error(f"step '{self.current}' failed")
        return exc
