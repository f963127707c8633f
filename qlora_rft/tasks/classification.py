"""Fine-grained classification (Flowers102, Pets37, FGVC-Aircraft, Stanford Cars): name the class.

Answer format `<answer>garden phlox</answer>`. One parser, `parse`, serves the reward and the evaluation.
Matching is exact after normalisation (lowercase, no spaces, underscores or hyphens), never by substring.
"""

from __future__ import annotations

import re

from qlora_rft.tasks.common import FORMAT_INSTRUCTION, extract_answer

THOUGHT = "Look at the colours and the outline."  # the warm-up's fixed reasoning, for cold-start SFT only

_NOISE = re.compile(r"[\s_\-]+")


def prompt(problem: str) -> str:
    """The user text: the dataset's question followed by the think/answer instruction."""
    return f"{problem} {FORMAT_INSTRUCTION}"


def normalise(label: str) -> str:
    """'Garden_Phlox ' -> 'gardenphlox'."""
    return _NOISE.sub("", label).lower()


def parse(text: str) -> str | None:
    """The normalised class name in the answer tags (or in a bare solution string); None if empty or absent.

    >>> parse("<think>..</think><answer>Garden Phlox</answer>")
    'gardenphlox'
    """
    answer = extract_answer(text)
    if answer is None and isinstance(text, str) and "<answer>" not in text:
        answer = text  # a bare label, as some solution columns hold
    if answer is None:
        return None
    label = normalise(answer)
    return label or None


def score(completion: str, solution: str) -> float:
    """1.0 when the predicted class equals the solution's class, else 0.0 (also when either is missing)."""
    predicted, truth = parse(completion), parse(solution)
    return float(predicted is not None and predicted == truth)
