"""Verifiable rewards with TRL's signature, `fn(completions, **columns) -> list[float]`, and a registry by name.

Each reward is total: any completion in, a finite float in its documented range out, never an exception.
Completions are plain strings or TRL's conversational form; `solution` is the dataset's `<answer>...</answer>`;
`frame` (optional, one per completion) is the box coordinates the model was asked for (`tasks.boxes.Frame`): box
answers in an absolute frame are mapped to the dataset's 0-1000 scale first, so a box scores the same in any family.
They plug into TRL's GRPOTrainer as they are (`reward_funcs=[format_reward, classification_reward]`).
"""

from __future__ import annotations

import math
from typing import Callable

from qlora_rft.tasks import TASKS, classification, detection, grounding
from qlora_rft.tasks.boxes import RELATIVE, Frame
from qlora_rft.tasks.common import completion_text, has_format

RewardFn = Callable[..., list[float]]


def format_reward(completions: list, **kwargs) -> list[float]:
    """1.0 when the completion is exactly `<think>..</think>` then `<answer>..</answer>`, else 0.0.  Range [0, 1].

    >>> format_reward(["<think>red</think><answer>red circle</answer>", "red circle"])
    [1.0, 0.0]
    """
    return [float(has_format(completion_text(c))) for c in completions]


def classification_reward(completions: list, solution: list[str], **kwargs) -> list[float]:
    """1.0 when the answer names the solution's class (normalised exact match, never substring).  Range [0, 1].

    >>> classification_reward(["<answer>Red_Circle</answer>", "<answer></answer>"], ["<answer>red circle</answer>"] * 2)
    [1.0, 0.0]
    """
    return [classification.score(completion_text(c), s) for c, s in zip(completions, solution)]


def _frames(frame: list | None, n: int) -> list[Frame]:
    return [Frame(*f) for f in frame] if frame is not None else [RELATIVE] * n


def iou_reward(completions: list, solution: list[str], frame: list | None = None, **kwargs) -> list[float]:
    """Detection: predictions sorted by confidence each take the unmatched true box of highest IoU; a match counts
    when IoU > 0.5; sum of matched IoUs / max(#truth, #predictions).  'No Objects' for an empty truth: 1.  [0, 1].

    >>> truth = "<answer>[{'Position': [0, 0, 10, 10], 'Confidence': 1.0}, {'Position': [50, 50, 90, 90]}]</answer>"
    >>> iou_reward(["<answer>[{'Position': [0, 0, 10, 10], 'Confidence': 0.9}]</answer>"], [truth])
    [0.5]
    """
    return [detection.iou_reward(completion_text(c), s, f)
            for c, s, f in zip(completions, solution, _frames(frame, len(completions)))]


def confidence_reward(completions: list, solution: list[str], frame: list | None = None, **kwargs) -> list[float]:
    """Detection: mean over predictions of (confidence if matched else 1 - confidence).  Range [0, 1].

    >>> confidence_reward(["<answer>[{'Position': [0, 0, 10, 10], 'Confidence': 0.5}, "
    ...                    "{'Position': [500, 500, 600, 600], 'Confidence': 0.25}]</answer>"],
    ...                   ["<answer>[{'Position': [0, 0, 10, 10], 'Confidence': 1.0}]</answer>"])  # (0.5 + 0.75) / 2
    [0.625]
    """
    return [detection.confidence_reward(completion_text(c), s, f)
            for c, s, f in zip(completions, solution, _frames(frame, len(completions)))]


def grounding_reward(completions: list, solution: list[str], frame: list | None = None, **kwargs) -> list[float]:
    """Reasoning grounding: GIoU + 1 between the answer's box `(x1,y1),(x2,y2)` and the true one.  Range [0, 2].

    >>> grounding_reward(["<answer>(0,0),(10,10)</answer>"], ["<answer>(20,0),(30,10)</answer>"])  # GIoU -1/3
    [0.6666666666666667]
    """
    return [grounding.grounding_reward(completion_text(c), s, f)
            for c, s, f in zip(completions, solution, _frames(frame, len(completions)))]


REWARDS: dict[str, RewardFn] = {
    "format": format_reward,
    "classification": classification_reward,
    "iou": iou_reward,
    "confidence": confidence_reward,
    "grounding": grounding_reward,
}

RANGES: dict[str, tuple[float, float]] = {name: (0.0, 1.0) for name in REWARDS} | {"grounding": (0.0, 2.0)}


def default_weights(task: str) -> dict[str, float]:
    return dict(TASKS[task].default_rewards) if task in TASKS else {}


def score(completions: list[str], solution: str, weights: dict[str, float],
          frame: Frame = RELATIVE) -> dict[str, list[float]]:
    """Each named reward of the G completions of one prompt: {name: [G floats]} (non-finite values become 0)."""
    out = {}
    for name in weights:
        values = REWARDS[name](completions, solution=[solution] * len(completions), frame=[frame] * len(completions))
        out[name] = [v if math.isfinite(v) else 0.0 for v in values]
    return out
