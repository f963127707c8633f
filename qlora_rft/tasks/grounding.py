"""Reasoning grounding (LISA): from an instruction that needs a small inference, box the one object it means.

Answer format `<answer>(x1,y1),(x2,y2)</answer>`: integers on a 0-1000 scale of the original width and height,
(x1,y1) top-left, (x2,y2) bottom-right. Reward GIoU + 1 in [0, 2]; the evaluation metric is IoU (mIoU, acc@0.5).
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

from qlora_rft.errors import DataError
from qlora_rft.tasks import boxes
from qlora_rft.tasks.boxes import RELATIVE, Box, Frame, from_frame, giou, into_frame, iou
from qlora_rft.tasks.common import extract_answer, prompt  # noqa: F401  (prompt: the shared rule)

THOUGHT = "Work out which object the instruction refers to, then find where it is in the image."  # warm-up only

SCALE = float(boxes.SCALE)


# ----------------------------------------------------------------------------- text


def problem(instruction: str) -> str:
    """The dataset's problem text: the instruction and the request for one box, with the coordinate convention."""
    return (
        f"{instruction.strip()} Work out which object in the image the request refers to, then give one bounding "
        "box around it as (x1,y1),(x2,y2): integers from 0 to 1000, where x is measured along the image's width "
        "and y along its height (0 = left or top edge, 1000 = right or bottom edge), (x1,y1) is the top-left "
        "corner and (x2,y2) the bottom-right corner."
    )


def solution(box) -> str:
    """`<answer>(x1,y1),(x2,y2)</answer>` with the coordinates rounded to integers (a Box or any 4 numbers).

    >>> solution(Box(10.4, 20, 30.6, 40))
    '<answer>(10,20),(31,40)</answer>'
    """
    x1, y1, x2, y2 = (int(round(float(v))) for v in box)
    return f"<answer>({x1},{y1}),({x2},{y2})</answer>"


# ----------------------------------------------------------------------------- parsing

_NUM = r"([-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)"
_SEP = r"\s*,\s*"
# The first complete box in the text, as corner pairs `(x1,y1),(x2,y2)` / `[x1,y1],[x2,y2]` or a flat
# `[x1,y1,x2,y2]`; all four numbers always come from the same match (never a corner of one box with another's).
_BOX = re.compile(
    rf"\(\s*{_NUM}{_SEP}{_NUM}\s*\)\s*,?\s*\(\s*{_NUM}{_SEP}{_NUM}\s*\)"
    rf"|\[\s*{_NUM}{_SEP}{_NUM}\s*\]\s*,?\s*\[\s*{_NUM}{_SEP}{_NUM}\s*\]"
    rf"|\[\s*{_NUM}{_SEP}{_NUM}{_SEP}{_NUM}{_SEP}{_NUM}\s*\]",
    re.ASCII,  # ASCII digits only: '１０' is not read as 10
)


def _read_box(text: str, frame: Frame = RELATIVE) -> Box | None:
    """The first complete box written in the text, if it is a valid box within `frame`, on the 0-1000 scale; None
    otherwise (never raises)."""
    match = _BOX.search(text)
    if match is None:
        return None
    try:
        values = [float(v) for v in match.groups() if v is not None]
    except (ValueError, OverflowError):
        return None
    limits = (frame.width, frame.height, frame.width, frame.height)
    if len(values) != 4 or not all(math.isfinite(v) and 0.0 <= v <= limit for v, limit in zip(values, limits)):
        return None
    box = Box(*values)
    if box.x2 <= box.x1 or box.y2 <= box.y1:
        return None
    return from_frame(box, frame)


def parse(text: str, frame: Frame = RELATIVE) -> Box | None:
    """The box in a completion's (last) answer block, on the 0-1000 scale (`frame`: the coordinates the model was
    asked for); None when the tags, the box or its validity are missing.

    >>> parse("<think>..</think><answer>(10,20),(30,40)</answer>")
    Box(x1=10.0, y1=20.0, x2=30.0, y2=40.0)
    """
    answer = extract_answer(text)
    return None if answer is None else _read_box(answer, frame)


def parse_solution(text: str) -> Box | None:
    """A dataset solution's box: tagged like a completion, or an untagged `(x1,y1),(x2,y2)` / `[x1,y1,x2,y2]`."""
    if not isinstance(text, str):
        return None
    answer = extract_answer(text)
    if answer is None and "<answer>" not in text:
        answer = text
    return None if answer is None else _read_box(answer)


