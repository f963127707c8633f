"""A task for data that is none of the three: rows with a prompt (`problem`: text, used as written; `image` or
`images`: one or several) and whatever columns the rewards need, trained and evaluated with the rewards the config
names (built-in or from rewards.plugins).

There is no answer format, no solution to parse and no default reward. The evaluation records each completion's
rewards in its predictions line (`reward`: the weighted sum, `rewards`: each one); the metrics are their means.
"""

from __future__ import annotations

import math

from qlora_rft.evaluation.rows import Row, ScoreOptions, Scored, Skipped, mean, repeat_of
from qlora_rft.tasks.boxes import RELATIVE, Frame
from qlora_rft.tasks.common import extract_answer
from qlora_rft.tasks.task import Task

DECIMALS = 6  # rewards are not percentages: more digits than the other tasks' metrics


def prompt(problem: str) -> str:
    """The row's own text: a generic prompt says itself what answer it wants."""
    return problem


def parse(text: str, frame: Frame = RELATIVE) -> str | None:
    """The answer block's content when there is one (what a reward may read), else None."""
    return extract_answer(text)


def metrics(rows: list[Row], options: ScoreOptions = ScoreOptions()) -> Scored:
    """`reward`: the mean over rows of the weighted reward; `rewards/NAME`: each reward's mean. A line whose
    rewards are not finite numbers, or that repeats an `id`, is skipped.

    >>> rows = [Row(1, {"id": 0, "completion": "a", "reward": 1.5, "rewards": {"format": 1.0, "short": 0.5}}),
    ...         Row(2, {"id": 1, "completion": "b", "reward": 0.5, "rewards": {"format": 0.0, "short": 0.5}})]
    >>> metrics(rows).metrics
    {'num_predictions': 2, 'reward': 1.0, 'rewards/format': 0.5, 'rewards/short': 0.5}
    """
    totals: list[float] = []
    each: dict[str, list[float]] = {}
    skipped: list[Skipped] = []
    first_line: dict[str, int] = {}
    for row in rows:
        reward, parts = row.record["reward"], row.record["rewards"]
        if not _finite(reward) or not isinstance(parts, dict) or not all(_finite(v) for v in parts.values()):
            skipped.append(Skipped(row.line, "'reward' and 'rewards' must hold finite numbers"))
            continue
        first = repeat_of(first_line, str(row.record["id"]), row.line) if "id" in row.record else None
        if first is not None:
            skipped.append(Skipped(row.line, f"repeats id {row.record['id']!r:.40} of line {first}"))
            continue
        totals.append(float(reward))
        for name, value in parts.items():
            each.setdefault(name, []).append(float(value))
    found = {"num_predictions": len(totals), "reward": _rounded(mean(totals))}
    return Scored(found | {f"rewards/{name}": _rounded(mean(values)) for name, values in each.items()}, skipped)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, DECIMALS)


TASK = Task(
    name="generic",
    prompt=prompt,
    parse=parse,
    parse_solution=None,  # rows need no solution; a `solution` column is passed to the rewards like any other
    rewards={},
    default_weights={},  # rewards.weights names them
    metrics=metrics,
    prediction_keys=("completion", "reward", "rewards"),  # the evaluation computes them with the run's rewards
    headline="reward",
)
