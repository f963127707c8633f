"""Fine-grained classification (Flowers102, Pets37, FGVC-Aircraft, Stanford Cars): name the class.

Answer format `<answer>garden phlox</answer>`. One parser, `parse`, serves the reward and the evaluation.
Matching is exact after normalisation (lowercase, no spaces, underscores or hyphens), never by substring.
"""

from __future__ import annotations

import re

from qlora_rft.tasks.boxes import RELATIVE, Frame
from qlora_rft.tasks.common import extract_answer, prompt  # noqa: F401  (prompt: the shared rule)

THOUGHT = "Compare the image with the classes."  # the warm-up's fixed reasoning (cold-start SFT only)

_NOISE = re.compile(r"[\s_\-]+")


def normalise(label: str) -> str:
    """'Garden_Phlox ' -> 'gardenphlox'."""
    return _NOISE.sub("", label).lower()


def parse(text: str, frame: Frame = RELATIVE) -> str | None:
    """The normalised class name in the answer tags; None if empty or absent (`frame` unused: no boxes).

    >>> parse("<think>..</think><answer>Garden Phlox</answer>")
    'gardenphlox'
    """
    return _label(text, bare=False)


def _label(text: str, bare: bool) -> str | None:
    """`bare=True` also reads an untagged label, as some solution columns hold (never for completions)."""
    answer = extract_answer(text)
    if answer is None and bare and isinstance(text, str) and "<answer>" not in text:
        answer = text
    if answer is None:
        return None
    label = normalise(answer)
    return label or None


def parse_solution(text: str) -> str | None:
    return _label(text, bare=True)


def in_frame(solution: str, frame: Frame) -> str:
    """No boxes: the solution whatever the frame."""
    return solution


def score(completion: str, solution: str, frame: Frame = RELATIVE) -> float:
    """1.0 when the predicted class equals the solution's class, else 0.0 (also when either is missing; `frame`
    unused: no boxes)."""
    predicted, truth = parse(completion), parse_solution(solution)
    return float(predicted is not None and predicted == truth)
