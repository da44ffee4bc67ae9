#!/usr/bin/env bash
# P-Tuning v2 / Prefix-Tuning training: KEY=VALUE overrides, any other --flag value goes to ptuning_v2.train.
#   bash scripts/train_pt2.sh                         # the main job: tiny GLM on bundled NER, before/after table
#   bash scripts/train_pt2.sh PRE_SEQ_LEN=128 LR=2e-2 MODEL=/models/chatglm3-6b QUANTIZATION_BIT=4 ...
#   NUM_GPUS=2 DS_CONFIG=ds_configs/zero2.json bash scripts/train_pt2.sh ...   (KEY=VALUE may also come from the env)
#   An OUTPUT_DIR that holds an earlier run is refused: RESUME=true continues it, OVERWRITE=true moves it aside.
set -euo pipefail
cd "$(dirname "$0")/.."

KEYS="MODEL TRAIN_FILE VALIDATION_FILE TEST_FILE OUTPUT_DIR PRE_SEQ_LEN PREFIX_PROJECTION METHOD LR MAX_STEPS SAVE_STEPS
BATCH_SIZE GRAD_ACCUM EVAL_BATCH_SIZE MAX_SOURCE_LENGTH MAX_TARGET_LENGTH MAX_NEW_TOKENS QUANTIZATION_BIT NUM_GPUS DS_CONFIG
HOSTFILE MASTER_PORT RESUME OVERWRITE SEED PROMPT_COLUMN RESPONSE_COLUMN HISTORY_COLUMN MAX_EVAL_SAMPLES COMPARE_WITH_BASE
PREFIX_DROPOUT LOGGING_STEPS"
source scripts/lib.sh
parse_overrides "$KEYS" "$@"

# Defaults suit the embedded tiny GLM and the bundled NER task (minutes on 2 CPU cores).
MODEL=${MODEL:-models/glm-zh-tiny}
TRAIN_FILE=${TRAIN_FILE:-data/ner/train.json}
VALIDATION_FILE=${VALIDATION_FILE-data/ner/dev.json}
TEST_FILE=${TEST_FILE-}
PRE_SEQ_LEN=${PRE_SEQ_LEN:-64}
PREFIX_PROJECTION=${PREFIX_PROJECTION:-false}
METHOD=${METHOD:-ptuning_v2}
LR=${LR:-1e-1}
MAX_STEPS=${MAX_STEPS:-700}
SAVE_STEPS=${SAVE_STEPS:-200}
BATCH_SIZE=${BATCH_SIZE:-16}
GRAD_ACCUM=${GRAD_ACCUM:-1}
EVAL_BATCH_SIZE=${EVAL_BATCH_SIZE:-32}
MAX_SOURCE_LENGTH=${MAX_SOURCE_LENGTH:-96}
MAX_TARGET_LENGTH=${MAX_TARGET_LENGTH:-48}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-$MAX_TARGET_LENGTH}
QUANTIZATION_BIT=${QUANTIZATION_BIT:-none}
NUM_GPUS=${NUM_GPUS:-1}
DS_CONFIG=${DS_CONFIG:-}
HOSTFILE=${HOSTFILE:-}
MASTER_PORT=${MASTER_PORT:-29517}
RESUME=${RESUME:-}
OVERWRITE=${OVERWRITE:-false}
SEED=${SEED:-42}
PROMPT_COLUMN=${PROMPT_COLUMN:-content}
RESPONSE_COLUMN=${RESPONSE_COLUMN:-summary}
HISTORY_COLUMN=${HISTORY_COLUMN:-}
MAX_EVAL_SAMPLES=${MAX_EVAL_SAMPLES:-}
COMPARE_WITH_BASE=${COMPARE_WITH_BASE:-true}
PREFIX_DROPOUT=${PREFIX_DROPOUT:-0.1}
LOGGING_STEPS=${LOGGING_STEPS:-10}
OUTPUT_DIR=${OUTPUT_DIR:-output/$(basename "$(dirname "$TRAIN_FILE")")-${METHOD}-${PRE_SEQ_LEN}-${LR}}

prepare_bundled_data "$TRAIN_FILE"

