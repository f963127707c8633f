"""Fine-grained classification (Flowers102, Pets37, FGVC-Aircraft, Stanford Cars): name the class.

Answer format `<answer>garden phlox</answer>`. One parser, `parse`, serves the reward and the evaluation (accuracy).
Matching is exact after normalisation (lowercase, no spaces, underscores or hyphens), never by substring.
"""

from __future__ import annotations

import re

from qlora_rft.evaluation.rows import Row, ScoreOptions, Scored, mean, per_sample, percent
from qlora_rft.tasks.boxes import RELATIVE, Frame
from qlora_rft.tasks.common import extract_answer, per_completion, prompt
from qlora_rft.tasks.task import Reward, Task

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


def metrics(rows: list[Row], options: ScoreOptions = ScoreOptions()) -> Scored:
    """`accuracy`: percent of rows whose class equals the solution's (an unparseable completion is wrong).

    >>> rows = [Row(1, {"completion": "<answer>Rose</answer>", "solution": "<answer>rose</answer>"}),
    ...         Row(2, {"completion": "no idea", "solution": "<answer>rose</answer>"})]
    >>> metrics(rows).metrics
    {'num_predictions': 2, 'accuracy': 50.0, 'unparseable': 1}
    """
    found = per_sample(rows, parse, parse_solution, score)
    return Scored({"num_predictions": len(found.scores), "accuracy": percent(mean(found.scores)),
                   "unparseable": found.unparseable}, found.skipped)


TASK = Task(
    name="classification",
    prompt=prompt,
    parse=parse,
    parse_solution=parse_solution,
    rewards={"classification": Reward(per_completion(score, "classification"))},  # 1 for the class, else 0
    default_weights={"format": 1.0, "classification": 1.0},
    metrics=metrics,
    prediction_keys=("completion", "solution"),
    headline="accuracy",
    thought=THOUGHT,
    in_frame=in_frame,
    paper_max_new_tokens=1024,  # the original's evaluation scripts
)
