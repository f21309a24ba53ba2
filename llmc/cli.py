"""Command line of llmc.

* ``python -m llmc CONFIG [--overwrite] [--debug]`` (also ``llmc run CONFIG``, ``tpu/llm_quant.py
  --config_path CONFIG``): one quantization job.
* ``python -m llmc inspect MODEL_DIR``: what ``model.type: auto`` finds (docs/add_model.md).
* ``python -m llmc doctor``: versions, the device and the known incompatibilities.

Exit codes: 0 success, 2 a bad config, path or input (nothing was written), 1 any other failure.
A failure prints one line on the console; the traceback goes to the job's log (``--debug``
prints it on the console too).
"""
from __future__ import annotations

import argparse
import sys
import traceback

from loguru import logger

from llmc.strict import ConfigError

SUBCOMMANDS = {
    "run": "run one quantization job from a YAML config (the default: `llmc CONFIG` is `llmc run CONFIG`)",
    "inspect": "show what `model.type: auto` finds in a checkpoint folder (no weights are read)",
    "doctor": "print versions and the device; check the known incompatibilities, with a fix for each",
}
USAGE_ERRORS = (ConfigError, FileExistsError, FileNotFoundError, ValueError)


def build_parser() -> argparse.ArgumentParser:
    epilog = "subcommands:\n" + "\n".join(f"  {k:8s} {v}" for k, v in SUBCOMMANDS.items())
    epilog += "\n\n`llmc SUBCOMMAND --help` shows a subcommand's options."
    usage = ("llmc [run] CONFIG [--overwrite] [--debug]\n       llmc inspect MODEL_DIR [--trust-remote-code]"
             "\n       llmc doctor")
    p = argparse.ArgumentParser(prog="llmc", description="Post-training quantization of (vision-)language models.",
                                usage=usage, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", help="YAML config file")
    p.add_argument("--config_path", "--config-path", dest="config_path", help="YAML config file (same as CONFIG)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing save.save_path (only a folder llmc wrote)")
    p.add_argument("--debug", action="store_true", help="print tracebacks on the console too")
    return p


def inspect_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmc inspect", description="Show what model.type: auto finds in a checkpoint.")
    p.add_argument("model_dir", help="a local checkpoint folder (config.json); no weights are read")
    p.add_argument("--trust-remote-code", action="store_true", help="run code files shipped with the checkpoint")
    p.add_argument("--depth", type=int, default=6, help="module tree depth")
    return p


def inspect_main(argv: list[str]) -> int:
    """Print the inspection report; 0 if model.type auto handles the model, 3 if it refuses, 2 on a bad path."""
    args = inspect_parser().parse_args(argv)
    from llmc.models.inspect import inspect_report

    try:
        report, handled = inspect_report(args.model_dir, args.trust_remote_code, args.depth)
    except (OSError, ValueError) as exc:
        print(f"llmc inspect: error: {exc}", file=sys.stderr)
        return 2
    print(report)
    return 0 if handled else 3


def _console_sink(debug: bool) -> None:
    """INFO and above on stderr; records bound with ``file_only`` (tracebacks) only with ``--debug``.

    Under torchrun, ranks other than 0 print warnings and errors only, marked with their rank."""
    from llmc.distributed import env_rank

    logger.remove()
    rank = env_rank()
    fmt = "<green>{time:HH:mm:ss}</green> | <level>{level: <8}</level> | " + (f"[rank {rank}] " if rank else "") + \
        "<level>{message}</level>"
    logger.add(sys.stderr, level="WARNING" if rank else "INFO", format=fmt,
               filter=None if debug else (lambda r: not r["extra"].get("file_only")))


def run_main(argv: list[str]) -> int:
    """Run one job; 0 on success, 2 on a bad config, path or input, 1 on any other failure."""
    args = build_parser().parse_args(argv)
    path = args.config_path or args.config
    if not path:
        build_parser().print_usage(sys.stderr)
        print("llmc: error: give a config file (or a subcommand: " + ", ".join(SUBCOMMANDS) + ")", file=sys.stderr)
        return 2
    _console_sink(args.debug)
    from llmc.distributed import exit_failed

    code = _run_job(path, args.overwrite, args.debug)
    return exit_failed(code) if code else 0


def _run_job(path: str, overwrite: bool, debug: bool) -> int:
    from llmc import distributed as dist
    from llmc.runner import JobFailed

    who = f"[rank {dist.env_rank()}] " if dist.env_rank() else ""  # torchrun mixes the ranks' stderr
    try:
        from llmc.config import load_config
        from llmc.runner import run_job

        try:
            run_job(load_config(path), overwrite=overwrite)
        except BaseException as exc:  # under torchrun: a failure before the job's own handling
            err = dist.on_failure(exc)
            if err is exc:
                raise
            raise err from exc
    except USAGE_ERRORS as exc:
        if debug:
            traceback.print_exc()
        print(f"{who}llmc: error: {exc}", file=sys.stderr)
        return 2
    except JobFailed as exc:
        print(f"{who}llmc: failed: {exc}", file=sys.stderr)
        return 2 if isinstance(exc.__cause__, USAGE_ERRORS) else 1
    except Exception as exc:  # noqa: BLE001 - any failure must give a non-zero exit code
        if debug:
            traceback.print_exc()
        print(f"{who}llmc: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "inspect":
        return inspect_main(argv[1:])
    if argv and argv[0] == "doctor":
        from llmc.doctor import doctor_main

        return doctor_main(argv[1:])
    if argv and argv[0] == "run":
        argv = argv[1:]
    return run_main(argv)
