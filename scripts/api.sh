#!/usr/bin/env bash
# OpenAI-compatible chat server: one backbone, many prefixes, requests for different prefixes batched together.
#   bash scripts/api.sh                                   # embedded tiny GLM (+ the main job's prefix, if trained)
#   bash scripts/api.sh PORT=8001 MODEL=/models/chatglm3-6b QUANTIZATION_BIT=4 \
#       PREFIXES=ner=output/ner-ptuning_v2-64-1e-1,adgen=/ckpt/adgen-chatglm3-pt-128-2e-2/checkpoint-3000
#   bash scripts/api.sh API_KEY=secret                    # then every request needs "Authorization: Bearer secret"
#   bash scripts/setup_vllm.sh && bash scripts/api.sh ENGINE=vllm TENSOR_PARALLEL_SIZE=2 PREFIXES=ner=output/ner
# It binds 127.0.0.1 unless HOST=0.0.0.0 (or an address) is given on this command line. Any other --flag value
# goes to python -m ptuning_v2.serving.api (ENGINE=native, the default) or to `vllm serve` (ENGINE=vllm).
set -euo pipefail
cd "$(dirname "$0")/.."

KEYS="HOST PORT MODEL QUANTIZATION_BIT PREFIXES API_KEY MAX_BATCH_SIZE BATCH_WAIT_MS MAX_REQUEST_MESSAGES MAX_REQUEST_CHARS
ENGINE TENSOR_PARALLEL_SIZE PIPELINE_PARALLEL_SIZE GPU_MEMORY_UTILIZATION VLLM_TABLES_DIR"
# Shells and platforms set HOST for their own reasons; the address to expose the server on must be asked for here.
unset HOST
source scripts/lib.sh
parse_overrides "$KEYS" "$@"

HOST=${HOST:-127.0.0.1}
PORT=${PORT:-8000}
MODEL=${MODEL:-models/glm-zh-tiny}
QUANTIZATION_BIT=${QUANTIZATION_BIT:-none}
MAX_BATCH_SIZE=${MAX_BATCH_SIZE:-16}
BATCH_WAIT_MS=${BATCH_WAIT_MS:-10}

ENGINE=${ENGINE:-native}
check_choice ENGINE native vllm
check_int PORT 1
((PORT <= 65535)) || fail "PORT must be at most 65535, got '$PORT'"
check_int MAX_BATCH_SIZE 1
check_number BATCH_WAIT_MS "" ""
check_choice QUANTIZATION_BIT none 4 8
[[ -n "$HOST" ]] || fail "HOST must not be empty"
# Unset: what fits the loaded model's context (the server prints the limits it uses).
[[ -n "${MAX_REQUEST_MESSAGES:-}" ]] && check_int MAX_REQUEST_MESSAGES 1
[[ -n "${MAX_REQUEST_CHARS:-}" ]] && check_int MAX_REQUEST_CHARS 1

if [[ "$ENGINE" == vllm ]]; then
  for key in MAX_REQUEST_MESSAGES MAX_REQUEST_CHARS; do
    [[ -z "${!key:-}" ]] || fail "$key is the native engine's; vLLM bounds requests by --max-model-len"
  done
  [[ "$QUANTIZATION_BIT" == 8 ]] && fail "QUANTIZATION_BIT=8: vLLM quantizes a backbone in flight to 4 bits only (bitsandbytes); use 4 or none"
  is_set TENSOR_PARALLEL_SIZE && check_int TENSOR_PARALLEL_SIZE 1
  is_set PIPELINE_PARALLEL_SIZE && check_int PIPELINE_PARALLEL_SIZE 1
  is_set GPU_MEMORY_UTILIZATION && check_number GPU_MEMORY_UTILIZATION 0 1
  # VLLM_PYTHON (environment only): another vLLM environment's python, as scripts/check_compat.sh uses.
  VLLM_PYTHON=${VLLM_PYTHON:-.venv-vllm/bin/python}
  [[ -x "$VLLM_PYTHON" ]] || fail "ENGINE=vllm needs the vLLM environment: run bash scripts/setup_vllm.sh first"
  # The tables are computed here, in the project's environment, where every checkpoint format is read; a
  # checkpoint that does not fit fails now, naming it, before vLLM starts.
  TABLES=${VLLM_TABLES_DIR:-output/vllm-prefixes-$PORT}
  EXPORT=(python -m ptuning_v2.vllm_serving.export --model "$MODEL" --out "$TABLES" --quantization_bit "$QUANTIZATION_BIT")
  [[ -n "${PREFIXES+set}" ]] && EXPORT+=(--prefixes "$PREFIXES")
  print_command "${EXPORT[@]}"
  "${EXPORT[@]}"
  ARGS=(--manifest "$TABLES" --host "$HOST" --port "$PORT" --max_batch_size "$MAX_BATCH_SIZE"
    --quantization_bit "$QUANTIZATION_BIT")
  is_set TENSOR_PARALLEL_SIZE && ARGS+=(--tensor-parallel-size "$TENSOR_PARALLEL_SIZE")
  is_set PIPELINE_PARALLEL_SIZE && ARGS+=(--pipeline-parallel-size "$PIPELINE_PARALLEL_SIZE")
  is_set GPU_MEMORY_UTILIZATION && ARGS+=(--gpu-memory-utilization "$GPU_MEMORY_UTILIZATION")
  # vLLM reads its key from the environment, so it stays out of argv too.
  [[ -n "${API_KEY:-}" ]] && export VLLM_API_KEY="$API_KEY"
  CMD=("$VLLM_PYTHON" -m ptuning_v2.vllm_serving.launch "${ARGS[@]}" "${PASSTHROUGH[@]}")
  print_command "${CMD[@]}"
  exec "${CMD[@]}"
fi

ARGS=(--host "$HOST" --port "$PORT" --model "$MODEL" --quantization_bit "$QUANTIZATION_BIT"
  --max_batch_size "$MAX_BATCH_SIZE" --batch_wait_ms "$BATCH_WAIT_MS")
# PREFIXES unset: the main job's prefix when it exists; PREFIXES= (empty): the bare backbone only.
[[ -n "${PREFIXES+set}" ]] && ARGS+=(--prefixes "$PREFIXES")
[[ -n "${MAX_REQUEST_MESSAGES:-}" ]] && ARGS+=(--max_request_messages "$MAX_REQUEST_MESSAGES")
[[ -n "${MAX_REQUEST_CHARS:-}" ]] && ARGS+=(--max_request_chars "$MAX_REQUEST_CHARS")
# The key travels in the environment, not in argv where `ps` would show it.
if [[ -n "${API_KEY:-}" ]]; then
  export PTUNING_V2_API_KEY="$API_KEY"
fi

CMD=(python -m ptuning_v2.serving.api "${ARGS[@]}" "${PASSTHROUGH[@]}")
print_command "${CMD[@]}"
exec "${CMD[@]}"
