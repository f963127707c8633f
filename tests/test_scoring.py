"""Metrics from a predictions file alone: COCO / LVIS mAP against pycocotools itself, accuracy, mIoU, bad lines."""

from __future__ import annotations

import contextlib
import io
import json
import sys

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from qlora_rft.errors import ConfigError, DataError
from qlora_rft.evaluation.scoring import (
    Row,
    Skipped,
    read_predictions,
    score_file,
    write_metrics,
)
from qlora_rft.tasks import detection
from qlora_rft.tasks.classification import metrics as classification_metrics
from qlora_rft.tasks.boxes import to_scale

# Image sizes and boxes are chosen so that pixel -> 0-1000 -> pixel is exact: every coordinate times 1000 / size
# is an integer (x a multiple of 16 and y of 12 on 640x480, of 8 and 6 on 320x240, any integer on 200x100, even
# numbers on 500x500), so a perfect answer gives back exactly the ground-truth box.
IMAGES = {1: (640, 480), 2: (200, 100), 3: (320, 240), 4: (500, 500)}
CATEGORIES = {1: "cat", 2: "dog", 3: "fire hydrant", 4: "zebra"}  # zebra: no ground truth anywhere
TRUTH = [  # (image, category, [x, y, w, h] pixels)
    (1, 1, [64, 48, 160, 120]),
    (1, 1, [320, 240, 128, 96]),
    (1, 2, [0, 0, 96, 72]),
    (2, 2, [10, 20, 50, 40]),
    (2, 3, [120, 10, 40, 60]),
    (3, 1, [16, 12, 96, 72]),  # image 3 has no dog and no fire hydrant
    (4, 3, [100, 100, 200, 300]),
    (4, 2, [300, 50, 100, 100]),
]
ASKED = ("cat", "dog", "fire hydrant")


def coco_json(path, lvis: bool = False):
    images = []
    for image_id, (w, h) in IMAGES.items():
        image = {"id": image_id, "width": w, "height": h, "file_name": f"{image_id}.jpg"}
        if lvis:
            present = {c for i, c, _ in TRUTH if i == image_id}
            image["not_exhaustive_category_ids"] = []
            image["neg_category_ids"] = [c for c in CATEGORIES if c not in present]
        images.append(image)
    categories = [{"id": i, "name": n} for i, n in CATEGORIES.items()]
    if lvis:
        for cat, frequency in zip(categories, "rcfr"):
            cat["name"] = cat["name"].replace(" ", "_")  # LVIS names use underscores
            cat["frequency"] = frequency
    annotations = [
        {"id": k + 1, "image_id": i, "category_id": c, "bbox": box, "area": box[2] * box[3], "iscrowd": 0}
        for k, (i, c, box) in enumerate(TRUTH)
    ]
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def scaled(image_id, box):
    """A pixel [x, y, w, h] box as the 0-1000 integers an answer carries."""
    w, h = IMAGES[image_id]
    x, y, bw, bh = box
    return tuple(int(v) for v in to_scale((x, y, x + bw, y + bh), w, h))


def answer(items):
    """A completion with the given (0-1000 box, confidence) items; 'No Objects' when empty."""
    if not items:
        return f"<think>none</think><answer>{detection.NO_OBJECTS}</answer>"
    body = ", ".join(f"{{'Position': {list(box)}, 'Confidence': {conf}}}" for box, conf in items)
    return f"<think>found them</think><answer>[{body}]</answer>"


def perfect_line(image_id, category):
    cat_id = next(i for i, n in CATEGORIES.items() if n == category)
    boxes = [scaled(image_id, b) for i, c, b in TRUTH if i == image_id and c == cat_id]
    completion = "<think>look</think>" + detection.solution(boxes)  # confidence 1.0 for each box
    return {"image_id": image_id, "category": category, "completion": completion, "problem": "ignored"}


