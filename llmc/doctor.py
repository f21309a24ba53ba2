"""``python -m llmc doctor``: versions, the device, and the known incompatibilities, checked by importing.

Every check imports what a job imports (lmms-eval's evaluator included) and, when it fails,
prints a one-line fix. Exit code 0 when every check passes, 1 otherwise; ``.ci/run`` runs it
before the tests.
"""
from __future__ import annotations

import importlib
import importlib.metadata as md
import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass

LOCK_FIX = "reinstall from the lock: pip install -r requirements.lock && pip install --no-deps -e ."

PACKAGES = ("torch", "torchvision", "transformers", "accelerate", "safetensors", "lmms-eval",
            "compressed-tensors", "gguf", "filelock", "numpy")


@dataclass(frozen=True)
class Check:
    """One import-level check: ``run`` raises on failure; ``fix`` is the one line that repairs it."""

    name: str
    run: Callable[[], None]
    fix: str


def version(dist: str) -> str:
    """The installed version of distribution ``dist``, or ``'not installed'``."""
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "not installed"


def _import(*modules: str) -> Callable[[], None]:
    def run() -> None:
        for m in modules:
            importlib.import_module(m)
    return run


def _filelock_api() -> None:
    """lmms-eval 0.7.3 imports ``filelock._api``, which filelock 4.3 removed."""
    try:
        importlib.import_module("filelock._api")
    except ModuleNotFoundError as exc:
        raise RuntimeError(f"filelock {version('filelock')} has no filelock._api (lmms-eval 0.7.3 imports it)") from exc


def _lmms_eval() -> None:
    from llmc.eval.lmms_compat import TaskManager, evaluator  # noqa: F401  (what a job with eval imports)

    if not callable(getattr(evaluator, "simple_evaluate", None)):
        raise RuntimeError("lmms_eval.evaluator has no simple_evaluate")


def _torchvision_ops() -> None:
    """torchvision's compiled ops must match torch (a CUDA torchvision beside a +cpu torch fails here)."""
    import torch
    import torchvision

    torchvision.ops.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)


def _qwen2_vl_processor() -> None:
    """The processors of the default model import (they need torchvision's transforms)."""
    from transformers import Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor  # noqa: F401


CHECKS: tuple[Check, ...] = (
    Check("torch", _import("torch"), "pip install torch==2.14.1 (see requirements.lock)"),
    Check("torchvision ops", _torchvision_ops,
          "torchvision does not match torch: pip install torch==2.14.1 torchvision==0.29.1"),
    Check("transformers VLM classes", _qwen2_vl_processor, "pip install transformers==5.23.0 (" + LOCK_FIX + ")"),
    Check("accelerate", _import("accelerate"), "pip install accelerate==1.15.0"),
    Check("safetensors", _import("safetensors.torch"), "pip install safetensors"),
    Check("filelock._api", _filelock_api, "pip install 'filelock<4.3' (lmms-eval 0.7.3 needs filelock._api)"),
    Check("lmms-eval evaluator", _lmms_eval, "pip install lmms-eval==0.7.3 'filelock<4.3' (" + LOCK_FIX + ")"),
    Check("compressed-tensors", _import("compressed_tensors.compressors", "compressed_tensors.quantization"),
          "pip install compressed-tensors==0.20.0"),
    Check("gguf", _import("gguf"), "pip install gguf==0.19.0"),
)


def device_line() -> str:
    """What ``run.device: auto`` would pick, and why."""
    try:
        import torch
    except Exception as exc:  # noqa: BLE001 - doctor reports, never raises
        return f"unknown (torch does not import: {exc})"
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        return f"cuda ({torch.cuda.device_count()} GPU: {names}); run.device auto picks cuda"
    return f"cpu ({torch.get_num_threads()} threads); run.device auto picks cpu (no CUDA device)"


def run_checks(checks: tuple[Check, ...] = CHECKS) -> list[tuple[Check, str | None]]:
    """Run every check; ``(check, None)`` when it passed, else ``(check, error text)``."""
    results = []
    for c in checks:
        try:
            c.run()
            results.append((c, None))
        except Exception as exc:  # noqa: BLE001 - every failure is reported with its fix
            results.append((c, f"{type(exc).__name__}: {exc}".splitlines()[0]))
    return results


def doctor_main(argv: list[str] | None = None) -> int:
    """Print the report; 0 when every check passed, 1 otherwise."""
    print(f"python {platform.python_version()} ({sys.executable})")
    for dist in PACKAGES:
        print(f"{dist:20s} {version(dist)}")
    print(f"device               {device_line()}")
    failed = 0
    for check, error in run_checks():
        if error is None:
            print(f"ok    {check.name}")
        else:
            failed += 1
            print(f"FAIL  {check.name}: {error}\n      fix: {check.fix}")
    print("all checks passed" if not failed else f"{failed} check(s) failed")
    return 0 if not failed else 1
