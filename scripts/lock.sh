#!/usr/bin/env bash
# Regenerate qlora_rft/constraints.txt after an upgrade: install the newest releases pyproject.toml allows into a
# fresh .venv-lock, run the whole test suite there, and only if it passes write that environment's exact versions.
# Usage: bash scripts/lock.sh [pytest arguments]; then review `git diff qlora_rft/constraints.txt` and commit it.
# The next `bash scripts/test.sh` or `bash scripts/demo.sh` re-installs .venv at the new versions.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv-lock"
rm -rf "$VENV"
"${PYTHON:-python3}" -m venv "$VENV"
echo "installing the newest allowed releases into $VENV"
"$VENV/bin/python" -m pip install --quiet -e "$ROOT[test]"
cd "$ROOT"
echo "running the test suite on them"
PATH="$VENV/bin:$PATH" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" "$VENV/bin/python" -m pytest "$@"
"$VENV/bin/python" -m qlora_rft.environment freeze > "$ROOT/qlora_rft/constraints.txt.new"
mv "$ROOT/qlora_rft/constraints.txt.new" "$ROOT/qlora_rft/constraints.txt"
echo "qlora_rft/constraints.txt written: review it with git diff and commit it"