def write_lines(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


@pytest.fixture
def annotations(tmp_path):
    return coco_json(tmp_path / "instances.json")


def test_perfect_predictions_give_100(tmp_path, annotations):
    lines = [perfect_line(i, c) for i in IMAGES for c in ASKED]
    metrics = score_file("detection", write_lines(tmp_path / "p.jsonl", lines), annotations)
    assert metrics["mAP"] == 100.0
    assert metrics["per_class"] == {"cat": 100.0, "dog": 100.0, "fire hydrant": 100.0}
    assert metrics["coco_stats"][0] == 100.0 and len(metrics["coco_stats"]) == 12
    assert metrics["num_predictions"] == 12 and metrics["skipped"] == 0 and metrics["skipped_lines"] == []
    assert metrics["task"] == "detection" and metrics["annotation_format"] == "coco"


def test_partial_predictions_match_pycocotools(tmp_path, annotations):
    items = {  # (image, category) -> [(0-1000 box, confidence)]
        (1, "cat"): [(scaled(1, [64, 48, 160, 120]), 0.9)],  # the second cat is missed
        (1, "dog"): [
            (scaled(1, [16, 12, 96, 72]), 0.8),  # shifted: IoU 4800 / 9024 = 0.53 with the truth [0, 0, 96, 72]
            ((700, 700, 900, 900), 0.95),  # a confident false positive
        ],
        (2, "dog"): [(scaled(2, [10, 20, 50, 40]), 0.7)],
        (2, "fire hydrant"): [(scaled(2, [120, 10, 40, 60]), 0.6)],
        (3, "cat"): [(scaled(3, [16, 12, 96, 72]), 0.85)],
        (3, "dog"): [((100, 100, 400, 400), 0.99)],  # no dog in image 3
        (4, "fire hydrant"): [(scaled(4, [100, 100, 200, 300]), 0.5)],
        (4, "dog"): [],  # the dog of image 4 is missed
    }
    lines = [{"image_id": i, "category": c, "completion": answer(v)} for (i, c), v in items.items()]
    metrics = score_file("detection", write_lines(tmp_path / "p.jsonl", lines), annotations)

    # The reference: pycocotools run directly on the same detections in pixels.
    ids = {n: i for i, n in CATEGORIES.items()}
    dets = []
    for (image_id, name), found in items.items():
        w, h = IMAGES[image_id]
        for (x1, y1, x2, y2), conf in found:
            box = [x1 * w / 1000, y1 * h / 1000, (x2 - x1) * w / 1000, (y2 - y1) * h / 1000]
            dets.append({"image_id": image_id, "category_id": ids[name], "bbox": box, "score": conf})
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(annotations))
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        ev.params.catIds = [1, 2, 3]
        ev.params.imgIds = sorted(IMAGES)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    for k, name in enumerate(ASKED):
        precision = ev.eval["precision"][:, :, k, 0, -1]
        assert metrics["per_class"][name] == pytest.approx(100 * precision[precision > -1].mean(), abs=1e-4)
    # every evaluated class has ground truth, so COCO's AP is the mean of the per-class APs
    assert metrics["mAP"] == pytest.approx(100 * ev.stats[0], abs=1e-4)
    assert metrics["coco_stats"] == pytest.approx([round(100 * s, 4) if s > -1 else None for s in ev.stats])
    assert 10 < metrics["mAP"] < 90
    assert metrics["per_class"]["fire hydrant"] == 100.0 and metrics["per_class"]["cat"] < 100.0
    assert metrics["num_detections"] == len(dets) and metrics["num_predictions"] == len(lines)


def test_unasked_image_counts_its_truth_as_missed(tmp_path, annotations):
    lines = [perfect_line(i, c) for i in (1, 2, 3) for c in ASKED]  # image 4 never asked
    metrics = score_file("detection", write_lines(tmp_path / "p.jsonl", lines), annotations)
    assert metrics["per_class"]["cat"] == 100.0  # no cat in image 4
    assert metrics["per_class"]["dog"] < 100.0 and metrics["per_class"]["fire hydrant"] < 100.0
    assert metrics["mAP"] < 100.0


def test_classes_default_option_and_no_truth(tmp_path, annotations):
    lines = [perfect_line(i, c) for i in IMAGES for c in ("cat", "dog")]
    predictions = write_lines(tmp_path / "p.jsonl", lines)
    default = score_file("detection", predictions, annotations)
    assert list(default["per_class"]) == ["cat", "dog"] and default["mAP"] == 100.0

    chosen = score_file("detection", predictions, annotations, classes="cat,zebra")
    assert chosen["per_class"] == {"cat": 100.0, "zebra": None}  # zebra has no truth: no AP, not in the mean
    assert chosen["mAP"] == 100.0 and chosen["outside_classes"] == 4 and chosen["num_predictions"] == 4

    everything = score_file("detection", predictions, annotations, classes="all")
    assert everything["per_class"]["fire hydrant"] == 0.0 and everything["per_class"]["zebra"] is None
    assert everything["mAP"] == pytest.approx(200 / 3, abs=1e-4)

    with pytest.raises(ConfigError):
        score_file("detection", predictions, annotations, classes=["cat", "unicorn"])


