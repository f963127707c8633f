"""Box mAP for detection with pycocotools, or the LVIS API for LVIS-format files: the annotation files checked for
what box evaluation needs (`load_annotations`), and the predictions' boxes scored against them (`detection_metrics`,
given the detection task's parser, so this module needs no task).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import re
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from qlora_rft.errors import DataError
from qlora_rft.evaluation.class_sets import resolve_classes
from qlora_rft.evaluation.rows import Row, Scored, Skipped, mean, percent, repeat_of, row_frame
from qlora_rft.tasks.boxes import Box, to_pixels

Parse = Callable  # (completion, frame) -> list of detections (box, confidence) | None

_ANNOTATION_LISTS = ("images", "annotations", "categories")


# ---------------------------------------------------------------------------------------------------------- annotations


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def load_annotations(path: str | Path) -> dict:
    """A COCO- or LVIS-format annotation JSON, checked for what box evaluation needs.

    Filled in when absent: an annotation's `area` (its box's w*h), `iscrowd` (0) and `id`; for an LVIS file an
    image's `neg_category_ids` / `not_exhaustive_category_ids` ([]: nothing known, so false positives of absent
    categories are not penalised there). Anything else missing or malformed raises DataError, and so does an id
    that two images, two annotations or two categories share (the evaluators index by id: a shared one silently
    drops ground truth and turns a class's AP into none).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"annotation file {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DataError(f"cannot read annotation file {path} as JSON: {e}") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in _ANNOTATION_LISTS):
        raise DataError(f"{path} is not a COCO/LVIS annotation file: it needs the lists {', '.join(_ANNOTATION_LISTS)}")

    def fail(what: str) -> DataError:
        return DataError(f"annotation file {path}: {what}")

    names: set[str] = set()
    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or "id" not in cat or not isinstance(cat.get("name"), str):
            raise fail(f"category {i} needs an 'id' and a text 'name'")
        if cat["name"] in names:
            raise fail(f"category name {cat['name']!r} appears twice")
        names.add(cat["name"])
    for i, image in enumerate(data["images"]):
        if not isinstance(image, dict) or "id" not in image:
            raise fail(f"image {i} has no 'id'")
        if not all(_number(image.get(k)) and image[k] > 0 for k in ("width", "height")):
            raise fail(f"image {image['id']!r} needs a positive 'width' and 'height' (boxes are converted with them)")
    _unique_ids(data["images"], "image", fail)
    _unique_ids(data["categories"], "category", fail)
    category_ids = {cat["id"] for cat in data["categories"]}
    image_ids = {image["id"] for image in data["images"]}
    next_id = 1 + max((a["id"] for a in data["annotations"] if isinstance(a, dict) and _number(a.get("id"))), default=0)
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or "image_id" not in ann or "category_id" not in ann:
            raise fail(f"annotation {i} needs 'image_id' and 'category_id'")
        if ann["category_id"] not in category_ids:
            raise fail(f"annotation {i} has category_id {ann['category_id']!r}, which no category has")
        if not isinstance(ann["image_id"], (int, str)) or ann["image_id"] not in image_ids:
            raise fail(f"annotation {i} has image_id {ann['image_id']!r}, which no image has (its box would never "
                       "be counted)")
        bbox = ann.get("bbox")
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(_number(v) for v in bbox):
            raise fail(f"annotation {i} needs a 'bbox' of 4 numbers [x, y, w, h]")
        if bbox[2] < 0 or bbox[3] < 0:
            raise fail(f"annotation {i} has a 'bbox' of negative width or height ({bbox[2]}, {bbox[3]})")
        ann.setdefault("area", float(bbox[2]) * float(bbox[3]))
        ann.setdefault("iscrowd", 0)
        if "id" not in ann:
            ann["id"] = next_id
            next_id += 1
    _unique_ids(data["annotations"], "annotation", fail)
    if is_lvis(data):
        for cat in data["categories"]:
            if cat.get("frequency") not in ("r", "c", "f"):
                raise fail(f"LVIS category {cat['name']!r} needs a 'frequency' of 'r', 'c' or 'f'")
        for image in data["images"]:
            image.setdefault("neg_category_ids", [])
            image.setdefault("not_exhaustive_category_ids", [])
    return data


def _unique_ids(records: list[dict], what: str, fail) -> None:
    """Refuse ids that are not integers or text, or that two records share, naming the first few of them."""
    seen, shared = set(), []
    for record in records:
        key = record["id"]
        if not isinstance(key, (int, str)) or isinstance(key, bool):
            raise fail(f"{what} id {key!r} is not an integer or a text")
        if key in seen and key not in shared:
            shared.append(key)
        seen.add(key)
    if shared:
        shown = ", ".join(repr(key) for key in shared[:5]) + (f" and {len(shared) - 5} more" if len(shared) > 5 else "")
        raise fail(f"{what} ids {shown} appear more than once: each {what} needs an id of its own (the evaluators "
                   "would drop all but one)")


def is_lvis(data: dict) -> bool:
    """LVIS format: categories carry a 'frequency', or images carry the federated negative / non-exhaustive lists."""
    return any(isinstance(c, dict) and "frequency" in c for c in data.get("categories", [])) or any(
        isinstance(i, dict) and ("not_exhaustive_category_ids" in i or "neg_category_ids" in i)
        for i in data.get("images", [])
    )


def _name_key(name: str) -> str:
    """Category names compare ignoring case, underscores and repeated spaces ('Kitchen table' is 'kitchen_table')."""
    return re.sub(r"[\s_]+", " ", name).strip().lower()


def _find_image(images: dict, value):
    """The annotation image for a prediction's image_id (an int, an integral float, or a string of digits)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    if value in images:
        return images[value]
    if isinstance(value, str) and value.strip().isdigit():
        return images.get(int(value.strip()))
    return None


def coco_bbox(box: Box, width: float, height: float) -> list[float]:
    """A 0-1000 box as COCO's pixel [x, y, w, h] for a width x height image.

    >>> coco_bbox(Box(100, 250, 500, 1000), 640, 480)
    [64.0, 120.0, 256.0, 360.0]
    """
    px = to_pixels(box, width, height)
    return [px.x1, px.y1, px.x2 - px.x1, px.y2 - px.y1]


# ---------------------------------------------------------------------------------------------------------- detection


def detection_metrics(rows: list[Row], annotations: str | Path, classes: str | list | None, parse: Parse) -> Scored:
    """Box mAP of the predictions against a COCO- or LVIS-format annotation file.

    Each row is one (image, category) question; its completion goes through `parse` (the detection task's: unparseable or
    'No Objects': no boxes from that row, the row still counts), each box is converted to pixels with that image's
    size, and its confidence is the score. Skipped: an image_id or category the annotations do not have, and a
    repeat of an (image, category) already answered (only the first answer counts).

    Evaluated classes: `resolve_classes(classes, names)`, or, when `classes` is None, the categories asked in the
    file. Rows of other categories are left out (`outside_classes`). Every image of the annotation file is
    evaluated, asked or not: the ground truth of an image never asked counts as missed. This is the honest protocol
    (a predictions file cannot raise its mAP by leaving hard images out).

    Per-class AP is AP@[.5:.95] over all areas at the largest max-detections setting, from the accumulated
    precision (entries of -1 left out); a class without ground truth in the set has no AP (None) and stays out of
    `mAP`, the mean of the per-class APs (the paper's number). All in percent.
    """
    data = load_annotations(annotations)
    images = {image["id"]: image for image in data["images"]}
    names = [cat["name"] for cat in data["categories"]]
    cat_id = {cat["name"]: cat["id"] for cat in data["categories"]}
    asked, skipped = _asked(rows, images, names)
    if classes is None:
        present = {name for _, _, name in asked}
        evaluated = [name for name in names if name in present]
    else:
        evaluated = resolve_classes(classes, names)
    chosen = set(evaluated)

    found: list[dict] = []
    used = outside = unparseable = 0
    for row, image, name in asked:
        if name not in chosen:
            outside += 1
            continue
        used += 1
        parsed = parse(row.record["completion"], row_frame(row))
        if parsed is None:
            unparseable += 1
            continue
        found += [{"image_id": image["id"], "category_id": cat_id[name],
                   "bbox": coco_bbox(det.box, image["width"], image["height"]), "score": float(det.confidence)}
                  for det in parsed]

    lvis = is_lvis(data)
    metrics: dict = {
        "num_predictions": used,
        "annotation_format": "lvis" if lvis else "coco",
        "classes": evaluated,
        "num_images": len(images),
        "num_detections": len(found),
        "unparseable": unparseable,
        "outside_classes": outside,
    }
    ids = [cat_id[name] for name in evaluated]
    if not ids:
        aps: dict = {}
        extra = {"lvis_results": None} if lvis else {"coco_stats": None}
    elif lvis:
        aps, extra = _lvis_eval(data, found, ids)
    else:
        aps, extra = _coco_eval(data, found, ids)
    per_class = {name: aps.get(cat_id[name]) for name in evaluated}
    metrics["mAP"] = percent(mean([ap for ap in per_class.values() if ap is not None]))
    metrics["per_class"] = {name: percent(ap) for name, ap in per_class.items()}
    metrics.update(extra)
    return Scored(metrics, skipped)


class Asked(NamedTuple):
    """A predictions row matched to its annotation image and category name."""

    row: Row
    image: dict
    name: str


def _asked(rows: list[Row], images: dict, names: list[str]) -> tuple[list[Asked], list[Skipped]]:
    """Each row with its image and category name (a name matched exactly, else by its normalised key when that
    key is not shared by two names), and the rows skipped: an unknown image or category, or a repeat of an
    (image, category) already answered (the first answer counts)."""
    by_key: dict[str, str | None] = {}
    for name in names:  # a normalised key shared by two names is ambiguous: only exact names find those
        by_key[_name_key(name)] = None if _name_key(name) in by_key else name
    known = set(names)
    skipped: list[Skipped] = []
    asked: list[Asked] = []
    first_line: dict[tuple, int] = {}
    for row in rows:
        image = _find_image(images, row.record["image_id"])
        category = row.record["category"]
        name = category if category in known else by_key.get(_name_key(category))
        if image is None:
            skipped.append(Skipped(row.line, f"unknown image_id {row.record['image_id']!r:.40}"))
            continue
        if name is None:
            skipped.append(Skipped(row.line, f"unknown category {category!r:.60}"))
            continue
        first = repeat_of(first_line, (image["id"], name), row.line)
        if first is not None:
            skipped.append(Skipped(row.line, f"repeats image {image['id']!r} / {name!r} of line {first}"))
            continue
        asked.append(Asked(row, image, name))
    return asked, skipped


def _class_ap(precision: np.ndarray, index: int) -> float | None:
    """Mean of one class's precision slice over its valid entries (> -1); None when the class has none."""
    values = precision[..., index]
    values = values[values > -1]
    return float(values.mean()) if values.size else None


def _coco_eval(data: dict, found: list[dict], cat_ids: list) -> tuple[dict, dict]:
    """Per-class AP (fractions) and `coco_stats` (COCOeval.stats, percent) over every image of the file."""
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        truth = COCO()
        truth.dataset = data
        truth.createIndex()
        if found:
            results = truth.loadRes([dict(d) for d in found])
        else:  # loadRes cannot take an empty list: an empty result set, built the way loadRes builds one
            results = COCO()
            results.dataset = {"images": list(data["images"]), "categories": data["categories"], "annotations": []}
            results.createIndex()
        evaluator = COCOeval(truth, results, "bbox")
        evaluator.params.catIds = list(cat_ids)
        evaluator.params.imgIds = sorted(image["id"] for image in data["images"])
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    params = evaluator.params
    # precision: [iou thresholds, recall thresholds, categories, areas, max detections]
    precision = evaluator.eval["precision"][:, :, :, params.areaRngLbl.index("all"), -1]
    order = list(params.catIds)  # evaluate() sorted them
    aps = {c: _class_ap(precision, order.index(c)) for c in cat_ids}
    return aps, {"coco_stats": [percent(v) for v in evaluator.stats]}


@contextlib.contextmanager
def _lvis_compatible():
    """lvis 0.5.3 uses `np.float` (gone since NumPy 1.24) and warns through logging on every results list: alias
    it and quieten the `lvis` loggers for the duration of the call only, restoring both afterwards."""
    logger = logging.getLogger("lvis")
    level = logger.level
    added = not hasattr(np, "float")
    if added:
        np.float = float
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
        if added:
            del np.float


def _lvis_eval(data: dict, found: list[dict], cat_ids: list) -> tuple[dict, dict]:
    """Per-class AP (fractions) and `lvis_results` (LVISEval.results, percent) with the federated LVIS protocol."""
    try:
        from lvis import LVIS, LVISEval, LVISResults
    except ImportError:
        raise DataError(
            "the annotation file is in LVIS format, whose evaluation needs the `lvis` package: "
            "pip install lvis (or install this project with its `lvis` extra)"
        ) from None

    if not found:
        # LVISResults cannot take an empty list. With no detections every evaluated class with ground truth has
        # AP 0 and the others none, exactly what LVISEval would give; its summary needs a results set, so none.
        with_truth = {ann["category_id"] for ann in data["annotations"]}
        return {c: (0.0 if c in with_truth else None) for c in cat_ids}, {"lvis_results": None}

    class _InMemory(LVIS):  # LVIS only reads a path: hand it the file already loaded and checked
        def _load_json(self, _path):
            return data

    with _lvis_compatible():
        truth = _InMemory("<loaded>")
        results = LVISResults(truth, [dict(d) for d in found])
        evaluator = LVISEval(truth, results, "bbox")
        evaluator.params.cat_ids = sorted(cat_ids)
        evaluator.run()
    params = evaluator.params
    # precision: [iou thresholds, recall thresholds, categories, areas]
    precision = evaluator.eval["precision"][:, :, :, params.area_rng_lbl.index("all")]
    order = list(params.cat_ids)
    aps = {c: _class_ap(precision, order.index(c)) for c in cat_ids}
    return aps, {"lvis_results": {key: percent(value) for key, value in evaluator.results.items()}}
