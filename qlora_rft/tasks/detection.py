"""Open-vocabulary / few-shot detection (COCO, LVIS): every box of one named category, 0-1000 integer coordinates.

Owns the prompt, the one tolerant parser (rewards and evaluation), IoU and the IoU / confidence rewards. The reward's
max(#truth, #predictions) denominator punishes misses and spurious boxes alike. Unlike the original code, answering
'No Objects' when the truth is empty scores 1 (the original scored it 0 always).
"""

from __future__ import annotations

import ast
import math
import re
import warnings
from typing import NamedTuple

from qlora_rft.evaluation.rows import Row, ScoreOptions, Scored
from qlora_rft.tasks.boxes import (RELATIVE, SCALE, Box, Frame, from_frame, into_frame, iou,  # noqa: F401
                                   to_pixels)  # (to_pixels: evaluation uses it)
from qlora_rft.tasks.common import extract_answer, per_completion, prompt
from qlora_rft.tasks.task import Reward, Task

THOUGHT = "Look for every instance of the category and locate each one."  # warm-up reasoning (cold-start SFT only)

NO_OBJECTS = "No Objects"
IOU_THRESHOLD = 0.5  # a prediction matches a truth only when IoU is strictly above this

_DICT = re.compile(r"\{[^{}]*\}")  # innermost {...} blocks: a cut-off last dict never closes, so it is skipped
_MAX_ITEM_CHARS = 400  # a valid item is ~60 characters; longer blocks are junk and never reach literal_eval
_OPEN_ANSWER = "<answer>"


class Detection(NamedTuple):
    box: Box
    confidence: float


def problem(category: str) -> str:
    """The dataset problem for one category, with the coordinate convention and the think/answer format spelled out."""
    return (
        f"Find every {category} in the image. For each one give its bounding box as four integers "
        f"[x1, y1, x2, y2] from 0 to {SCALE}: (x1, y1) is the top-left corner and (x2, y2) the bottom-right corner, "
        f"each coordinate being its fraction of the image's original width (x) or height (y) times {SCALE}. "
        "Give each box a confidence between 0 and 1 with two decimals. "
        "Output the thinking process in <think> </think> and the final answer in <answer> </answer> tags, "
        "the answer being a list like <answer>[{'Position': [x1, y1, x2, y2], 'Confidence': 0.85}, ...]</answer>. "
        f"If there is no {category} in the image, answer <answer>{NO_OBJECTS}</answer>."
    )


# The problem text of the released training sets (ViRFT_COCO, ViRFT_LVIS_few_shot...), the text the paper's models
# trained on; the original evaluation asks the same (eval.protocol=paper). Kept to the character, typos included.
RELEASED_PROBLEM = (
    "Detect all objects belonging to the category '{category}' in the image, and provide the bounding boxes "
    "(between 0 and 1000, integer) and confidence (between 0 and 1, with two decimal places).\n"
    "If no object belonging to the category '{category}' in the image, return 'No Objects'.\n"
    "Output the thinking process in <think> </think> and final answer in <answer> </answer> tags."
    "The output answer format should be as follows:\n"
    "<think> ... </think> <answer>[{{'Position': [x1, y1, x2, y2], 'Confidence': number}}, ...]</answer>\n"
    "Please strictly follow the format."
)


def released_problem(category: str) -> str:
    """The released training data's problem for one category (and the paper protocol's evaluation prompt)."""
    return RELEASED_PROBLEM.format(category=category)


def _number_text(value: float) -> str:
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)


def solution(boxes: list[tuple[float, float, float, float]]) -> str:
    """The solution in the released format, each box with confidence 1.0; `<answer>No Objects</answer>` if empty.

    >>> solution([(10, 20, 30, 40)])
    "<answer>[{'Position': [10, 20, 30, 40], 'Confidence': 1.0}]</answer>"
    """
    if not boxes:
        return f"<answer>{NO_OBJECTS}</answer>"
    items = [
        "{'Position': [" + ", ".join(_number_text(v) for v in box) + "], 'Confidence': 1.0}" for box in boxes
    ]
    return "<answer>[" + ", ".join(items) + "]</answer>"


# ---------------------------------------------------------------------------------------------------------- parsing


