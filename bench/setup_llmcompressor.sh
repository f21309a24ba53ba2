#!/usr/bin/env bash
# Create (idempotently) the pinned llm-compressor venv used by bench/vs_llmcompressor.py.
#
#   bash bench/setup_llmcompressor.sh [VENV_DIR]      (default /work/envs/llmcompressor)
#
# Pins: torch 2.13.0 (CPU wheel, found via pip's find-links /opt/wheels where present),
# llmcompressor 0.14.0.1 (which itself caps transformers <= 5.17).
# A venv that already imports the pinned versions is left untouched.
set -euo pipefail

VENV="${1:-/work/envs/llmcompressor}"
PY="${PYTHON:-python3}"
TORCH_VER="2.13.0"
LLMC_VER="0.14.0.1"

check() {
  "$VENV/bin/python" - "$TORCH_VER" "$LLMC_VER" <<'PYEOF' 2>/dev/null
import sys
from importlib.metadata import version
import torch  # noqa: F401  (import must work, not only the metadata)
import llmcompressor  # noqa: F401
ok = version("torch").split("+")[0] == sys.argv[1] and version("llmcompressor") == sys.argv[2]
sys.exit(0 if ok else 1)
PYEOF
}

if [ -x "$VENV/bin/python" ] && check; then
  echo "llm-compressor venv ready: $VENV"
  exit 0
fi

start=$(date +%s)
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# The CPU build of torch when a local wheel folder holds it (PyPI's default build is CUDA).
TORCH_SPEC="torch==${TORCH_VER}"
FIND=()
if [ -d "${WHEELS:-/opt/wheels}" ]; then
  FIND=(--find-links "${WHEELS:-/opt/wheels}")
  ls "${WHEELS:-/opt/wheels}"/torch-"${TORCH_VER}"+cpu-*.whl >/dev/null 2>&1 && TORCH_SPEC="torch==${TORCH_VER}+cpu"
fi
"$VENV/bin/python" -m pip install --quiet "${FIND[@]}" "$TORCH_SPEC" "llmcompressor==${LLMC_VER}"
check || { echo "venv at $VENV does not import the pinned versions" >&2; exit 1; }
"$VENV/bin/python" -c "import torch, transformers, llmcompressor, compressed_tensors as ct; \
print('torch', torch.__version__, 'transformers', transformers.__version__, \
'llmcompressor', llmcompressor.__version__, 'compressed-tensors', ct.__version__)"
echo "llm-compressor venv created in $(( $(date +%s) - start )) s: $VENV"