# Every setting is checked here, before anything runs (Python checks the rest, also before loading anything).
for key in PRE_SEQ_LEN MAX_STEPS SAVE_STEPS BATCH_SIZE GRAD_ACCUM EVAL_BATCH_SIZE MAX_SOURCE_LENGTH MAX_TARGET_LENGTH \
  MAX_NEW_TOKENS NUM_GPUS MASTER_PORT LOGGING_STEPS; do
  check_int "$key" 1
done
check_int SEED 0
[[ -n "$MAX_EVAL_SAMPLES" ]] && check_int MAX_EVAL_SAMPLES 1
check_number LR 0 ""
check_number PREFIX_DROPOUT "" ""
for key in PREFIX_PROJECTION COMPARE_WITH_BASE OVERWRITE; do
  check_bool "$key"
done
check_choice METHOD ptuning_v2 prefix_tuning
check_choice QUANTIZATION_BIT none 4 8
check_file TRAIN_FILE
check_file VALIDATION_FILE optional
check_file TEST_FILE optional
check_file DS_CONFIG optional
check_file HOSTFILE optional
case "${RESUME,,}" in
  "" | 0 | false | no | off | n | f | none) RESUME= ;;
  1 | true | yes | on | y | t | latest) RESUME=true ;;
  *) [[ -d "$RESUME" ]] || fail "RESUME=$RESUME: no such checkpoint directory (RESUME=true resumes the latest in OUTPUT_DIR)" ;;
esac

ARGS=(
  --model_name_or_path "$MODEL" --train_file "$TRAIN_FILE" --output_dir "$OUTPUT_DIR"
  --method "$METHOD" --pre_seq_len "$PRE_SEQ_LEN" --prefix_projection "$PREFIX_PROJECTION"
  --prefix_dropout "$PREFIX_DROPOUT" --quantization_bit "$QUANTIZATION_BIT"
  --prompt_column "$PROMPT_COLUMN" --response_column "$RESPONSE_COLUMN"
  --max_source_length "$MAX_SOURCE_LENGTH" --max_target_length "$MAX_TARGET_LENGTH" --max_new_tokens "$MAX_NEW_TOKENS"
  --learning_rate "$LR" --max_steps "$MAX_STEPS" --save_steps "$SAVE_STEPS" --logging_steps "$LOGGING_STEPS"
  --per_device_train_batch_size "$BATCH_SIZE" --gradient_accumulation_steps "$GRAD_ACCUM"
  --per_device_eval_batch_size "$EVAL_BATCH_SIZE" --seed "$SEED" --do_train
  --report_to tensorboard --logging_first_step true --save_total_limit 3 --dataloader_num_workers 0
  --overwrite_output_dir "$OVERWRITE"
)
[[ -n "$HISTORY_COLUMN" ]] && ARGS+=(--history_column "$HISTORY_COLUMN")
if [[ -n "$VALIDATION_FILE" ]]; then
  ARGS+=(--validation_file "$VALIDATION_FILE" --do_eval --compare_with_base "$COMPARE_WITH_BASE")
  [[ -n "$MAX_EVAL_SAMPLES" ]] && ARGS+=(--max_eval_samples "$MAX_EVAL_SAMPLES")
fi
[[ -n "$TEST_FILE" ]] && ARGS+=(--test_file "$TEST_FILE" --do_predict)
[[ -n "$DS_CONFIG" ]] && ARGS+=(--deepspeed "$DS_CONFIG")
[[ -n "$RESUME" ]] && ARGS+=(--resume_from_checkpoint "$RESUME")

if [[ -n "$HOSTFILE" ]]; then
  LAUNCH=(deepspeed --hostfile "$HOSTFILE" --master_port "$MASTER_PORT" --module ptuning_v2.train)
elif [[ "$NUM_GPUS" -gt 1 ]]; then
  LAUNCH=(torchrun --nproc_per_node "$NUM_GPUS" --master_port "$MASTER_PORT" -m ptuning_v2.train)
else
  LAUNCH=(python -m ptuning_v2.train)
fi

CMD=("${LAUNCH[@]}" "${ARGS[@]}" "${PASSTHROUGH[@]}")
echo "+ ${CMD[*]}"
exec "${CMD[@]}"
