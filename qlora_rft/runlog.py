"""Run logging: one JSON line per step in metrics.jsonl and a rich progress bar with the numbers that matter;
completion samples in completions.jsonl. Both also go to the run's trackers (train.report_to: trackers.py).

`NullLogger` has the same methods and does nothing, so the training loop never branches on logging being on.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from qlora_rft.files import append_lines
from qlora_rft.trackers import Trackers

SAMPLES = "completions.jsonl"  # beside metrics.jsonl
KEPT = "the checkpoints written so far are kept: free some space and continue with --resume"


class RunLogger:
    def __init__(self, path: Path, total_steps: int, start_step: int = 0, console: Console | None = None,
                 description: str = "GRPO",
                 shown: tuple[str, ...] = ("epoch", "reward", "kl", "entropy", "completion_length",
                                           "tokens_per_second"),
                 trackers: Trackers | None = None):
        self._shown = shown
        self._trackers = trackers or Trackers()
        path.parent.mkdir(parents=True, exist_ok=True)
        continue_file(path, start_step)
        self._samples = path.parent / SAMPLES
        if self._samples.exists():
            continue_file(self._samples, start_step)
        self._path = path
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self._task = self._progress.add_task(description, total=total_steps, completed=start_step, stats="")

    def __enter__(self):
        self._progress.start()
        return self

    def __exit__(self, *exc):
        self._progress.stop()
        self._trackers.close()

    def log(self, metrics: dict, write: bool = True) -> None:
        if write:
            clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in metrics.items()}
            append_lines(self._path, [json.dumps(clean)], KEPT)
            self._trackers.log(clean)
        short = {"completion_length": "len", "tokens_per_second": "tok/s"}
        stats = "  ".join(
            f"{short.get(k, k)} {metrics[k]:.4g}" for k in self._shown if isinstance(metrics.get(k), (int, float))
        )
        self._progress.update(self._task, completed=metrics["step"], stats=stats)

    def samples(self, step: int, rows: list[dict]) -> None:
        """Completion samples of a step: a completions.jsonl line each, and a text table for the trackers."""
        append_lines(self._samples, [json.dumps({"step": step, **row}) for row in rows], KEPT)
        self._trackers.text("completions", rows, step)


class NullLogger:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def log(self, metrics: dict, write: bool = True) -> None:
        return None

    def samples(self, step: int, rows: list[dict]) -> None:
        return None


def continue_file(path: Path, start_step: int) -> None:
    """Keep the lines of a JSON-lines log up to `start_step` (0: none): a resumed run continues the file, and lines
    written after its checkpoint (before a crash) are dropped, as is a line cut by a crash."""
    kept = []
    if start_step and path.exists():
        for line in path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= start_step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue
    path.write_text("".join(line + "\n" for line in kept))


def read_metrics(path: Path) -> list[dict]:
    """Lines of a metrics.jsonl (a trailing line cut by a crash is ignored)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
