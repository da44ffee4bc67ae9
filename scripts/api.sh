#!/usr/bin/env bash
# OpenAI-compatible chat server: one backbone, many prefixes, requests for different prefixes batched together.
#   bash scripts/api.sh                                   # embedded tiny GLM (+ the main job's prefix, if trained)
#   bash scripts/api.sh PORT=8001 MODEL=/models/chatglm3-6b QUANTIZATION_BIT=4 \
#       PREFIXES=ner=output/ner-ptuning_v2-64-1e-1,adgen=/ckpt/adgen-chatglm3-pt-128-2e-2/checkpoint-3000
#   bash scripts/api.sh API_KEY=secret                    # then every request needs "Authorization: Bearer secret"
# It binds 127.0.0.1 unless HOST=0.0.0.0 (or an address) is given on this command line. Any other --flag value
# goes to python -m ptuning_v2.serving.api.
set -euo pipefail
cd "$(dirname "$0")/.."

KEYS="HOST PORT MODEL QUANTIZATION_BIT PREFIXES API_KEY MAX_BATCH_SIZE BATCH_WAIT_MS MAX_REQUEST_MESSAGES MAX_REQUEST_CHARS"
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

check_int PORT 1
((PORT <= 65535)) || fail "PORT must be at most 65535, got '$PORT'"
check_int MAX_BATCH_SIZE 1
check_number BATCH_WAIT_MS "" ""
check_choice QUANTIZATION_BIT none 4 8
[[ -n "$HOST" ]] || fail "HOST must not be empty"
# Unset: what fits the loaded model's context (the server prints the limits it uses).
[[ -n "${MAX_REQUEST_MESSAGES:-}" ]] && check_int MAX_REQUEST_MESSAGES 1
[[ -n "${MAX_REQUEST_CHARS:-}" ]] && check_int MAX_REQUEST_CHARS 1

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
