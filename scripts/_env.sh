# Sourced by demo.sh and test.sh: make sure .venv exists at the repository root with the project installed at the
# versions the test suite passed with (qlora_rft/constraints.txt; QLORA_RFT_LOCK=0 installs the newest releases
# pyproject.toml allows instead). Re-installs when pyproject.toml or the lock changed since the last install.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"
LOCK="$ROOT/qlora_rft/constraints.txt"
if [ ! -x "$VENV/bin/python" ]; then
  echo "creating $VENV"
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.qlora_rft_installed"
WANT="$(cat "$ROOT/pyproject.toml" "$LOCK" | sha256sum | cut -d' ' -f1) lock=${QLORA_RFT_LOCK:-1}"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "installing qlora-rft and its dependencies into $VENV (first time: a few minutes)"
  if [ "${QLORA_RFT_LOCK:-1}" = "0" ]; then
    "$VENV/bin/python" -m pip install --quiet -e "$ROOT[test]"
  else
    "$VENV/bin/python" -m pip install --quiet -c "$LOCK" -e "$ROOT[test]"
  fi
  echo "$WANT" > "$STAMP"
  "$VENV/bin/python" -m qlora_rft env --quiet || true  # names any package at another version than the tested one
fi
export PATH="$VENV/bin:$PATH"
cd "$ROOT"
