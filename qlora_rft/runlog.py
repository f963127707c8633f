"""Run logging: one JSON line per step in metrics.jsonl and a rich progress bar with the numbers that matter.

`NullLogger` has the same methods and does nothing, so the training loop never branches on logging being on.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class RunLogger:
    def __init__(self, path: Path, total_steps: int, start_step: int = 0, console: Console | None = None,
                 description: str = "GRPO",
                 shown: tuple[str, ...] = ("epoch", "reward", "kl", "completion_length", "tokens_per_second")):
        self._shown = shown
        path.parent.mkdir(parents=True, exist_ok=True)
        # A resumed run continues the file; lines past the resumed step (written after the checkpoint) are dropped.
        kept = []
        if start_step and path.exists():
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= start_step:
                        kept.append(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a crash
        path.write_text("".join(line + "\n" for line in kept))
        self._file = path.open("a")
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
        self._file.close()

    def log(self, metrics: dict, write: bool = True) -> None:
        if write:
            clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in metrics.items()}
            self._file.write(json.dumps(clean) + "\n")
            self._file.flush()
        short = {"completion_length": "len", "tokens_per_second": "tok/s"}
        stats = "  ".join(
            f"{short.get(k, k)} {metrics[k]:.4g}" for k in self._shown if isinstance(metrics.get(k), (int, float))
        )
        self._progress.update(self._task, completed=metrics["step"], stats=stats)


class NullLogger:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def log(self, metrics: dict, write: bool = True) -> None:
        return None


def read_metrics(path: Path) -> list[dict]:
    """Lines of a metrics.jsonl (a trailing line cut by a crash is ignored)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
