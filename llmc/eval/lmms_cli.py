"""``python -m llmc.eval.lmms_cli ARGS``: lmms-eval's CLI with ``--model llmc`` registered.

Same arguments as ``python -m lmms_eval`` (e.g. ``--model llmc --model_args pretrained=DIR
--tasks mme_synth --include_path TASKS --output_path OUT``). Works without installing llmc;
``python -m lmms_eval`` itself needs the entry point (installed llmc) or
``LMMS_EVAL_PLUGINS=llmc.eval``. lmms-eval exits 0 even when a task failed: read the results
file, not the exit status.
"""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    from llmc.eval.lmms_wrapper import register

    register()
    from lmms_eval.cli.dispatch import main as lmms_main

    sys.argv = [sys.argv[0]] + list(sys.argv[1:] if argv is None else argv)
    lmms_main()


if __name__ == "__main__":
    main()
