"""Reasoning grounding (LISA): from an instruction that needs a small inference, box the one object it means.

Answer format `<answer>(x1,y1),(x2,y2)</answer>`: integers on a 0-1000 scale of the original width and height,
(x1,y1) top-left, (x2,y2) bottom-right. Reward GIoU + 1 in [0, 2]; the evaluation metric is IoU (mIoU, acc@0.5).
Also the original evaluation's prompt, system prompt and first-box reading (eval.protocol=paper).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import replace
from pathlib import Path

from qlora_rft.errors import DataError
from qlora_rft.evaluation.rows import PerSample, Row, ScoreOptions, Scored, mean, per_sample, percent
from qlora_rft.tasks import boxes
from qlora_rft.tasks.boxes import RELATIVE, Box, Frame, from_frame, giou, into_frame, iou
from qlora_rft.tasks.common import extract_answer, per_completion, prompt
from qlora_rft.tasks.task import Reward, Task

THOUGHT = "Work out which object the instruction refers to, then find where it is in the image."  # warm-up only

SCALE = float(boxes.SCALE)


# ----------------------------------------------------------------------------- text


_REQUEST = (
    " Work out which object in the image the request refers to, then give one bounding "
    "box around it as (x1,y1),(x2,y2): integers from 0 to 1000, where x is measured along the image's width "
    "and y along its height (0 = left or top edge, 1000 = right or bottom edge), (x1,y1) is the top-left "
    "corner and (x2,y2) the bottom-right corner."
)


def problem(instruction: str) -> str:
    """The dataset's problem text: the instruction and the request for one box, with the coordinate convention."""
    return f"{instruction.strip()}{_REQUEST}"


def instruction_of(problem_text: str) -> str:
    """The instruction a problem was made from by `problem` (a problem written otherwise is taken whole).

    >>> instruction_of(problem("the cup you would drink from"))
    'the cup you would drink from'
    """
    text = problem_text.strip()
    return text[: -len(_REQUEST.strip())].strip() if text.endswith(_REQUEST.strip()) else text


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


# ----------------------------------------------------------------------------- the original evaluation

# What the original's LISA evaluation asks and how it reads the answer (eval.protocol=paper), kept to the character.
PAPER_SYSTEM = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The assistant "
    "first thinks about the reasoning process in the mind and then provides the user with the answer. The reasoning "
    "process and answer are enclosed within <think> </think> and <answer> </answer> tags, respectively, i.e., "
    "<think> reasoning process here </think><answer> answer here </answer>"
)
PAPER_PROMPT = (
    "Output the bounding box in the image corresponding to the instruction: {instruction}. Output the thinking "
    'process in <think> </think> and your grouding box. Following "<think> thinking process </think>\n'
    '<answer>(x1,y1),(x2,y2)</answer>)" format.'
)
_INTEGER_BOX = re.compile(r"\(\s*(\d+)\s*,\s*(\d+)\s*\)\s*,\s*\(\s*(\d+)\s*,\s*(\d+)\s*\)", re.ASCII)


def paper_prompt(problem_text: str) -> str:
    """The original evaluation's user text for a dataset problem (its instruction, see `instruction_of`)."""
    return PAPER_PROMPT.format(instruction=instruction_of(problem_text))


def parse_first_box(text: str, frame: Frame = RELATIVE) -> Box | None:
    """The original evaluation's reading: the first `(x1,y1),(x2,y2)` of integers anywhere in the completion, answer
    tags or not, on the 0-1000 scale (`frame`: the coordinates asked for); None when there is none or when that
    first box has x2 <= x1 or y2 <= y1 (IoU 0 in the original too; a later box is never taken). Coordinates past
    the image are kept, as the original kept them.

    >>> parse_first_box("<think>(1,2),(3,4) is the cup</think><answer>(10,20),(30,40)</answer>")
    Box(x1=1.0, y1=2.0, x2=3.0, y2=4.0)
    """
    match = _INTEGER_BOX.search(text) if isinstance(text, str) else None
    if match is None:
        return None
    box = Box(*(float(v) for v in match.groups()))  # a 400-digit number is inf: no box
    if not all(math.isfinite(v) for v in box) or box.x2 <= box.x1 or box.y2 <= box.y1:
        return None
    return from_frame(box, frame)


