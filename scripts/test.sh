#!/usr/bin/env bash
# Set up .venv if needed, then run the test suite. Extra arguments go to pytest (e.g. -k rewards, -m "not slow").
# One thread per process unless told otherwise: the tiny models are launch-bound, and on a shared 2-core machine
# torch's threads contending for the cores made steps 3-9 times slower.
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec python -m pytest "$@"
