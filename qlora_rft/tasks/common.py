"""What every task shares: the think/answer format and pulling the answer out of a completion.

Everything here is total: any string in, a value out, never an exception.
"""

from __future__ import annotations

import re

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
