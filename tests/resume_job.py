"""A GRPO run for the resume tests (run as a subprocess or in-process): rewards that depend on the sampled text,
so the result depends on every RNG, and a pause after each checkpoint so a test can kill it mid-run."""

from __future__ import annotations

import sys
import time

import qlora_rft.trainer as trainer
from qlora_rft import checkpoint
from qlora_rft.config import load_config
from qlora_rft.rewards import RewardSet


def text_rewards(rewards, texts, columns, frame=None, row=None):
    return {name: [float(sum(map(ord, t)) % 3) for t in texts] for name in rewards.weights}


def run(overrides: list[str], resume: bool = False, pause: float = 0.0):
    real_score, RewardSet.score = RewardSet.score, text_rewards  # put back afterwards: run in-process by tests
    if pause:
        save = checkpoint.save

        def slow_save(*args, **kwargs):
            path = save(*args, **kwargs)
            time.sleep(pause)
            return path

        checkpoint.save = slow_save
    try:
        return trainer.fit(load_config(None, overrides), resume=resume, log=False)
    finally:
        RewardSet.score = real_score


if __name__ == "__main__":
    run(sys.argv[1:], pause=2.0)
