#!/usr/bin/env bash
# Set up .venv if needed, then run the demo: QLoRA GRPO of a tiny Qwen2-VL on a synthetic visual task.
# Extra arguments go to `qlora-rft demo` (e.g. train.max_steps=20).
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
exec qlora-rft demo "$@"