def _real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _in_range(value, low: float, high: float) -> float | None:
    """`value` as a float when it is a real number within [low, high] (ints compared before conversion: no overflow)."""
    if not _real(value) or not low <= value <= high:  # NaN fails both comparisons
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _box(position, frame: Frame) -> Box | None:
    """Four coordinates within `frame` with x2 > x1 and y2 > y1, on the 0-1000 scale; None otherwise."""
    if not isinstance(position, (list, tuple)) or len(position) != 4:
        return None
    limits = (frame.width, frame.height, frame.width, frame.height)
    coords = [_in_range(v, 0, limit) for v, limit in zip(position, limits)]
    if any(c is None for c in coords):
        return None
    box = Box(*coords)
    return from_frame(box, frame) if box.x2 > box.x1 and box.y2 > box.y1 else None


def _literal(text: str):
    """ast.literal_eval that never raises (its documented failures only) and never warns."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None


def _item(chunk: str, need_confidence: bool, frame: Frame) -> Detection | None:
    """One `{'Position': [...], 'Confidence': c}` block; None when it is not exactly a valid item."""
    if len(chunk) > _MAX_ITEM_CHARS:
        return None
    value = _literal(chunk)
    if not isinstance(value, dict):
        return None
    keys = set(value)
    allowed = {"Position", "Confidence"}
    if "Position" not in keys or not keys <= allowed or (need_confidence and keys != allowed):
        return None
    box = _box(value["Position"], frame)
    confidence = _in_range(value.get("Confidence", 1.0), 0, 1)
    if box is None or confidence is None:
        return None
    return Detection(box, confidence)


def _answer_text(text: str) -> str | None:
    """The answer block; for a completion cut before `</answer>`, everything after the last `<answer>`."""
    answer = extract_answer(text)
    if answer is None and isinstance(text, str) and _OPEN_ANSWER in text:
        answer = text.rsplit(_OPEN_ANSWER, 1)[1].strip()
    return answer


def _detections(answer: str, need_confidence: bool, frame: Frame = RELATIVE) -> list[Detection] | None:
    """Valid items of an answer in order, exact duplicate boxes dropped (first kept); [] for 'No Objects' or `[]`."""
    bare = answer.strip().strip(".'\"").strip()
    if bare.lower() == NO_OBJECTS.lower() or re.fullmatch(r"\[\s*\]", bare):
        return []
    found: list[Detection] = []
    seen: set[Box] = set()
    for chunk in _DICT.findall(answer):
        item = _item(chunk, need_confidence, frame)
        if item is not None and item.box not in seen:
            seen.add(item.box)
            found.append(item)
    return found or None


def parse(text: str, frame: Frame = RELATIVE) -> list[Detection] | None:
    """The detections of a completion; [] for 'No Objects' (any case) or `[]`; None when nothing usable is there.

    Answer tags are required (an unclosed `<answer>` from a truncated completion counts). Single or double quotes.
    An item must have exactly the keys 'Position' and 'Confidence' (a missing Confidence makes the item invalid:
    a completion must commit to a confidence), four coordinates in [0, 1000] with x2 > x1 and y2 > y1, and a
    confidence in [0, 1]; other items are dropped, and an answer with no valid item is None. Never raises.
    `frame`: the coordinates the model was asked for (an absolute frame's boxes are mapped to 0-1000).
    >>> parse("<answer>[{'Position': [0, 0, 10, 10], 'Confidence': 0.9}, {'Posi")
    [Detection(box=Box(x1=0.0, y1=0.0, x2=10.0, y2=10.0), confidence=0.9)]
    """
    answer = _answer_text(text)
    return None if answer is None else _detections(answer, need_confidence=True, frame=frame)


def parse_solution(text: str) -> list[Box] | None:
    """The ground-truth boxes of a solution, tagged or a bare list; [] for 'No Objects'; None for a bad row.

    Confidence is optional here (the released solutions carry 1.0); the other rules are `parse`'s.
    """
    if not isinstance(text, str):
        return None
    answer = _answer_text(text)
    if answer is None:
        answer = text.strip()
    found = _detections(answer, need_confidence=False)
    return None if found is None else [d.box for d in found]


# ---------------------------------------------------------------------------------------------------------- metric


def match(predictions: list[Detection], truths: list[Box]) -> list[tuple[Detection, float | None]]:
    """Greedy matching: by confidence, highest first (ties keep answer order), each prediction takes the unmatched
    truth of highest IoU with it; the pair counts only when IoU > 0.5. Returns (prediction, IoU or None) per
    prediction, in the order they were considered."""
    free = list(range(len(truths)))
    out: list[tuple[Detection, float | None]] = []
    for det in sorted(predictions, key=lambda d: -d.confidence):
        best, best_iou = None, 0.0
        for j in free:
            value = iou(det.box, truths[j])
            if value > best_iou:
                best, best_iou = j, value
        if best is not None and best_iou > IOU_THRESHOLD:
            free.remove(best)
            out.append((det, best_iou))
        else:
            out.append((det, None))
    return out


def in_frame(solution_text: str, frame: Frame) -> str:
    """A dataset solution written in `frame` (the warm-up target of a family that answers in pixels)."""
    truths = parse_solution(solution_text)
    if frame == RELATIVE or truths is None:
        return solution_text
    return solution([tuple(into_frame(box, frame)) for box in truths])


def _parsed(completion: str, solution_text: str, frame: Frame):
    return parse(completion, frame), parse_solution(solution_text)


def iou_reward(completion: str, solution: str, frame: Frame = RELATIVE) -> float:
    """Sum of matched IoUs / max(#truths, #predictions), in [0, 1].

    Matching is `match`'s (greedy by confidence, IoU > 0.5). Empty truth: 1.0 for 'No Objects', else 0.0.
    Unparseable completion or solution, or 'No Objects' against a non-empty truth: 0.0.
    Worked example: truths A=[0,0,10,10], B=[20,0,30,10]; predictions [0,0,10,10] (conf 0.9) and [50,50,60,60]
    (conf 0.3). The first matches A with IoU 1, the second overlaps nothing: (1 + 0) / max(2, 2) = 0.5.
    """
    predictions, truths = _parsed(completion, solution, frame)
    if predictions is None or truths is None:
        return 0.0
    if not truths:
        return float(not predictions)
    if not predictions:
        return 0.0
    total = sum(value for _, value in match(predictions, truths) if value is not None)
    reward = total / max(len(truths), len(predictions))
    return reward if math.isfinite(reward) else 0.0


def confidence_reward(completion: str, solution: str, frame: Frame = RELATIVE) -> float:
    """Mean over predictions of (confidence if matched else 1 - confidence), in [0, 1].

    Matching is `iou_reward`'s. Empty truth: 1.0 for 'No Objects', and any predicted box is unmatched.
    Unparseable completion or solution, or 'No Objects' against a non-empty truth: 0.0.
    Worked example: truth [0,0,10,10]; predictions [0,0,10,10] (conf 0.9, matched) and [50,50,60,60] (conf 0.2,
    unmatched): (0.9 + (1 - 0.2)) / 2 = 0.85.
    """
    predictions, truths = _parsed(completion, solution, frame)
    if predictions is None or truths is None:
        return 0.0
    if not predictions:
        return float(not truths)
    pairs = match(predictions, truths)
    values = [det.confidence if value is not None else 1.0 - det.confidence for det, value in pairs]
    reward = sum(values) / len(values)
    return min(1.0, max(0.0, reward)) if math.isfinite(reward) else 0.0


def score(completion: str, solution: str, frame: Frame = RELATIVE) -> float:
    """The per-sample evaluation value: `iou_reward` (mAP is computed elsewhere from the parsed boxes)."""
    return iou_reward(completion, solution, frame)


def metrics(rows: list[Row], options: ScoreOptions) -> Scored:
    """Box mAP of the rows against the annotation file, over the evaluated classes (`coco.detection_metrics`)."""
    from qlora_rft.evaluation.coco import detection_metrics  # pycocotools is loaded only to score

    return detection_metrics(rows, options.annotations, options.classes, parse)


TASK = Task(
    name="detection",
    prompt=prompt,
    parse=parse,
    parse_solution=parse_solution,
    rewards={"iou": Reward(per_completion(iou_reward, "iou")),
             "confidence": Reward(per_completion(confidence_reward, "confidence"))},
    default_weights={"format": 1.0, "iou": 1.0, "confidence": 1.0},
    metrics=metrics,
    prediction_keys=("image_id", "category", "completion"),
    headline="mAP",
    thought=THOUGHT,
    in_frame=in_frame,
    has_boxes=True,
    needs_annotations=True,
    paper_max_new_tokens=1024,  # the original's evaluation scripts
)
