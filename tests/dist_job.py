"""A GRPO run on fixed completions (teacher-forced, no sampling) for the distributed tests: launched with
`accelerate launch ... tests/dist_job.py CONFIG [OVERRIDES] [--resume]`, or as a plain script for one process.
With --sample it samples for real instead, and scores the texts with rewards that depend on every character.

Every prompt gets the same G completion texts, some well-formed and right for one class, some not, so rewards and
advantages differ inside each group and the update is the same whichever process holds the prompt. With --varied
a prompt's image decides how many of the texts its group cycles through, so groups differ in rewards and tokens.
"""

from __future__ import annotations

import functools
import json
import os
import sys

import torch

import qlora_rft.trainer as trainer
from qlora_rft import grpo
from qlora_rft.config import load_config
from qlora_rft.rewards import RewardSet
from qlora_rft.rollout import Rollout
from qlora_rft.sampling import Sampler

TEXTS = [
    "<think>it has four sides</think><answer>square</answer>",
    "<think>two bars</think><answer>cross</answer>",
    "<think>no idea</think>",
    "<answer>square</answer>",
]


def fixed_groups(sampler, prompts, group_size, settings, generator=None, varied=False):
    """What Sampler.sample returns, teacher-forced: no sampler log-probs (so no importance correction)."""
    return [fixed_group(sampler.processor, p, group_size, sampler.tokens, varied) for p in prompts]


def fixed_group(processor, prompt, group_size, tokens, varied) -> Rollout:
    n = 2 + int(prompt.pixel_values.abs().sum().item() * 1000) % 3 if varied else len(TEXTS)
    texts = [TEXTS[k % n] for k in range(group_size)]
    rows = [processor.tokenizer(t, add_special_tokens=False)["input_ids"] + [tokens.eos[0]] for t in texts]
    width = max(map(len, rows))
    ids = torch.tensor([r + [tokens.pad] * (width - len(r)) for r in rows])
    mask = grpo.completion_mask(ids, tokens.eos)
    decoded = processor.batch_decode(ids, skip_special_tokens=True)
    device = prompt.input_ids.device
    return Rollout(prompt=prompt, completion_ids=ids.to(device), mask=mask.to(device), texts=decoded)


def text_rewards(rewards, texts, columns, frame=None, row=None):
    """Rewards that depend on the sampled text, so that a run's result depends on every process's RNG."""
    return {name: [float(sum(map(ord, t)) % 3) for t in texts] for name in rewards.weights}


def main(argv: list[str]) -> None:
    resume, sample, varied = "--resume" in argv, "--sample" in argv, "--varied" in argv
    config, *overrides = [a for a in argv if a not in ("--resume", "--sample", "--varied")]
    if sample:
        RewardSet.score = text_rewards
    else:
        Sampler.sample = functools.partialmethod(fixed_groups, varied=varied)
    result = trainer.fit(load_config(config, overrides), resume=resume, log=False)
    if int(os.environ.get("RANK", "0")) == 0:
        (result.output_dir / "job_metrics.json").write_text(json.dumps(result.metrics))


if __name__ == "__main__":
    main(sys.argv[1:])
