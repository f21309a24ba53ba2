"""``python tpu/llm_dequant.py --input AWQ_DIR --output NEW_DIR [--dtype float16]``.

AutoAWQ GEMM checkpoint (llmc's ``save_autoawq`` or a published one) -> float
checkpoint without ``quantization_config``, e.g. for TPU-MLIR's
``llm_convert.py``. Writes a new folder atomically, refuses an existing
output, never touches the input. Exit codes: 0 ok, 2 bad arguments/input.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, help="AutoAWQ GEMM checkpoint folder (read only)")
    parser.add_argument("--output", required=True, help="new float checkpoint folder (must not exist)")
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                        help="dtype of the float weights (default: the checkpoint's dtype)")
    args = parser.parse_args(argv)
    from llmc.export.dequant import dequantize_awq_folder

    try:
        dequantize_awq_folder(args.input, args.output, args.dtype)
    except (FileExistsError, FileNotFoundError, ValueError) as exc:
        print(f"llm_dequant: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
