#!/usr/bin/env bash
# Batched generation + the official ChatGLM metrics: KEY=VALUE overrides, other --flags go to ptuning_v2.evaluate.
#   bash scripts/evaluate.sh CHECKPOINT=output/ner-ptuning_v2-16-2e-2
#   bash scripts/evaluate.sh MODEL=/models/chatglm3-6b CHECKPOINT=... TEST_FILE=AdvertiseGen/dev.json DO_SAMPLE=true
#   bash scripts/evaluate.sh CHECKPOINT=... RETENTION=true [RETENTION_FILE=general.jsonl|.txt]   # + general ability
set -euo pipefail
cd "$(dirname "$0")/.."

KEYS="MODEL CHECKPOINT TEST_FILE OUTPUT_DIR BATCH_SIZE MAX_NEW_TOKENS MAX_SOURCE_LENGTH MAX_SAMPLES QUANTIZATION_BIT
DO_SAMPLE TOP_P TEMPERATURE SEED TASK BLEU PROMPT_COLUMN RESPONSE_COLUMN RETENTION RETENTION_FILE"
source scripts/lib.sh
parse_overrides "$KEYS" "$@"

MODEL=${MODEL:-models/glm-zh-tiny}
CHECKPOINT=${CHECKPOINT-}
TEST_FILE=${TEST_FILE:-data/ner/dev.json}
OUTPUT_DIR=${OUTPUT_DIR:-${CHECKPOINT:-output/base}/eval-$(basename "$(dirname "$TEST_FILE")")-$(basename "$TEST_FILE" .json)}
BATCH_SIZE=${BATCH_SIZE:-32}
QUANTIZATION_BIT=${QUANTIZATION_BIT:-none}
TASK=${TASK:-auto}
BLEU=${BLEU:-chars}
# Generation and data keys left unset keep the Python defaults: GenerationSettings' (greedy, 128 new tokens) and,
# for a checkpoint written by the training script, its run's own data settings (run_config.yaml: columns,
# MAX_SOURCE_LENGTH), else DataConfig's.

prepare_bundled_data "$TEST_FILE"
if is_set RETENTION; then check_bool RETENTION; fi
if [[ "${RETENTION:-false}" == true ]]; then
  for file in $(python -m ptuning_v2.retention); do prepare_bundled_data "$file"; done
fi

# Every setting is checked before generation starts, also the scorer's (TASK, BLEU), which runs after it.
check_int BATCH_SIZE 1
for key in MAX_NEW_TOKENS MAX_SOURCE_LENGTH MAX_SAMPLES; do
  if is_set "$key"; then check_int "$key" 1; fi
done
if is_set SEED; then check_int SEED 0; fi
if is_set TOP_P; then check_number TOP_P 0 1; fi
if is_set TEMPERATURE; then check_number TEMPERATURE 0 ""; fi
if is_set DO_SAMPLE; then check_bool DO_SAMPLE; fi
check_choice QUANTIZATION_BIT none 4 8
check_choice TASK auto ner sentiment none
check_choice BLEU chars words
check_file TEST_FILE
if is_set RETENTION_FILE; then check_file RETENTION_FILE optional; fi
[[ -z "$CHECKPOINT" || -e "$CHECKPOINT" ]] || fail "CHECKPOINT=$CHECKPOINT: no such checkpoint"
[[ ! -e "$OUTPUT_DIR" || -d "$OUTPUT_DIR" ]] || fail "OUTPUT_DIR=$OUTPUT_DIR is a file, not a directory"

ARGS=(
  --model "$MODEL" --test_file "$TEST_FILE" --output_dir "$OUTPUT_DIR" --batch_size "$BATCH_SIZE"
  --quantization_bit "$QUANTIZATION_BIT" --task "$TASK"
)
[[ -n "$CHECKPOINT" ]] && ARGS+=(--checkpoint "$CHECKPOINT")
pass_flags "MAX_NEW_TOKENS=max_new_tokens MAX_SOURCE_LENGTH=max_source_length MAX_SAMPLES=max_samples SEED=seed
DO_SAMPLE=do_sample TOP_P=top_p TEMPERATURE=temperature PROMPT_COLUMN=prompt_column RESPONSE_COLUMN=response_column
RETENTION=retention RETENTION_FILE=retention_file"

CMD=(python -m ptuning_v2.evaluate "${ARGS[@]}" "${PASSTHROUGH[@]}")
print_command "${CMD[@]}"
"${CMD[@]}"
echo "+ python evaluate/rouge.py --predictions $OUTPUT_DIR/generated_predictions.txt --task $TASK --bleu $BLEU"
python evaluate/rouge.py --predictions "$OUTPUT_DIR/generated_predictions.txt" --task "$TASK" --bleu "$BLEU"
