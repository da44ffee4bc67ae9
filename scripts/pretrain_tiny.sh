#!/usr/bin/env bash
# Pretrain the embedded tiny backbone models/glm-zh-tiny from scratch on CPU (about 70 minutes on 2 cores).
#   bash scripts/pretrain_tiny.sh                  # every setting below; KEY=value in the env overrides it
#   MAX_STEPS=0 bash scripts/pretrain_tiny.sh      # fit the step count to TIME_BUDGET_MIN instead
# Extra arguments go to scripts/pretrain_tiny.py unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

SEED=${SEED:-1234}
THREADS=${THREADS:-2}
OUT=${OUT:-models/glm-zh-tiny}
# tokenizer
VOCAB_SIZE=${VOCAB_SIZE:-4700}              # SentencePiece pieces; 9 ChatGLM special tokens come on top
MAX_PIECE_LENGTH=${MAX_PIECE_LENGTH:-1}     # one character per piece: an entity is always a run of whole tokens
CHARACTER_COVERAGE=${CHARACTER_COVERAGE:-0.9995}
# model: GlmForCausalLM, grouped-query attention
HIDDEN_SIZE=${HIDDEN_SIZE:-256}
LAYERS=${LAYERS:-4}
HEADS=${HEADS:-4}
KV_HEADS=${KV_HEADS:-2}
HEAD_DIM=${HEAD_DIM:-64}
INTERMEDIATE_SIZE=${INTERMEDIATE_SIZE:-704}
# training
SEQ_LEN=${SEQ_LEN:-256}                     # rows of whole documents, padded at the end
BATCH_SIZE=${BATCH_SIZE:-16}
LR=${LR:-2e-3}
MIN_LR_RATIO=${MIN_LR_RATIO:-0.1}           # cosine decay floor
WARMUP_STEPS=${WARMUP_STEPS:-40}
WEIGHT_DECAY=${WEIGHT_DECAY:-0.1}
GRAD_CLIP=${GRAD_CLIP:-1.0}
CHAT_FRACTION=${CHAT_FRACTION:-0.6}         # share of documents shown as a <|user|>/<|assistant|> exchange
COPY_FRACTION=${COPY_FRACTION:-0.6}         # share of those chats that ask to repeat the text
LISTING_FRACTION=${LISTING_FRACTION:-1.0}   # share of tagged sentences also shown as a word-listing chat
MAX_STEPS=${MAX_STEPS:-1800}                # 0: fit the steps to TIME_BUDGET_MIN at the measured speed
TIME_BUDGET_MIN=${TIME_BUDGET_MIN:-32}      # training loop; tokenizer, data and evaluation add ~3 min
CALIBRATION_S=${CALIBRATION_S:-60}

if [[ ! -s data/pretrain/train.txt || ! -s data/pretrain/heldout.txt || ! -s data/pretrain/train_tagged.json ]]; then
  python data/prepare.py --out data --seed "$SEED"
fi

export OMP_NUM_THREADS="$THREADS"
set -x
python scripts/pretrain_tiny.py \
  --data-dir data/pretrain --out "$OUT" --seed "$SEED" --threads "$THREADS" \
  --vocab-size "$VOCAB_SIZE" --character-coverage "$CHARACTER_COVERAGE" --max-piece-length "$MAX_PIECE_LENGTH" \
  --hidden-size "$HIDDEN_SIZE" --layers "$LAYERS" --heads "$HEADS" --kv-heads "$KV_HEADS" \
  --head-dim "$HEAD_DIM" --intermediate-size "$INTERMEDIATE_SIZE" \
  --seq-len "$SEQ_LEN" --batch-size "$BATCH_SIZE" --lr "$LR" --min-lr-ratio "$MIN_LR_RATIO" \
  --warmup-steps "$WARMUP_STEPS" --weight-decay "$WEIGHT_DECAY" --grad-clip "$GRAD_CLIP" \
  --chat-fraction "$CHAT_FRACTION" --copy-fraction "$COPY_FRACTION" --listing-fraction "$LISTING_FRACTION" \
  --compile --max-steps "$MAX_STEPS" --time-budget-min "$TIME_BUDGET_MIN" \
  --calibration-s "$CALIBRATION_S" "$@"
