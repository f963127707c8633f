"""The pieces a task's metric function is built from: a predictions line (`Row`), what it returns (`Scored`), the
lines it skips (`Skipped`), and the per-sample loop most tasks share (`per_sample`).

Imports no task, so every task module can use it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from qlora_rft.tasks.boxes import Frame

DECIMALS = 4


@dataclass
class Skipped:
    """A predictions line left out of the metric: its 1-based line number and why."""

    line: int
    reason: str


@dataclass
class Row:
    """One usable predictions line: its 1-based line number and the JSON object written there."""

    line: int
    record: dict


@dataclass
class Scored:
    """What a task's metric function returns: the metric values (`num_predictions` among them, the lines used) and
    the rows it had to skip itself."""

    metrics: dict
    skipped: list[Skipped]


@dataclass(frozen=True)
class ScoreOptions:
    """What a metric function may need besides the lines: detection's annotation file and evaluated classes."""

    annotations: str | Path | None = None
    classes: str | list | None = None


@dataclass
class PerSample:
    """Each used row's score, how many completions did not parse, and the rows skipped."""

    scores: list[float]
    unparseable: int
    skipped: list[Skipped]


def percent(fraction) -> float | None:
    """A fraction as a rounded percentage; None for a missing value (pycocotools' -1, NaN, None).

    >>> percent(0.123456789), percent(-1), percent(None)
    (12.3457, None, None)
    """
    if fraction is None:
        return None
    value = float(fraction)
    if not math.isfinite(value) or value < 0:
        return None
    return round(100.0 * value, DECIMALS)


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def repeat_of(first_line: dict, key, line: int) -> int | None:
    """The line that already answered `key` (a repeat: only the first answer counts), else None after recording
    `line` as its answer. Every task de-duplicates this way: detection by (image, category), the others by id."""
    first = first_line.setdefault(key, line)
    return None if first == line else first


def row_frame(row: Row) -> Frame:
    """The box frame a prediction was asked for: its `frame` [width, height] (pixels, written by families that
    answer in pixels), else the dataset's 0-1000 scale; answers are mapped back to 0-1000 with it."""
    from qlora_rft.tasks.boxes import RELATIVE, Frame  # here: the tasks package imports this module at its load

    frame = row.record.get("frame")
    if isinstance(frame, list) and len(frame) == 2 and all(_positive(v) for v in frame):
        return Frame(*frame)
    return RELATIVE


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def per_sample(rows: list[Row], parse: Callable, parse_solution: Callable, score: Callable) -> PerSample:
    """A task's own score per row (`score(completion, solution, frame)`), with `parse` / `parse_solution` deciding
    what is unparseable and what is a bad row.

    An unparseable completion scores 0 (the task's score says so) and is used; a solution that does not parse
    cannot be scored at all, so its row is skipped; so is a repeat of an `id` an earlier line answered (rows
    without an `id` are all used).
    """
    scores: list[float] = []
    unparseable = 0
    skipped: list[Skipped] = []
    first_line: dict[str, int] = {}
    for row in rows:
        completion, solution = row.record["completion"], row.record["solution"]
        if parse_solution(solution) is None:
            skipped.append(Skipped(row.line, f"solution {solution!r:.60} does not parse"))
            continue
        if "id" in row.record:
            first = repeat_of(first_line, str(row.record["id"]), row.line)
            if first is not None:
                skipped.append(Skipped(row.line, f"repeats id {row.record['id']!r:.40} of line {first}"))
                continue
        frame = row_frame(row)
        if parse(completion, frame) is None:
            unparseable += 1
        scores.append(float(score(completion, solution, frame)))
    return PerSample(scores, unparseable, skipped)
