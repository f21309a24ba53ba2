"""``python tpu/llm_quant.py --config_path cfg.yml``: the same job as ``python -m llmc cfg.yml``."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llmc.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