def paper_score(completion: str, solution: str, frame: Frame = RELATIVE) -> float:
    """IoU in [0, 1] of the first box anywhere in the completion (`parse_first_box`) with the solution's; 0.0 when
    either is missing."""
    predicted, truth = parse_first_box(completion, frame), parse_solution(solution)
    if predicted is None or truth is None:
        return 0.0
    return min(1.0, max(0.0, iou(predicted, truth)))


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


def metrics(rows: list[Row], options: ScoreOptions = ScoreOptions()) -> Scored:
    """`mIoU`: mean IoU in percent (an unparseable completion counts 0); `acc@0.5`: percent of rows with IoU >= 0.5."""
    return _overlap_metrics(per_sample(rows, parse, parse_solution, score))


def paper_metrics(rows: list[Row], options: ScoreOptions = ScoreOptions()) -> Scored:
    """`metrics` with the original evaluation's reading: a completion's box is its first one anywhere
    (`parse_first_box`)."""
    return _overlap_metrics(per_sample(rows, parse_first_box, parse_solution, paper_score))


def _overlap_metrics(found: PerSample) -> Scored:
    hits = [float(s >= 0.5) for s in found.scores]
    return Scored({"num_predictions": len(found.scores), "mIoU": percent(mean(found.scores)),
                   "acc@0.5": percent(mean(hits)), "unparseable": found.unparseable}, found.skipped)


TASK = Task(
    name="grounding",
    prompt=prompt,
    parse=parse,
    parse_solution=parse_solution,
    rewards={"grounding": Reward(per_completion(grounding_reward, "grounding"), 0.0, 2.0)},  # GIoU + 1
    default_weights={"format": 1.0, "grounding": 1.0},
    metrics=metrics,
    prediction_keys=("completion", "solution"),
    headline="mIoU",
    thought=THOUGHT,
    in_frame=in_frame,
    has_boxes=True,
    paper_max_new_tokens=128,  # the original's evaluation script
    read_json=lambda path, image_root: load_lisa_json(path, image_root),
    read_folder=lambda folder, split: load_reasonseg(folder, split) if is_reasonseg(folder, split) else None,
)

# The original evaluation's LISA prompt (with its system prompt) and reading: the first box anywhere in the text.
# It asked each LISA image its first instruction only.
PAPER_TASK = replace(TASK, prompt=paper_prompt, parse=parse_first_box, metrics=paper_metrics, system=PAPER_SYSTEM,
                     one_row_per_image=True)


# ----------------------------------------------------------------------------- data


def load_lisa_json(path: str | Path, image_root: str | Path | None = None) -> list[dict]:
    """Rows `{"image": {"bytes": None, "path": ABSOLUTE}, "problem": ..., "solution": ...}` from a LISA JSON list.

    A JSON list of instruction/box records plus an image folder (no parquet). Three record forms are read, and may
    be mixed in one file:
      canonical: {"image": "a/b.jpg", "problem": "<problem text>", "solution": "<answer>(x1,y1),(x2,y2)</answer>"}
                 (taken as written: the problem is used verbatim, so write it with `problem(instruction)`);
      box:       {"image": "a/b.jpg", "text" or "instruction": "<instruction>", "box": [x1, y1, x2, y2]}
                 (0-1000 numbers; becomes problem(instruction) and solution(box));
      released:  {"image_path": "a/b.jpg", "instruction": ["<instruction>", ...], "boxes": [[x1, y1, x2, y2], ...]}
                 (the original Visual-RFT's gen_box_ann.py output: pixel boxes; one row per instruction, the
                 first box scaled to 0-1000 by the image's size).
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
    return [row for index, record in enumerate(records) for row in _lisa_rows(record, index, path, root)]


def _lisa_rows(record, index: int, path: Path, root: Path) -> list[dict]:
    def fail(what: str) -> DataError:
        return DataError(f"{path} record {index}: {what}")

    if not isinstance(record, dict):
        raise fail(f"is a {type(record).__name__}, not an object with image, problem and solution")
    if "image_path" in record:
        return _released_rows(record, root, fail)
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

    return [{"image": {"bytes": None, "path": image_path}, "problem": problem_text, "solution": solution_text}]


def _released_rows(record: dict, root: Path, fail) -> list[dict]:
    """The original's box-annotation record (its gen_box_ann.py output): one row per instruction, the answer its
    first pixel box scaled to 0-1000 by the image's size."""
    image = record["image_path"]
    if not isinstance(image, str) or not image.strip():
        raise fail("field 'image_path' must be the image's path")
    image_path = os.path.abspath(root / image) if not os.path.isabs(image) else os.path.abspath(image)
    instructions = _instructions(record.get("instruction"))
    if instructions is None:
        raise fail("field 'instruction' must be a list of instruction texts (or one text)")
    found = record.get("boxes")
    if not isinstance(found, list) or not found or not _four_numbers(found[0]):
        raise fail(f"field 'boxes' must be a list of pixel boxes [x1, y1, x2, y2], not {found!r:.80}")
    return _rows_for(image_path, instructions, tuple(found[0]))


