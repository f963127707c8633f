"""qlora-rft: Visual Reinforcement Fine-Tuning (GRPO with verifiable rewards) of Qwen2-VL, Qwen2.5-VL and Qwen3-VL
on one GPU, and the paper's full fine-tune on several through accelerate + DeepSpeed.

Where things live: config.py (settings), trainer.py (the GRPO loop), run.py (the setup every training run shares),
grpo.py (its maths), rollout.py (sampling and completion log-probs), rewards.py and tasks/ (prompts, parsers,
rewards), model.py (4-bit base + LoRA, or the full model), models/ (one module per model family), distributed.py
(launches), data.py, evaluation/.
"""

__version__ = "0.1.0"

from qlora_rft.pretrained import keep_bitsandbytes_local  # noqa: E402

keep_bitsandbytes_local()
