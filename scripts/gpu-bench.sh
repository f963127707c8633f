#!/usr/bin/env bash
# The GPU measurements in one command, on a machine with CUDA and no package registry: the wheels that
# scripts/gpu-wheels.sh put in .whl/ installed into /tmp/site, then `qlora-rft bench --suite gpu`.
# Usage, from the project's root on the GPU machine: bash scripts/gpu-bench.sh OUT_DIR [DEADLINE_SECONDS]
# (results.jsonl, results.md, suite.json and logs/ in OUT_DIR; default deadline 480 s).
# Dry run on the CPU: WHEELS=0 PYTHON=.venv/bin/python SUITE=cpu bash scripts/gpu-bench.sh /tmp/suite 300
set -euo pipefail
out="${1:?usage: bash scripts/gpu-bench.sh OUT_DIR [DEADLINE_SECONDS]}"
deadline="${2:-480}"
py="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ "${WHEELS:-1}" != "0" ] && compgen -G ".whl/*.whl" > /dev/null; then
  rm -rf /tmp/site  # a warm machine keeps an earlier call's files
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$py" -m qlora_rft env || true  # which versions differ from the tested ones (a GPU image's own torch does)
exec "$py" -m qlora_rft bench --suite "${SUITE:-gpu}" --deadline "$deadline" --out "$out"
