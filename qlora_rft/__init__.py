"""qlora-rft: Visual Reinforcement Fine-Tuning (GRPO with verifiable rewards) of Qwen2-VL on one GPU.

Where things live: config.py (settings), trainer.py (the GRPO loop), grpo.py (its maths), rollout.py (sampling),
rewards.py and tasks/ (prompts, parsers, rewards), model.py (4-bit base + LoRA), data.py, evaluation.py.
"""

__version__ = "0.1.0"
