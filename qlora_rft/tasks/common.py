"""What every task shares: the think/answer format, pulling the answer out of a completion, and turning a per-sample
score into a reward with TRL's signature.

Everything here is total: any string in, a value out, never an exception.
"""

from __future__ import annotations

import re
from typing import Callable

from qlora_rft.tasks.boxes import RELATIVE, Frame

FORMAT_INSTRUCTION = "Output the thinking process in <think> </think> and final answer in <answer> </answer> tags."

# The whole completion must be one think block then one answer block (dot matches newline).
_FORMAT = re.compile(r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$", re.DOTALL)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def prompt(problem: str) -> str:
    """The user text: the dataset's problem, plus the think/answer instruction unless it already has its own
    (the released detection problems carry their own answer-format instructions)."""
    if isinstance(problem, str) and "<answer>" in problem:
        return problem
    return f"{problem} {FORMAT_INSTRUCTION}"


def has_format(text: str) -> bool:
    """True when the text is `<think>..</think>` followed by `<answer>..</answer>` and nothing else.

    >>> has_format("<think>red, round</think> <answer>red circle</answer>")
    True
    """
    return isinstance(text, str) and _FORMAT.match(text) is not None


def extract_answer(text: str) -> str | None:
    """The content of the last `<answer>...</answer>` block, stripped; None when there is none.

    >>> extract_answer("<think>..</think><answer> red circle </answer>")
    'red circle'
    """
    if not isinstance(text, str):
        return None
    found = _ANSWER.findall(text)
    return found[-1].strip() if found else None


def completion_text(completion) -> str:
    """A completion as plain text: a string as is, or TRL's conversational form (a list of messages)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        completion = [completion]
    if isinstance(completion, list):
        parts = []
        for message in completion:
            content = message.get("content", "") if isinstance(message, dict) else message
            if isinstance(content, list):
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            parts.append(content if isinstance(content, str) else "")
        return "".join(parts)
    return ""


def per_completion(score: Callable[[str, str, Frame], float], name: str) -> Callable[..., list[float]]:
    """A reward with TRL's signature, `fn(completions, solution, frame=None, **columns)`, from a per-sample
    `score(completion_text, solution, frame)`: each completion against its row's solution, in its box frame (one
    per completion; none: the 0-1000 scale). Extra columns are accepted and ignored.

    >>> reward = per_completion(lambda text, solution, frame: float(extract_answer(text) == solution), "same")
    >>> reward(["<answer>a</answer>", [{"role": "assistant", "content": "<answer>b</answer>"}]], ["a", "a"])
    [1.0, 0.0]
    """

    def reward(completions: list, solution: list[str], frame: list | None = None, **columns) -> list[float]:
        frames = [Frame(*f) for f in frame] if frame is not None else [RELATIVE] * len(completions)
        return [score(completion_text(c), s, f) for c, s, f in zip(completions, solution, frames)]

    reward.__name__ = reward.__qualname__ = f"{name}_reward"
    reward.__doc__ = f"The {name!r} reward with TRL's signature, per completion: {score.__doc__ or ''}"
    return reward
