"""Metrics recomputed from a predictions file alone (no model), by the task's own metric function (`Task.metrics`:
accuracy for classification, mIoU and acc@0.5 for grounding, box mAP for detection, with pycocotools or the LVIS
API in coco.py). Completions are read only by the tasks' own parsers; a malformed line, or a repeat of a
prompt already answered, is skipped and reported by its 1-based line number; only a file with no usable line at all
is refused. A line's `frame` (pixels its boxes are written in) maps them back to the 0-1000 scale first. Under the
paper protocol a task reads completions as the original evaluation did (its `get_task(name, "paper")` variant;
grounding: the first box anywhere); metrics.json records the protocol.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from qlora_rft.errors import ConfigError, DataError
from qlora_rft.files import atomic_file, refuse_inputs
from qlora_rft.evaluation.rows import Row, ScoreOptions, Skipped
from qlora_rft.tasks import get_task

MAX_SKIPPED_LINES = 100  # metrics.json lists at most this many skipped lines (the count covers them all)

_TEXT_KEYS = ("completion", "solution", "category")  # when required, these must be strings


@dataclass
class Predictions:
    """The usable rows of a predictions file and the lines skipped; unpacks as `rows, skipped = ...`."""

    rows: list[Row]
    skipped: list[Skipped]

    def __iter__(self):
        return iter((self.rows, self.skipped))


# ---------------------------------------------------------------------------------------------------------- reading


def read_predictions(path: str | Path, required: tuple[str, ...] = ("completion",)) -> Predictions:
    """The JSON-lines predictions file as rows; bad lines are skipped with their line number and reason.

    A line is skipped when it is not UTF-8, not valid JSON, not a JSON object, says why it was not asked
    (`skipped`), lacks one of `required`, or holds a non-string `completion` / `solution` / `category` among them.
    Blank lines are neither rows nor skipped (they still count for the numbering). Only a missing or unreadable file raises (DataError).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"predictions file {path} does not exist")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read predictions file {path}: {e}") from None
    rows: list[Row] = []
    skipped: list[Skipped] = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        raw = raw.strip()
        if not raw:
            continue
        reason = None
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            reason = "not UTF-8 text"
        except (ValueError, RecursionError) as e:
            reason = f"not valid JSON ({getattr(e, 'msg', type(e).__name__)})"
        if reason is None and not isinstance(record, dict):
            reason = f"not a JSON object (a {type(record).__name__})"
        if reason is None and isinstance(record.get("skipped"), str):  # the evaluation did not ask this prompt
            reason = f"not asked: {record['skipped']}"
        if reason is None:
            missing = [key for key in required if key not in record]
            wrong = [k for k in required if k in _TEXT_KEYS and k in record and not isinstance(record[k], str)]
            if missing:
                reason = "missing key" + ("s " if len(missing) > 1 else " ") + ", ".join(repr(k) for k in missing)
            elif wrong:
                reason = f"{wrong[0]!r} is not text"
        if reason is None:
            rows.append(Row(number, record))
        else:
            skipped.append(Skipped(number, reason))
    return Predictions(rows, skipped)


# ---------------------------------------------------------------------------------------------------------- files


def score_file(
    task: str, predictions: str | Path, annotations: str | Path | None = None, classes: str | list | None = None,
    protocol: str = "ours",
) -> dict:
    """The metrics of a predictions file, as written to metrics.json.

    Keys: task, protocol (eval.protocol: how completions are read), num_predictions (lines used), skipped (count),
    the task's metrics, then skipped_lines (the first 100 as {"line", "reason"}). The lines need the task's
    `prediction_keys`. Detection needs `annotations` (COCO or LVIS JSON) and uses `classes`; the other tasks ignore
    both. A file with no usable line raises DataError saying what was skipped and why.
    """
    spec = get_task(task, protocol)  # an unknown task is a ConfigError naming the known ones
    if spec.needs_annotations and annotations is None:
        raise ConfigError(f"{task} metrics need the annotation file (COCO or LVIS JSON) of the evaluated images")
    rows, skipped = read_predictions(predictions, spec.prediction_keys)
    scored = spec.metrics(rows, ScoreOptions(annotations, classes))
    skipped = sorted(skipped + scored.skipped, key=lambda s: s.line)
    if scored.metrics["num_predictions"] == 0:
        raise _no_usable_line(predictions, skipped, scored.metrics.get("outside_classes", 0))
    values = dict(scored.metrics)
    metrics = {"task": task, "protocol": protocol, "num_predictions": values.pop("num_predictions"),
               "skipped": len(skipped)}
    metrics.update(values)
    metrics["skipped_lines"] = [{"line": s.line, "reason": s.reason} for s in skipped[:MAX_SKIPPED_LINES]]
    return metrics


def _no_usable_line(predictions: str | Path, skipped: list[Skipped], outside_classes: int) -> DataError:
    """The error for a predictions file none of whose lines can be scored: how many were skipped, and why."""
    shown = "; ".join(f"line {s.line}: {s.reason}" for s in skipped[:3]) + ("; ..." if len(skipped) > 3 else "")
    why = [f"{len(skipped)} skipped ({shown})"] if skipped else []
    if outside_classes:
        why.append(f"{outside_classes} outside the evaluated classes")
    return DataError(f"predictions file {predictions} has no usable line: {', '.join(why) or 'it holds no line'}")


def write_metrics(metrics: dict, out: str | Path, inputs: tuple = ()) -> Path:
    """Write the metrics as indented JSON (NaN refused), atomically, creating the folder; returns the path.

    `out` an existing folder: metrics.json inside it. An `out` that is one of the `inputs` (the predictions or
    annotation file scored) is refused, so scoring never writes over what it read.
    """
    out = Path(out).expanduser()
    if out.is_dir():
        out = out / "metrics.json"
    refuse_inputs(out, inputs, "--out")
    text = json.dumps(metrics, indent=2, allow_nan=False) + "\n"
    with atomic_file(out) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return out