def test_no_detections_at_all(tmp_path, annotations):
    lines = [{"image_id": i, "category": c, "completion": answer([])} for i in IMAGES for c in ASKED]
    lines.append({"image_id": 1, "category": "zebra", "completion": "nothing parseable"})
    metrics = score_file("detection", write_lines(tmp_path / "p.jsonl", lines), annotations)
    assert metrics["mAP"] == 0.0
    assert metrics["per_class"] == {"cat": 0.0, "dog": 0.0, "fire hydrant": 0.0, "zebra": None}
    assert metrics["num_detections"] == 0 and metrics["unparseable"] == 1 and metrics["num_predictions"] == 13
    json.dumps(metrics, allow_nan=False)


def test_bad_lines_are_counted_with_their_numbers(tmp_path, annotations):
    good = [perfect_line(1, "cat"), perfect_line(1, "dog"), {"image_id": 2, "category": "cat", "completion": "junk"}]
    lines = [
        good[0],  # 1
        "{not json",  # 2
        {"image_id": 1, "category": "dog"},  # 3: no completion
        {"image_id": 999, "category": "cat", "completion": answer([])},  # 4: unknown image
        {"image_id": 1, "category": "unicorn", "completion": answer([])},  # 5: unknown category
        "[1, 2, 3]",  # 6: not an object
        "",  # 7: blank, ignored but numbered
        good[1],  # 8
        good[2],  # 9: unparseable completion, used
        perfect_line(1, "cat"),  # 10: repeats line 1
        {"image_id": 3, "category": "dog", "completion": None},  # 11: completion not text
    ]
    metrics = score_file("detection", write_lines(tmp_path / "bad.jsonl", lines), annotations)
    assert [s["line"] for s in metrics["skipped_lines"]] == [2, 3, 4, 5, 6, 10, 11]
    assert metrics["skipped"] == 7
    reasons = {s["line"]: s["reason"] for s in metrics["skipped_lines"]}
    assert "JSON" in reasons[2] and "completion" in reasons[3] and "image_id" in reasons[4]
    assert "category" in reasons[5] and "object" in reasons[6] and "line 1" in reasons[10]
    assert metrics["num_predictions"] == 3 and metrics["unparseable"] == 1

    clean = score_file("detection", write_lines(tmp_path / "clean.jsonl", good), annotations)
    assert metrics["mAP"] == clean["mAP"] and metrics["per_class"] == clean["per_class"]
    assert 0 < clean["mAP"] < 100  # cat of image 3 never asked: missed


def test_skipped_lines_listed_up_to_100(tmp_path):
    lines = ["oops"] * 150 + [{"completion": "<answer>a</answer>", "solution": "<answer>a</answer>"}]
    metrics = score_file("classification", write_lines(tmp_path / "p.jsonl", lines))
    assert metrics["skipped"] == 150 and len(metrics["skipped_lines"]) == 100
    assert metrics["skipped_lines"][-1]["line"] == 100 and metrics["accuracy"] == 100.0


def test_read_predictions_line_numbers(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"completion": "a"}\n\n\xff\xfe\n{"completion": 3}\r\n{"completion": "b", "x": 1}\n')
    rows, skipped = read_predictions(path)
    assert [r.line for r in rows] == [1, 5] and rows[1].record["x"] == 1
    assert skipped == [Skipped(3, "not UTF-8 text"), Skipped(4, "'completion' is not text")]
    with pytest.raises(DataError):
        read_predictions(tmp_path / "missing.jsonl")


def test_classification_accuracy(tmp_path):
    ids = iter(range(100))

    def line(predicted, truth):
        return {"id": next(ids), "completion": f"<think>hm</think><answer>{predicted}</answer>", "solution": truth}

    lines = [
        line("rose", "<answer>rose</answer>"),
        line("Garden Phlox", "<answer>garden_phlox</answer>"),
        line("tulip", "<answer>rose</answer>"),
        line("daisy", "<answer>daisy</answer>"),
    ]
    metrics = score_file("classification", write_lines(tmp_path / "p.jsonl", lines))
    assert metrics["accuracy"] == 75.0 and metrics["num_predictions"] == 4 and metrics["skipped"] == 0

    lines = [
        line("rose", "<answer>rose</answer>"),
        {"completion": "no tags at all", "solution": "<answer>a</answer>"},
        {"completion": "<answer>a</answer>"},
        {"completion": "<answer>a</answer>", "solution": "<answer></answer>"},
    ]
    metrics = score_file("classification", write_lines(tmp_path / "q.jsonl", lines))
    assert metrics["accuracy"] == 50.0 and metrics["unparseable"] == 1  # unparseable: wrong, not skipped
    assert [s["line"] for s in metrics["skipped_lines"]] == [3, 4]  # no solution; a solution without a label


