"""A GRPO run on fixed completions (teacher-forced, no sampling) for the distributed tests: launched with
`accelerate launch ... tests/dist_job.py CONFIG [OVERRIDES] [--resume]`, or as a plain script for one process.
With --sample it samples for real instead, and scores the texts with rewards that depend on every character.

Every prompt gets the same G completion texts, some well-formed and right for one class, some not, so rewards and
advantages differ inside each group and the update is the same whichever process holds the prompt.
"""

from __future__ import annotations

import json
import os
import sys

import torch

import qlora_rft.trainer as trainer
from qlora_rft import grpo
from qlora_rft.config import load_config
from qlora_rft.rewards import RewardSet
from qlora_rft.rollout import Rollout

TEXTS = [
    "<think>it has four sides</think><answer>square</answer>",
    "<think>two bars</think><answer>cross</answer>",
    "<think>no idea</think>",
    "<answer>square</answer>",
]


def fixed_groups(model, processor, prompts, group_size, chunk, sampling, tokens, share_prefill=True, decoder=None):
    texts = [TEXTS[k % len(TEXTS)] for k in range(group_size)]
    rows = [processor.tokenizer(t, add_special_tokens=False)["input_ids"] + [tokens.eos[0]] for t in texts]
    width = max(map(len, rows))
    ids = torch.tensor([r + [tokens.pad] * (width - len(r)) for r in rows])
    mask = grpo.completion_mask(ids, tokens.eos)
    decoded = processor.batch_decode(ids, skip_special_tokens=True)
    return [Rollout(prompt=p, completion_ids=ids.to(p.input_ids.device), mask=mask.to(p.input_ids.device),
                    texts=decoded) for p in prompts]


def text_rewards(rewards, texts, columns, frame=None, row=None):
    """Rewards that depend on the sampled text, so that a run's result depends on every process's RNG."""
    return {name: [float(sum(map(ord, t)) % 3) for t in texts] for name in rewards.weights}


def main(argv: list[str]) -> None:
    resume, sample = "--resume" in argv, "--sample" in argv
    config, *overrides = [a for a in argv if a not in ("--resume", "--sample")]
    if sample:
        RewardSet.score = text_rewards
    else:
        trainer.sample_groups = fixed_groups
    result = trainer.fit(load_config(config, overrides), resume=resume, log=False)
    if int(os.environ.get("RANK", "0")) == 0:
        (result.output_dir / "job_metrics.json").write_text(json.dumps(result.metrics))


if __name__ == "__main__":
    main(sys.argv[1:])
