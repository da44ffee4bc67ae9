#!/usr/bin/env bash
# Rebuild requirements.lock: install requirements-dev.txt (exact pins) into a throw-away venv and record every
# package pip resolved. The README's commands use the lock as constraints, so a later install gets this set.
#   bash scripts/lock.sh            # then run the tests with the new lock before committing it
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=$(mktemp -d /tmp/ptuning-lock-XXXXXX)
trap 'rm -rf "$VENV"' EXIT
python -m venv "$VENV"
"$VENV/bin/pip" install -q torch==2.13.0
"$VENV/bin/pip" install -q -r requirements-dev.txt
{
  echo "# The full set the tests passed on: made by scripts/lock.sh on $(date -u +%F) with $("$VENV/bin/python" --version)."
  echo "# Use as constraints: pip install -c requirements.lock -r requirements.txt"
  # A local version label (+cpu) would not match the CUDA build of the same torch release on a GPU machine.
  "$VENV/bin/pip" freeze --exclude-editable | sed -E 's/^(torch==[0-9.]+)\+[a-z0-9]+$/\1/' | LC_ALL=C sort -f
} > requirements.lock.new
mv requirements.lock.new requirements.lock
echo "wrote requirements.lock ($(grep -vc '^#' requirements.lock) packages)"
