#!/usr/bin/env bash
# The recipe on a CUDA GPU, end to end: the main job in the GPU's default dtype (bf16 where supported), in fp32,
# and over a 4-bit and an 8-bit backbone (bitsandbytes' CUDA kernels); a chat answer from the trained prefix; the
# quick training and generation benchmarks.
#   bash scripts/gpu_check.sh [LOG_DIR]      # each step's log and results under LOG_DIR (default output/gpu_check)
# The test suite runs on the CPU; this is the check for the GPU path, run by hand on a machine that has one.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG_DIR=${1:-output/gpu_check}
mkdir -p "$LOG_DIR"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
status=0

step() {  # step NAME COMMAND...: run it, keep its log, say how it went and how long it took
  local name=$1; shift
  local started=$SECONDS
  echo "== $name: $*"
  if "$@" >"$LOG_DIR/$name.log" 2>&1; then
    echo "   ok in $((SECONDS - started)) s"
  else
    echo "   FAILED (exit $?) in $((SECONDS - started)) s; the end of $LOG_DIR/$name.log:"
    tail -n 25 "$LOG_DIR/$name.log" | sed 's/^/   | /'
    status=1
  fi
}

python - <<'EOF' | tee "$LOG_DIR/environment.txt"
import torch, transformers, peft, bitsandbytes
print("device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device")
print("torch", torch.__version__, "cuda", torch.version.cuda, "| transformers", transformers.__version__,
      "| peft", peft.__version__, "| bitsandbytes", bitsandbytes.__version__)
EOF
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device: this check is for a GPU machine'" || exit 1

for variant in auto fp32 int4 int8; do  # auto: the loader's GPU default, bf16 where the GPU has it
  case $variant in
    auto) extra=() ;;
    fp32) extra=(TORCH_DTYPE=float32) ;;
    int4) extra=(QUANTIZATION_BIT=4) ;;
    int8) extra=(QUANTIZATION_BIT=8) ;;
  esac
  step "main_job_$variant" bash scripts/train_pt2.sh OUTPUT_DIR="$LOG_DIR/main_job_$variant" OVERWRITE=true "${extra[@]}"
  cp "$LOG_DIR/main_job_$variant/all_results.json" "$LOG_DIR/main_job_$variant.json" 2>/dev/null
  grep -E '^\| (rouge-l|entity-f1) ' "$LOG_DIR/main_job_$variant.log" | sed 's/^/   /'  # before | after | change
done

step chat python -m ptuning_v2.chat --model models/glm-zh-tiny --checkpoint "$LOG_DIR/main_job_auto" \
  --query "找出句中的人名、地名和机构名：李鹏在北京会见了新华社记者。"
step benchmark_train python -m benchmarks.train --quick
step benchmark_generate python -m benchmarks.generate --quick
exit $status
