"""Command line: ``python -m llmc CONFIG [--overwrite]`` (also ``tpu/llm_quant.py --config_path``).

``python -m llmc inspect MODEL_DIR [--trust-remote-code] [--depth N]``: the module tree, what
``model.type: auto`` finds and the skeleton of an explicit adapter (docs/add_model.md).
"""
from __future__ import annotations

import argparse
import sys

from loguru import logger

from llmc.strict import ConfigError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmc", description="Post-training quantization of (vision-)language models.")
    p.add_argument("config", nargs="?", help="YAML config file")
    p.add_argument("--config_path", "--config-path", dest="config_path", help="YAML config file (same as CONFIG)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing save.save_path")
    return p


def inspect_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmc inspect", description="Show what model.type: auto finds in a checkpoint.")
    p.add_argument("model_dir", help="a checkpoint folder (config.json); no weights are read")
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


def main(argv: list[str] | None = None) -> int:
    """Run one job; 0 on success, 2 on a bad config or path, 1 on any other failure."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "inspect":
        return inspect_main(argv[1:])
    args = build_parser().parse_args(argv)
    path = args.config_path or args.config
    if not path:
        build_parser().print_usage(sys.stderr)
        print("llmc: error: give a config file", file=sys.stderr)
        return 2
    logger.remove()
    logger.add(sys.stderr, level="INFO")
    try:
        from llmc.config import load_config
        from llmc.runner import run_job

        run_job(load_config(path), overwrite=args.overwrite)
    except (ConfigError, FileExistsError, FileNotFoundError, ValueError) as exc:
        print(f"llmc: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - any failure must give a non-zero exit code
        print(f"llmc: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0
