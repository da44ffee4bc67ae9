#!/usr/bin/env bash
# Web chat demo (Gradio): streamed replies, history, a clear button, sliders for max length, top_p and
# temperature, and a choice of prefix (or none).
#   bash scripts/web_demo.sh                              # embedded tiny GLM (+ the main job's prefix, if trained)
#   bash scripts/web_demo.sh MODEL=/models/chatglm3-6b QUANTIZATION_BIT=4 \
#       PREFIXES=adgen=/ckpt/adgen-chatglm3-pt-128-2e-2/checkpoint-3000
# Open http://127.0.0.1:7860. It binds 127.0.0.1 unless HOST=0.0.0.0 (or an address) is given on this command
# line. PREFIXES unset: the main job's prefix when it exists (embedded model only); PREFIXES= (empty): the bare
# backbone. MAX_NEW_TOKENS, TOP_P and TEMPERATURE set the sliders' starting values (TEMPERATURE=0: greedy).
set -euo pipefail
cd "$(dirname "$0")/.."

KEYS="HOST PORT MODEL QUANTIZATION_BIT PREFIXES MAX_NEW_TOKENS TOP_P TEMPERATURE"
# Shells and platforms set HOST for their own reasons; the address to expose the page on must be asked for here.
unset HOST
source scripts/lib.sh
parse_overrides "$KEYS" "$@"

HOST=${HOST:-127.0.0.1}
PORT=${PORT:-7860}
MODEL=${MODEL:-models/glm-zh-tiny}
QUANTIZATION_BIT=${QUANTIZATION_BIT:-none}

check_int PORT 1
((PORT <= 65535)) || fail "PORT must be at most 65535, got '$PORT'"
check_choice QUANTIZATION_BIT none 4 8
if is_set MAX_NEW_TOKENS; then check_int MAX_NEW_TOKENS 1; fi
if is_set TOP_P; then check_number TOP_P 0 1; fi
if is_set TEMPERATURE; then check_number TEMPERATURE "" 2; fi
[[ -n "$HOST" ]] || fail "HOST must not be empty"

# Slider keys left unset start at GenerationSettings' defaults.
ARGS=(--host "$HOST" --port "$PORT" --model "$MODEL" --quantization_bit "$QUANTIZATION_BIT")
pass_flags "MAX_NEW_TOKENS=max_new_tokens TOP_P=top_p TEMPERATURE=temperature"
[[ -n "${PREFIXES+set}" ]] && ARGS+=(--prefixes "$PREFIXES")

# Gradio must not phone home: no analytics; the page is served from here only (no share link is made).
export GRADIO_ANALYTICS_ENABLED=False HF_HUB_DISABLE_TELEMETRY=1
# Gradio checks that its own address answers; a proxy in the environment must not be asked for loopback.
export NO_PROXY="127.0.0.1,localhost${NO_PROXY:+,$NO_PROXY}" no_proxy="127.0.0.1,localhost${no_proxy:+,$no_proxy}"

CMD=(python -m ptuning_v2.serving.web_demo "${ARGS[@]}" "${PASSTHROUGH[@]}")
print_command "${CMD[@]}"
exec "${CMD[@]}"