def test_classification_metrics_on_rows():
    rows = [Row(7, {"completion": "<answer>a</answer>", "solution": "a"})]  # a bare solution label is read
    assert classification_metrics(rows).metrics["accuracy"] == 100.0


def test_grounding_miou_and_accuracy(tmp_path):
    truth = "<answer>(0,0),(10,10)</answer>"
    lines = [
        {"id": 1, "completion": "<think>a</think><answer>(0,0),(10,10)</answer>", "solution": truth},  # IoU 1
        {"id": 2, "completion": "<think>b</think><answer>(0,0),(10,5)</answer>", "solution": truth},  # IoU 0.5
        {"id": 3, "completion": "<think>c</think><answer>(20,20),(30,30)</answer>", "solution": truth},  # IoU 0
    ]
    metrics = score_file("grounding", write_lines(tmp_path / "p.jsonl", lines))
    assert metrics["mIoU"] == 50.0 and metrics["acc@0.5"] == 66.6667 and metrics["num_predictions"] == 3

    lines.append({"id": 4, "completion": "<answer>somewhere</answer>", "solution": truth})  # unparseable: IoU 0
    metrics = score_file("grounding", write_lines(tmp_path / "q.jsonl", lines))
    assert metrics["mIoU"] == 37.5 and metrics["acc@0.5"] == 50.0 and metrics["unparseable"] == 1


def test_lvis_perfect_and_empty(tmp_path):
    pytest.importorskip("lvis")
    annotations = coco_json(tmp_path / "lvis.json", lvis=True)
    had_float = hasattr(np, "float")
    lines = [perfect_line(i, c) for i in IMAGES for c in ASKED]
    for line in lines:
        line["category"] = line["category"].replace(" ", "_")
    metrics = score_file("detection", write_lines(tmp_path / "p.jsonl", lines), annotations)
    assert metrics["annotation_format"] == "lvis"
    assert metrics["mAP"] == 100.0
    assert metrics["per_class"] == {"cat": 100.0, "dog": 100.0, "fire_hydrant": 100.0}
    assert metrics["lvis_results"]["AP"] == 100.0 and metrics["lvis_results"]["APr"] == 100.0
    assert hasattr(np, "float") == had_float  # the compatibility alias does not outlive the call

    lines[0]["completion"] = answer([((0, 0, 500, 500), 0.9)])  # image 1 cat: one wrong box instead of two right
    partial = score_file("detection", write_lines(tmp_path / "q.jsonl", lines), annotations, classes="cat,zebra")
    assert 0 < partial["per_class"]["cat"] < 100 and partial["per_class"]["zebra"] is None
    assert partial["mAP"] == partial["per_class"]["cat"]

    empty = [{"image_id": i, "category": "dog", "completion": answer([])} for i in IMAGES]
    metrics = score_file("detection", write_lines(tmp_path / "e.jsonl", empty), annotations, classes="dog,zebra")
    assert metrics["mAP"] == 0.0 and metrics["per_class"] == {"dog": 0.0, "zebra": None}


def test_lvis_missing_package_is_a_data_error(tmp_path, monkeypatch):
    annotations = coco_json(tmp_path / "lvis.json", lvis=True)
    monkeypatch.setitem(sys.modules, "lvis", None)  # import lvis now fails
    lines = [perfect_line(1, "cat") | {"category": "cat"}]
    with pytest.raises(DataError, match="pip install lvis"):
        score_file("detection", write_lines(tmp_path / "p.jsonl", lines), annotations)


def test_usage_errors(tmp_path, annotations):
    predictions = write_lines(tmp_path / "p.jsonl", [perfect_line(1, "cat")])
    with pytest.raises(ConfigError):
        score_file("detection", predictions)  # no annotations
    with pytest.raises(ConfigError):
        score_file("segmentation", predictions)
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": []}')
    with pytest.raises(DataError):
        score_file("detection", predictions, broken)


