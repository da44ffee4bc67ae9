#!/usr/bin/env bash
# Batched generation + the official ChatGLM metrics: KEY=VALUE overrides, other --flags go to ptuning_v2.evaluate.
#   bash scripts/evaluate.sh CHECKPOINT=output/ner-ptuning_v2-16-2e-2
#   bash scripts/evaluate.sh MODEL=/models/chatglm3-6b CHECKPOINT=... TEST_FILE=AdvertiseGen/dev.json DO_SAMPLE=true
set -euo pipefail
cd "$(dirname "$0")/.."

KEYS="MODEL CHECKPOINT TEST_FILE OUTPUT_DIR BATCH_SIZE MAX_NEW_TOKENS MAX_SOURCE_LENGTH MAX_SAMPLES QUANTIZATION_BIT
DO_SAMPLE TOP_P TEMPERATURE SEED TASK BLEU PROMPT_COLUMN RESPONSE_COLUMN"
source scripts/lib.sh
parse_overrides "$KEYS" "$@"

MODEL=${MODEL:-models/glm-zh-tiny}
CHECKPOINT=${CHECKPOINT-}
TEST_FILE=${TEST_FILE:-data/ner/dev.json}
OUTPUT_DIR=${OUTPUT_DIR:-${CHECKPOINT:-output/base}/eval-$(basename "$(dirname "$TEST_FILE")")-$(basename "$TEST_FILE" .json)}
BATCH_SIZE=${BATCH_SIZE:-32}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-128}
# Default: the checkpoint run's own (its run_config.yaml), else DataConfig's.
MAX_SOURCE_LENGTH=${MAX_SOURCE_LENGTH:-}
MAX_SAMPLES=${MAX_SAMPLES:-}
QUANTIZATION_BIT=${QUANTIZATION_BIT:-none}
DO_SAMPLE=${DO_SAMPLE:-false}
TOP_P=${TOP_P:-0.7}
TEMPERATURE=${TEMPERATURE:-0.95}
SEED=${SEED:-42}
TASK=${TASK:-auto}
BLEU=${BLEU:-chars}
PROMPT_COLUMN=${PROMPT_COLUMN:-content}
RESPONSE_COLUMN=${RESPONSE_COLUMN:-summary}

prepare_bundled_data "$TEST_FILE"

# Every setting is checked before generation starts, also the scorer's (TASK, BLEU), which runs after it.
for key in BATCH_SIZE MAX_NEW_TOKENS; do
  check_int "$key" 1
done
[[ -n "$MAX_SOURCE_LENGTH" ]] && check_int MAX_SOURCE_LENGTH 1
check_int SEED 0
[[ -n "$MAX_SAMPLES" ]] && check_int MAX_SAMPLES 1
check_number TOP_P 0 1
check_number TEMPERATURE 0 ""
check_bool DO_SAMPLE
check_choice QUANTIZATION_BIT none 4 8
check_choice TASK auto ner sentiment none
check_choice BLEU chars words
check_file TEST_FILE
[[ -z "$CHECKPOINT" || -e "$CHECKPOINT" ]] || fail "CHECKPOINT=$CHECKPOINT: no such checkpoint"
[[ ! -e "$OUTPUT_DIR" || -d "$OUTPUT_DIR" ]] || fail "OUTPUT_DIR=$OUTPUT_DIR is a file, not a directory"

ARGS=(
  --model "$MODEL" --test_file "$TEST_FILE" --output_dir "$OUTPUT_DIR" --batch_size "$BATCH_SIZE"
  --max_new_tokens "$MAX_NEW_TOKENS" --quantization_bit "$QUANTIZATION_BIT" --task "$TASK"
  --top_p "$TOP_P" --temperature "$TEMPERATURE" --seed "$SEED" --do_sample "$DO_SAMPLE"
  --prompt_column "$PROMPT_COLUMN" --response_column "$RESPONSE_COLUMN"
)
[[ -n "$CHECKPOINT" ]] && ARGS+=(--checkpoint "$CHECKPOINT")
[[ -n "$MAX_SAMPLES" ]] && ARGS+=(--max_samples "$MAX_SAMPLES")
[[ -n "$MAX_SOURCE_LENGTH" ]] && ARGS+=(--max_source_length "$MAX_SOURCE_LENGTH")

CMD=(python -m ptuning_v2.evaluate "${ARGS[@]}" "${PASSTHROUGH[@]}")
echo "+ ${CMD[*]}"
"${CMD[@]}"
echo "+ python evaluate/rouge.py --predictions $OUTPUT_DIR/generated_predictions.txt --task $TASK --bleu $BLEU"
python evaluate/rouge.py --predictions "$OUTPUT_DIR/generated_predictions.txt" --task "$TASK" --bleu "$BLEU"
