#!/usr/bin/env bash
# The P-Tuning v2 paper's claims on the embedded backbone (issue 14): every method on every task (generative NER,
# sentiment with a sequence-classification head, NER with a token-classification head), multi-task prompt
# pre-training, and the prompt-length sweep -> benchmarks/results/methods.{md,png,json}.
#   bash scripts/compare_methods.sh                  # the whole comparison (78 min on 2 CPU cores, 2026-11-27)
#   bash scripts/compare_methods.sh --report_only    # rewrite the report from the runs finished so far
#   bash scripts/compare_methods.sh --tiny --model DIR --data DIR --workdir DIR --results DIR   # the test's
#   bash scripts/compare_methods.sh --forgetting     # issue 24: forgetting and data mixing, P-Tuning v2 / Prefix-
#                                                    # Tuning / LoRA / full on generative NER (about 45 min on 2 CPU
#                                                    # cores) -> benchmarks/results/forgetting.{md,png,json}
# A restart skips every finished run (output/compare_methods/runs/<run>/result.json). Flags: --help.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

MODULE=benchmarks.compare_methods
ARGS=()
for arg in "$@"; do
  if [[ "$arg" == --forgetting ]]; then MODULE=benchmarks.forgetting; else ARGS+=("$arg"); fi
done
# The bundled data is generated on first use, unless the runs read another data directory.
if [[ " $* " != *" --data "* ]]; then
  for file in data/ner/train.json data/sentiment/train.json data/seg/train.json data/nlu/ner_train.json \
    $(python -c "from ptuning_v2 import mixing, retention; print(*retention.BUNDLED_FILES, mixing.BUNDLED_MIX)"); do
    prepare_bundled_data "$file"
  done
fi
export COMPARE_COMMAND="bash scripts/compare_methods.sh${*:+ $*}"
exec python -m "$MODULE" "${ARGS[@]}"
