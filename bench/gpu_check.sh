#!/usr/bin/env bash
# The prepared GPU check (about 8 minutes at most on one H200, every phase under its own time limit):
#   1. the test suite's CUDA tests (tests/test_cuda.py, marker `cuda`; they skip without a GPU);
#   2. GPTQ, then AWQ, W4A16 g128 on a random-init Qwen2.5-VL of 7B shape, 128 x 2048-token
#      calibration (bench/gpu_check.py): wall time, peak GPU memory, peak RSS, seconds per block.
# Without CUDA (or with --tiny) step 2 runs a tiny shape on CPU: tests/test_gpu_check.py keeps it working.
#
# The GPU machine has torch, transformers and accelerate but no network: what llmc needs beyond them
# is installed from wheels in bench/.whl (not in git; made where there is network, see
# docs/distributed.md "GPU check"):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
#     -d bench/.whl loguru==0.7.3 gguf==0.19.0 pillow==13.0.0 pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 \
#     pygments==2.21.0 torchvision==0.26.0        # torchvision: the one made for torch 2.11 (tiny VLM processors)
# and installed with `pip install --no-index --no-deps --target $SITE <wheels of the missing modules>` + PYTHONPATH.
#
# Usage: bash bench/gpu_check.sh [--tiny]      env: PYTHON, SITE (/tmp/llmc-site), GPTQ_BLOCKS, AWQ_BLOCKS,
#        T_TESTS / T_GPTQ / T_AWQ (seconds per phase)
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
SITE=${SITE:-/tmp/llmc-site}
T0=$(date +%s)

# module -> wheel (name prefix in bench/.whl); only what is missing is installed (never shadow what is there)
wheels=$("$PY" - <<'EOF'
import importlib.util
need = {"loguru": "loguru", "gguf": "gguf", "PIL": "pillow", "pytest": "pytest", "pluggy": "pluggy",
        "iniconfig": "iniconfig", "pygments": "pygments", "torchvision": "torchvision"}
print(" ".join(w for m, w in need.items() if importlib.util.find_spec(m) is None))
EOF
)
if [ -n "$wheels" ]; then
  files=()
  for w in $wheels; do
    f=$(ls bench/.whl/"$w"-*.whl 2>/dev/null | head -1)
    [ -n "$f" ] || { echo "gpu_check: $w is missing and bench/.whl has no wheel for it (see the header)" >&2; exit 2; }
    files+=("$f")
  done
  echo "gpu_check: installing ${files[*]} into $SITE"
  "$PY" -m pip install -q --no-index --no-deps --target "$SITE" "${files[@]}" || exit 2
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

TINY=()
if [ "${1:-}" = "--tiny" ] || ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  TINY=(--tiny)
fi
"$PY" -c 'import torch; print("gpu_check:", torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA")'

status=0
echo "== 1. CUDA tests"
timeout "${T_TESTS:-120}" "$PY" -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py -rs || status=1
for m in GPTQ AWQ; do
  blocks_var="${m}_BLOCKS"; limit_var="T_${m}"
  blocks=${!blocks_var:-0}
  [ "$m" = AWQ ] && [ -z "${AWQ_BLOCKS:-}" ] && [ ${#TINY[@]} -eq 0 ] && blocks=8  # AWQ: ~3x GPTQ per block
  echo "== 2. $m W4A16 g128 (blocks: ${blocks/#0/all})"
  timeout "${!limit_var:-$([ "$m" = GPTQ ] && echo 200 || echo 140)}" \
    "$PY" bench/gpu_check.py "${TINY[@]}" --methods "$m" --blocks "$blocks" || { echo "gpu_check: $m stopped (exit $?)"; status=1; }
done
echo "gpu_check: done in $(( $(date +%s) - T0 ))s, status $status"
exit $status
