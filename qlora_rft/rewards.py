"""Verifiable rewards with TRL's signature, `fn(completions, **columns) -> list[float]`, and a registry by name.

The registry is `format` plus every registered task's own rewards (`Task.rewards`). Each reward is total: any
completion in, a finite float in its documented range out, never an exception. Completions are plain strings or
TRL's conversational form; `solution` is the dataset's `<answer>...</answer>`; `frame` (optional, one per
completion) is the box coordinates the model was asked for (`tasks.boxes.Frame`): box answers in an absolute frame
are mapped to the dataset's 0-1000 scale first, so a box scores the same in any family.
They plug into TRL's GRPOTrainer as they are (`reward_funcs=[format_reward, classification_reward]`).
"""

from __future__ import annotations

import math

from qlora_rft.tasks import TASKS, get_task
from qlora_rft.tasks.boxes import RELATIVE, Frame
from qlora_rft.tasks.common import completion_text, has_format
from qlora_rft.tasks.task import Reward, RewardFn


def format_reward(completions: list, **kwargs) -> list[float]:
    """1.0 when the completion is exactly `<think>..</think>` then `<answer>..</answer>`, else 0.0.  Range [0, 1].

    >>> format_reward(["<think>red</think><answer>red circle</answer>", "red circle"])
    [1.0, 0.0]
    """
    return [float(has_format(completion_text(c))) for c in completions]


def builtin_rewards() -> dict[str, Reward]:
    """`format` and every registered task's own rewards, by the names rewards.weights uses."""
    found = {"format": Reward(format_reward)}
    for task in TASKS.values():
        found.update(task.rewards)
    return found


REWARDS: dict[str, RewardFn] = {name: reward.fn for name, reward in builtin_rewards().items()}
RANGES: dict[str, tuple[float, float]] = {name: (reward.low, reward.high) for name, reward in builtin_rewards().items()}

# The shipped tasks' rewards under their public names (e.g. TRL's `reward_funcs=[classification_reward]`).
classification_reward = REWARDS["classification"]  # 1.0 when the answer names the solution's class
iou_reward = REWARDS["iou"]  # detection: sum of matched IoUs / max(#truth, #predictions)
confidence_reward = REWARDS["confidence"]  # detection: mean of (confidence if matched else 1 - confidence)
grounding_reward = REWARDS["grounding"]  # reasoning grounding: GIoU + 1, in [0, 2]


def default_weights(task: str) -> dict[str, float]:
    """The task's own reward weights (what an empty rewards.weights means)."""
    return dict(get_task(task).default_weights)


def score(completions: list[str], solution: str, weights: dict[str, float],
          frame: Frame = RELATIVE) -> dict[str, list[float]]:
    """Each named reward of the G completions of one prompt: {name: [G floats]} (non-finite values become 0)."""
    found = builtin_rewards()
    out = {}
    for name in weights:
        values = found[name].fn(completions, solution=[solution] * len(completions),
                                frame=[frame] * len(completions))
        out[name] = [v if math.isfinite(v) else 0.0 for v in values]
    return out