def _instructions(value) -> list[str] | None:
    """A `text` / `instruction` field as a list of non-empty texts (one text is a list of one); None if malformed."""
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        return None
    return texts


def _four_numbers(box) -> bool:
    return (isinstance(box, (list, tuple)) and len(box) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box))


def _rows_for(image_path: str, instructions: list[str], pixel_box: tuple) -> list[dict]:
    """One row per instruction, the answer `pixel_box` scaled to 0-1000 by the image's size (read from its header).
    An image that cannot be opened has no size: its rows get the whole image as a placeholder answer, never used,
    since the loader's image check skips (or refuses) them and says why."""
    from PIL import Image

    try:
        with Image.open(image_path) as image:
            width, height = image.size
        answer = solution(boxes.to_scale(pixel_box, width, height))
    except Exception:  # any reason the size is unknown: the image check reports it
        answer = solution((0, 0, 1000, 1000))
    cell = {"bytes": None, "path": image_path}
    return [{"image": cell, "problem": problem(text), "solution": answer} for text in instructions]


def is_reasonseg(folder: str | Path, split: str) -> bool:
    """Whether `folder/split` holds the raw ReasonSeg layout: NAME.json beside NAME.jpg (a folder of JSON files
    alone is left to `datasets`)."""
    split_dir = Path(folder).expanduser() / split
    return split_dir.is_dir() and any(path.with_suffix(".jpg").is_file() for path in split_dir.glob("*.json"))


def load_reasonseg(folder: str | Path, split: str) -> list[dict]:
    """Rows from LISA's raw ReasonSeg layout: `folder/SPLIT/NAME.jpg` beside `NAME.json`, which holds a `text` list
    of instructions, `is_sentence`, and labelme `shapes` (polygons labelled "target" or "ignore"). One row per
    instruction; the answer is the bounding box of every target polygon (ignore and the deprecated "flag" shapes
    left out), scaled to 0-1000 by the image's size. The original's gen_box_ann.py took the first shape alone."""
    split_dir = Path(folder).expanduser() / split
    rows = []
    for path in sorted(split_dir.glob("*.json")):
        if not path.is_file():  # a FIFO or a device would block the read
            raise DataError(f"ReasonSeg annotation {path} is not a regular file")
        try:
            item = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"cannot read ReasonSeg annotation {path} as JSON: {e}") from None
        instructions = _instructions(item.get("text")) if isinstance(item, dict) else None
        if instructions is None:
            raise DataError(f"{path}: field 'text' must be a list of instruction texts")
        points = [point for shape in item.get("shapes") or [] if _is_target(shape) for point in shape["points"]]
        if not points or not all(isinstance(p, (list, tuple)) and len(p) == 2 and _four_numbers([*p, *p])
                                 for p in points):
            raise DataError(f"{path}: needs 'shapes' with a polygon labelled 'target' (its 'points' [[x, y], ...])")
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        bounds = (min(xs), min(ys), max(xs), max(ys))
        rows += _rows_for(str(path.with_suffix(".jpg").absolute()), instructions, bounds)
    if not rows:
        raise DataError(f"{split_dir} holds no ReasonSeg annotation (NAME.json beside NAME.jpg)")
    return rows


def _is_target(shape) -> bool:
    """A ReasonSeg shape that belongs to the answer: labelled target (LISA's loader: any label but "ignore" and the
    deprecated "flag"), with a list of points."""
    if not isinstance(shape, dict) or not isinstance(shape.get("points"), list):
        return False
    label = str(shape.get("label", "")).lower()
    return "ignore" not in label and label != "flag"
