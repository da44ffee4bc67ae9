#!/usr/bin/env bash
# Terminal chat, streamed: one backbone, any number of named prefixes, switched with /prefix in the session.
#   bash scripts/chat.sh                                  # embedded tiny GLM (+ the main job's prefix, if trained)
#   bash scripts/chat.sh MODEL=/models/chatglm3-6b QUANTIZATION_BIT=4 \
#       PREFIXES=adgen=/ckpt/adgen-chatglm3-pt-128-2e-2/checkpoint-3000 DO_SAMPLE=true
#   bash scripts/chat.sh PREFIXES=ner=output/ner-ptuning_v2-64-1e-1,sent=output/sentiment-ptuning_v2-64-1e-1 PREFIX=sent
# PREFIXES unset: the main job's prefix when it exists (embedded model only); PREFIXES= (empty): the bare
# backbone. Any --flag value goes to python -m ptuning_v2.chat (e.g. --query "..." answers once and exits).
set -euo pipefail
cd "$(dirname "$0")/.."

KEYS="MODEL QUANTIZATION_BIT PREFIXES PREFIX SYSTEM DO_SAMPLE TOP_P TEMPERATURE MAX_NEW_TOKENS SEED"
source scripts/lib.sh
parse_overrides "$KEYS" "$@"

MODEL=${MODEL:-models/glm-zh-tiny}
QUANTIZATION_BIT=${QUANTIZATION_BIT:-none}

# Generation keys left unset keep GenerationSettings' defaults (greedy, up to 128 new tokens).
check_choice QUANTIZATION_BIT none 4 8
if is_set DO_SAMPLE; then check_bool DO_SAMPLE; fi
if is_set TOP_P; then check_number TOP_P 0 1; fi
if is_set TEMPERATURE; then check_number TEMPERATURE "" ""; fi
if is_set MAX_NEW_TOKENS; then check_int MAX_NEW_TOKENS 1; fi
[[ -n "${SEED:-}" ]] && check_int SEED 0

ARGS=(--model "$MODEL" --quantization_bit "$QUANTIZATION_BIT")
pass_flags "DO_SAMPLE=do_sample TOP_P=top_p TEMPERATURE=temperature MAX_NEW_TOKENS=max_new_tokens"
[[ -n "${PREFIXES+set}" ]] && ARGS+=(--prefixes "$PREFIXES")
[[ -n "${PREFIX:-}" ]] && ARGS+=(--prefix "$PREFIX")
[[ -n "${SYSTEM:-}" ]] && ARGS+=(--system "$SYSTEM")
[[ -n "${SEED:-}" ]] && ARGS+=(--seed "$SEED")

# exec: Ctrl-C reaches Python alone (it stops the reply), not bash as well.
exec python -m ptuning_v2.chat "${ARGS[@]}" "${PASSTHROUGH[@]}"