def test_annotation_defaults_filled(tmp_path):
    data = json.loads(coco_json(tmp_path / "a.json").read_text())
    for ann in data["annotations"]:
        del ann["area"], ann["iscrowd"], ann["id"]
    sparse = tmp_path / "sparse.json"
    sparse.write_text(json.dumps(data))
    lines = [perfect_line(i, c) for i in IMAGES for c in ASKED]
    assert score_file("detection", write_lines(tmp_path / "p.jsonl", lines), sparse)["mAP"] == 100.0


def test_write_metrics_writes_valid_json(tmp_path):
    metrics = {"task": "grounding", "num_predictions": 3, "skipped": 0, "mIoU": 50.0, "per_class": {"a": None}}
    out = write_metrics(metrics, tmp_path / "deep" / "metrics.json")
    assert json.loads(out.read_text()) == metrics
    with pytest.raises(ValueError):
        write_metrics({"mAP": float("nan")}, tmp_path / "nan.json")
    assert not (tmp_path / "nan.json").exists() and not list(tmp_path.glob(".nan.json.*"))


def test_repeated_ids_count_once_in_every_task(tmp_path):
    lines = [
        {"id": 1, "completion": "<answer>rose</answer>", "solution": "<answer>rose</answer>"},
        {"id": 2, "completion": "<answer>tulip</answer>", "solution": "<answer>rose</answer>"},
        {"id": 1, "completion": "<answer>daisy</answer>", "solution": "<answer>rose</answer>"},  # repeat, other answer
        {"id": 1, "completion": "<answer>rose</answer>", "solution": "<answer>rose</answer>"},  # repeat, same answer
        {"completion": "<answer>rose</answer>", "solution": "<answer>rose</answer>"},  # no id: always used
    ]
    metrics = score_file("classification", write_lines(tmp_path / "c.jsonl", lines))
    assert metrics["num_predictions"] == 3 and metrics["accuracy"] == 66.6667  # lines 1, 2, 5: right, wrong, right
    assert metrics["skipped"] == 2
    assert metrics["skipped_lines"] == [{"line": 3, "reason": "repeats id 1 of line 1"},
                                        {"line": 4, "reason": "repeats id 1 of line 1"}]

    truth = "<answer>(0,0),(10,10)</answer>"
    lines = [
        {"id": "a", "completion": "<answer>(0,0),(10,10)</answer>", "solution": truth},  # IoU 1
        {"id": "a", "completion": "<answer>(20,20),(30,30)</answer>", "solution": truth},  # repeat: left out
        {"id": "b", "completion": "<answer>(0,0),(10,5)</answer>", "solution": truth},  # IoU 0.5
    ]
    metrics = score_file("grounding", write_lines(tmp_path / "g.jsonl", lines))
    assert metrics["mIoU"] == 75.0 and metrics["acc@0.5"] == 100.0 and metrics["num_predictions"] == 2
    assert metrics["skipped_lines"] == [{"line": 2, "reason": "repeats id 'a' of line 1"}]


def test_a_file_with_no_usable_line_is_refused(tmp_path, annotations):
    lines = ["oops", {"completion": "<answer>a</answer>"}, "", "[1]", {"completion": 1, "solution": "a"}]
    with pytest.raises(DataError, match=r"has no usable line: 4 skipped \(line 1: not valid JSON \(Expecting value\); "
                       r"line 2: missing key 'solution'; line 4: not a JSON object \(a list\); \.\.\.\)"):
        score_file("classification", write_lines(tmp_path / "p.jsonl", lines))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="has no usable line: it holds no line"):
        score_file("grounding", tmp_path / "empty.jsonl")
    outside = [perfect_line(1, "dog")]
    with pytest.raises(DataError, match="has no usable line: 1 outside the evaluated classes"):
        score_file("detection", write_lines(tmp_path / "d.jsonl", outside), annotations, classes="cat")


def test_write_metrics_into_a_folder_writes_metrics_json(tmp_path):
    assert write_metrics({"task": "grounding"}, tmp_path) == tmp_path / "metrics.json"
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"task": "grounding"}


def test_annotation_of_an_unknown_category_is_refused(tmp_path):
    data = json.loads(coco_json(tmp_path / "a.json").read_text())
    data["annotations"][2]["category_id"] = 99
    path = tmp_path / "unknown.json"
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match="annotation 2 has category_id 99, which no category has"):
        score_file("detection", write_lines(tmp_path / "p.jsonl", [perfect_line(1, "cat")]), path)
