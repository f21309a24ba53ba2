"""Output folders llmc owns: written whole (hidden sibling, then rename), marked, never anything else.

Every folder llmc writes carries a marker file (:data:`MARKER`, JSON: tool, version, status,
pid, host, time). ``overwrite`` replaces only a folder with that marker: whatever else sits at
the target (a model, data, the user's own files) is refused. A run killed hard leaves its
hidden temporary folder behind; the next run for the same target removes such leftovers, but
only those whose marker names a process of this host that is gone.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from loguru import logger

MARKER = ".llmc-output.json"


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("llmc")
    except Exception:  # noqa: BLE001 - running from a source tree without metadata
        return "unknown"


def write_marker(folder: Path, status: str, **info: Any) -> None:
    """(Re)write ``folder``'s marker with ``status`` (running | complete | failed) and ``info``."""
    data = {"tool": "llmc", "version": _version(), "status": status, "pid": os.getpid(),
            "host": socket.gethostname(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **info}
    (folder / MARKER).write_text(json.dumps(data, indent=1) + "\n")


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The marker of ``folder``, or None when it has none (not an llmc output)."""
    try:
        data = json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("tool") == "llmc" else None


def is_llmc_output(folder: str | Path) -> bool:
    return Path(folder).is_dir() and read_marker(Path(folder)) is not None


def check_replaceable(target: Path, overwrite: bool) -> None:
    """Refuse an existing ``target`` unless ``overwrite`` and it is an llmc output folder."""
    if not target.exists():
        return
    if not overwrite:
        raise FileExistsError(f"{target} already exists; choose another path or pass --overwrite")
    if not is_llmc_output(target):
        raise FileExistsError(f"{target} exists and is not an llmc output folder (it has no {MARKER}); "
                              f"--overwrite replaces only folders llmc wrote. Choose another path")


def _process_gone(marker: dict[str, Any]) -> bool:
    """True when the marker's process ran on this host and no longer exists."""
    if marker.get("host") != socket.gethostname() or not isinstance(marker.get("pid"), int):
        return False
    try:
        os.kill(marker["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def remove_stale_temps(target: str | Path) -> list[Path]:
    """Remove leftovers of killed runs for ``target``: its hidden ``.<name>.tmp-*`` (and ``.init-*``,
    see :func:`new_temp`) folders whose marker names a dead process of this host, and
    ``.<name>.old-*`` llmc folders once ``target`` exists again. Nothing without an llmc marker is touched. Returns what was removed."""
    target = Path(target)
    removed = []
    if not target.parent.is_dir():
        return removed
    kinds = ("tmp", "init", "old")
    for p in [p for kind in kinds for p in sorted(target.parent.glob(f".{target.name}.{kind}-*"))]:
        marker = read_marker(p) if p.is_dir() else None
        if marker is None:
            continue
        stale = is_llmc_output(target) if ".old-" in p.name else _process_gone(marker)
        if stale:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
            logger.info(f"removed {p.name}, left behind by an earlier run that was killed")
    return removed


def new_temp(target: Path) -> Path:
    """A fresh hidden sibling of ``target``, marked as a running llmc output.

    The folder is made and marked under an ``.init-`` name, then renamed: a ``.tmp-`` folder never
    exists without its marker, so a run killed at any moment leaves nothing that
    :func:`remove_stale_temps` cannot recognise (at most an empty ``.init-`` folder)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:8]
    staging = target.parent / f".{target.name}.init-{token}"
    staging.mkdir()
    write_marker(staging, "running")
    tmp = target.parent / f".{target.name}.tmp-{token}"
    staging.rename(tmp)
    return tmp


def publish(tmp: Path, target: Path, status: str = "complete", **info: Any) -> Path:
    """Mark ``tmp`` with ``status`` and rename it to ``target``, replacing an llmc folder there."""
    write_marker(tmp, status, **info)
    old = None
    if target.exists():
        if not is_llmc_output(target):  # checked before the work started; re-checked before replacing
            raise FileExistsError(f"{target} appeared meanwhile and is not an llmc output; kept {tmp}")
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(target, old)
    os.rename(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


@contextmanager
def atomic_dir(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a marked temporary folder that becomes ``target`` only if the block succeeds.

    An existing ``target`` is refused unless ``overwrite`` and it is an llmc output; it is then
    replaced only after the new folder is complete. On any error the temporary folder is
    removed and ``target`` is left as it was.
    """
    target = Path(target)
    check_replaceable(target, overwrite)
    remove_stale_temps(target)
    tmp = new_temp(target)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish(tmp, target)