# ----------------------------------------------------------------------------- overlap


def in_frame(solution_text: str, frame: Frame) -> str:
    """A dataset solution written in `frame` (the warm-up target of a family that answers in pixels)."""
    truth = parse_solution(solution_text)
    return solution_text if frame == RELATIVE or truth is None else solution(into_frame(truth, frame))


def grounding_reward(completion: str, solution: str, frame: Frame = RELATIVE) -> float:
    """GIoU + 1 between the completion's box and the solution's, in [0, 2]; 0.0 when either does not parse."""
    predicted, truth = parse(completion, frame), parse_solution(solution)
    if predicted is None or truth is None:
        return 0.0
    return min(2.0, max(0.0, giou(predicted, truth) + 1.0))


def score(completion: str, solution: str, frame: Frame = RELATIVE) -> float:
    """IoU in [0, 1] (0.0 when either does not parse); its mean is mIoU, its share >= 0.5 is acc@0.5."""
    predicted, truth = parse(completion, frame), parse_solution(solution)
    if predicted is None or truth is None:
        return 0.0
    return min(1.0, max(0.0, iou(predicted, truth)))


# ----------------------------------------------------------------------------- data


def load_lisa_json(path: str | Path, image_root: str | Path | None = None) -> list[dict]:
    """Rows `{"image": {"bytes": None, "path": ABSOLUTE}, "problem": ..., "solution": ...}` from a LISA JSON list.

    LISA ships a JSON list of instruction/box records plus an image folder (no parquet); its box is the first
    polygon's bounding box scaled to 0-1000. Two record forms are read, and may be mixed in one file:
      canonical: {"image": "a/b.jpg", "problem": "<problem text>", "solution": "<answer>(x1,y1),(x2,y2)</answer>"}
                 (taken as written: the problem is used verbatim, so write it with `problem(instruction)`);
      box:       {"image": "a/b.jpg", "text" or "instruction": "<instruction>", "box": [x1, y1, x2, y2]}
                 (0-1000 numbers; becomes problem(instruction) and solution(box)).
    Relative image paths are taken from image_root (default: the JSON's folder). Only the structure is checked
    here; whether a box is valid and an image decodes is the dataset loader's bad-row check.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"LISA annotation file {path} does not exist")
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read LISA annotation file {path} as JSON: {e}") from None
    if not isinstance(records, list):
        raise DataError(f"{path} must hold a JSON list of records, not a {type(records).__name__}")
    root = Path(image_root).expanduser() if image_root is not None else path.parent
    return [_lisa_row(record, index, path, root) for index, record in enumerate(records)]


def _lisa_row(record, index: int, path: Path, root: Path) -> dict:
    def fail(what: str) -> DataError:
        return DataError(f"{path} record {index}: {what}")

    if not isinstance(record, dict):
        raise fail(f"is a {type(record).__name__}, not an object with image, problem and solution")
    image = record.get("image")
    if not isinstance(image, str) or not image.strip():
        raise fail("missing field 'image' (the image path, relative to the image folder or absolute)")
    image_path = os.path.abspath(root / image) if not os.path.isabs(image) else os.path.abspath(image)

    if "problem" in record:
        problem_text = record["problem"]
        if not isinstance(problem_text, str) or not problem_text.strip():
            raise fail("field 'problem' must be non-empty text")
    else:
        instruction = record.get("text", record.get("instruction"))
        if not isinstance(instruction, str) or not instruction.strip():
            raise fail("missing field 'problem' (or 'text' / 'instruction'): the instruction text")
        problem_text = problem(instruction)

    if "solution" in record:
        solution_text = record["solution"]
        if not isinstance(solution_text, str):
            raise fail("field 'solution' must be text like <answer>(x1,y1),(x2,y2)</answer>")
    elif "box" in record:
        box = record["box"]
        if (
            not isinstance(box, (list, tuple))
            or len(box) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)
        ):
            raise fail(f"field 'box' must be 4 numbers [x1, y1, x2, y2] on the 0-1000 scale, not {box!r:.80}")
        solution_text = solution(box)
    else:
        raise fail("missing field 'solution' (or 'box'): the answer box")

    return {"image": {"bytes": None, "path": image_path}, "problem": problem_text, "solution": solution_text}
