"""Grounding (LISA): IoU/GIoU worked by hand, the box parser's rules, totality, and the LISA JSON loader."""

from __future__ import annotations

import json
import math
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from qlora_rft.data import load_split
from qlora_rft.errors import DataError
from qlora_rft.tasks import get_task, grounding
from qlora_rft.tasks.common import FORMAT_INSTRUCTION
from qlora_rft.tasks.grounding import Box, giou, grounding_reward, iou, parse, parse_solution, score


def tagged(body: str) -> str:
    return f"<think>the knife cuts bread</think><answer>{body}</answer>"


# ----------------------------------------------------------------------------- overlap by hand


def test_identical_boxes_give_iou_1_giou_1_reward_2():
    a = Box(0, 0, 10, 10)
    assert iou(a, a) == 1.0
    assert giou(a, a) == 1.0
    assert grounding_reward(tagged("(100,200),(300,400)"), "<answer>(100,200),(300,400)</answer>") == 2.0
    assert score(tagged("(100,200),(300,400)"), "<answer>(100,200),(300,400)</answer>") == 1.0


def test_disjoint_boxes_by_hand():
    # [0,0,10,10] and [20,0,30,10]: no intersection, union 200, enclosing box [0,0,30,10] has area 300.
    a, b = Box(0, 0, 10, 10), Box(20, 0, 30, 10)
    assert iou(a, b) == 0.0
    assert giou(a, b) == pytest.approx(0 - (300 - 200) / 300)  # -1/3
    assert grounding_reward(tagged("(0,0),(10,10)"), "<answer>(20,0),(30,10)</answer>") == pytest.approx(2 / 3)
    assert score(tagged("(0,0),(10,10)"), "<answer>(20,0),(30,10)</answer>") == 0.0


def test_half_overlap_by_hand():
    # [0,0,10,10] and [5,0,15,10]: intersection 5x10 = 50, union 100+100-50 = 150, enclosing 15x10 = 150.
    a, b = Box(0, 0, 10, 10), Box(5, 0, 15, 10)
    assert iou(a, b) == pytest.approx(50 / 150)
    assert giou(a, b) == pytest.approx(50 / 150)  # the boxes fill their enclosing box: no GIoU penalty
    assert grounding_reward(tagged("(0,0),(10,10)"), "<answer>(5,0),(15,10)</answer>") == pytest.approx(4 / 3)


def test_diagonal_overlap_by_hand():
    # [0,0,10,10] and [5,5,15,15]: intersection 25, union 175, enclosing 15x15 = 225.
    # GIoU = 25/175 - (225-175)/225 = 1/7 - 2/9 = -5/63.
    a, b = Box(0, 0, 10, 10), Box(5, 5, 15, 15)
    assert iou(a, b) == pytest.approx(1 / 7)
    assert giou(a, b) == pytest.approx(-5 / 63)
    assert grounding_reward(tagged("(0,0),(10,10)"), "(5,5),(15,15)") == pytest.approx(1 - 5 / 63)
    assert score(tagged("(0,0),(10,10)"), "(5,5),(15,15)") == pytest.approx(1 / 7)


def test_overlap_is_symmetric_and_contained_box():
    outer, inner = Box(0, 0, 100, 100), Box(25, 25, 75, 75)  # inner area 2500, outer 10000
    assert iou(outer, inner) == iou(inner, outer) == pytest.approx(0.25)
    assert giou(outer, inner) == pytest.approx(0.25)  # enclosing box = outer = union


# ----------------------------------------------------------------------------- parsing


def test_parse_forms():
    want = Box(10.0, 20.0, 30.0, 40.0)
    assert parse(tagged("(10,20),(30,40)")) == want
    assert parse(tagged(" ( 10 , 20 ) , ( 30 , 40 ) ")) == want
    assert parse(tagged("(10,20) (30,40)")) == want
    assert parse(tagged("[10, 20, 30, 40]")) == want
    assert parse(tagged("[10,20],[30,40]")) == want
    assert parse(tagged("The box is (10,20),(30,40).")) == want
    assert parse(tagged("(10.5,20.25),(30.0,40.75)")) == Box(10.5, 20.25, 30.0, 40.75)
    assert parse("<answer>\n(10,20),\n(30,40)\n</answer>") == want


def test_completions_need_answer_tags_solutions_do_not():
    assert parse("(10,20),(30,40)") is None
    assert parse("<think>(10,20),(30,40)</think>") is None
    assert parse_solution("(10,20),(30,40)") == Box(10, 20, 30, 40)
    assert parse_solution("[10, 20, 30, 40]") == Box(10, 20, 30, 40)
    assert parse_solution("<answer>(10,20),(30,40)</answer>") == Box(10, 20, 30, 40)
    assert parse_solution("<answer>(10,20),(30,40)") is None  # an opened answer tag must be closed


def test_two_boxes_use_the_first_pair_never_a_mix():
    # A parser that takes the first corner of box 1 and the second corner of box 2 would read (0,0),(600,600),
    # whose IoU with the truth (0,0),(10,10) is 100/360000; the right reading matches the truth exactly.
    text = tagged("(0,0),(10,10) and (500,500),(600,600)")
    assert parse(text) == Box(0, 0, 10, 10)
    assert grounding_reward(text, "<answer>(0,0),(10,10)</answer>") == 2.0
    # against the mixed box the first box is contained: GIoU = IoU = 100/360000, reward barely above 1
    assert grounding_reward(text, "<answer>(0,0),(600,600)</answer>") == pytest.approx(1 + 100 / 360000)
    # a lone corner before the first complete pair is not half of a box
    assert parse(tagged("near (1,2) the box is (10,20),(30,40)")) == Box(10, 20, 30, 40)
    # the first complete pair decides: if it is invalid, a later valid one is not fished for
    assert parse(tagged("(30,40),(10,20) (10,20),(30,40)")) is None


def test_the_last_answer_block_counts():
    assert parse("<answer>(0,0),(5,5)</answer> <answer>(10,20),(30,40)</answer>") == Box(10, 20, 30, 40)


@pytest.mark.parametrize(
    "body",
    [
        "(30,20),(10,40)",  # x2 < x1
        "(10,40),(30,20)",  # y2 < y1
        "(10,20),(10,40)",  # zero width
        "(nan,20),(30,40)",
        "(NaN,NaN),(NaN,NaN)",
        "(inf,20),(30,40)",
        "(10,20),(30,1e309)",  # overflows to inf
        "(10,20),(30,5000)",  # off the 0-1000 scale
        "(-10,20),(30,40)",  # negative
        "(10,20),(30)",  # incomplete
        "[10, 20, 30]",
        "",  # empty answer
        "   ",
        "ナイフ (十,二十),(三十,四十)",  # non-ASCII, no digits
        "(１０,２０),(３０,４０)",  # full-width digits are not read as numbers
        "(10,20),(30,40" + "0" * 400 + ")",  # huge number
    ],
)
def test_bad_answers_score_zero(body):
    completion = tagged(body)
    assert parse(completion) is None
    for value in (grounding_reward(completion, "<answer>(10,20),(30,40)</answer>"),
                  score(completion, "<answer>(10,20),(30,40)</answer>")):
        assert value == 0.0 and math.isfinite(value)


def test_missing_tags_and_bad_solutions_score_zero():
    good = "<answer>(10,20),(30,40)</answer>"
    assert grounding_reward("(10,20),(30,40)", good) == 0.0  # no answer tags in the completion
    assert grounding_reward(tagged("(10,20),(30,40)"), "no box here") == 0.0
    assert grounding_reward(tagged("(10,20),(30,40)"), "<answer></answer>") == 0.0
    assert score(tagged("(10,20),(30,40)"), "(30,40),(10,20)") == 0.0


def test_parsers_never_raise_on_odd_input():
    for text in (None, 123, b"(1,2),(3,4)", "\x00" * 50, "é" * 10_000, "<answer><answer>(1,2),(3,4)</answer>",
                 "<answer>" * 3000, "(" * 5000 + "1,2", "[" + "1," * 5000 + "]"):
        assert parse(text) is None or isinstance(parse(text), Box)
        assert parse_solution(text) is None or isinstance(parse_solution(text), Box)
        value = grounding_reward(text, "<answer>(1,2),(3,4)</answer>")
        assert math.isfinite(value) and 0.0 <= value <= 2.0
    # nested tags: the inner block's box is still read
    assert parse("<answer><answer>(1,2),(3,4)</answer></answer>") == Box(1, 2, 3, 4)


def test_long_adversarial_text_is_fast():
    text = "<answer>" + "(1" + "1" * 10_000 + ",(2.5e," * 500 + "[1, 2, 3," * 500 + "</answer>"
    start = time.perf_counter()
    assert parse(text) is None
    assert time.perf_counter() - start < 1.0


@settings(max_examples=300, deadline=None)
@given(st.text(), st.text(alphabet="0123456789.,()[] -eE+naif", max_size=60))
def test_reward_is_total_and_in_range(text, boxlike):
    solutions = ["<answer>(100,100),(500,500)</answer>", text, f"<answer>{boxlike}</answer>"]
    completions = [text, tagged(text), tagged(boxlike), f"<answer>{boxlike}</answer>"]
    for sol in solutions:
        for c in completions:
            reward, metric = grounding_reward(c, sol), score(c, sol)
            assert isinstance(reward, float) and math.isfinite(reward) and 0.0 <= reward <= 2.0
            assert isinstance(metric, float) and math.isfinite(metric) and 0.0 <= metric <= 1.0


coordinate = st.integers(min_value=0, max_value=1000)


@st.composite
def boxes(draw):
    x1, x2 = sorted(draw(st.lists(coordinate, min_size=2, max_size=2, unique=True)))
    y1, y2 = sorted(draw(st.lists(coordinate, min_size=2, max_size=2, unique=True)))
    return Box(x1, y1, x2, y2)


@settings(max_examples=300, deadline=None)
@given(boxes(), boxes())
def test_overlap_properties_on_valid_boxes(a, b):
    assert parse(grounding.solution(a)) == a  # solution() and parse() round-trip integer boxes
    assert 0.0 <= iou(a, b) <= 1.0
    assert -1.0 <= giou(a, b) <= iou(a, b) + 1e-12
    assert iou(a, b) == pytest.approx(iou(b, a)) and giou(a, b) == pytest.approx(giou(b, a))
    reward = grounding_reward(tagged(grounding.solution(a)[8:-9]), grounding.solution(b))
    assert reward == pytest.approx(giou(a, b) + 1.0)
    assert grounding_reward(grounding.solution(a), grounding.solution(a)) == 2.0


# ----------------------------------------------------------------------------- text


def test_problem_prompt_and_solution_text():
    text = grounding.problem("  What would you use to cut the bread? ")
    assert text.startswith("What would you use to cut the bread? ")
    assert "(x1,y1),(x2,y2)" in text and "0 to 1000" in text and "top-left" in text and "bottom-right" in text
    assert grounding.prompt(text) == f"{text} {FORMAT_INSTRUCTION}"
    already = "Box it. Answer in <answer> </answer> tags."
    assert grounding.prompt(already) == already
    assert grounding.solution([10.4, 20, 30.6, 40]) == "<answer>(10,20),(31,40)</answer>"
    assert grounding.THOUGHT and "<" not in grounding.THOUGHT


# ----------------------------------------------------------------------------- LISA JSON


def write_image(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6), (200, 30, 30)).save(path)


def test_load_lisa_json_both_forms(tmp_path):
    write_image(tmp_path / "imgs" / "a.png")
    write_image(tmp_path / "other" / "b.png")
    canonical = {"image": "imgs/a.png", "problem": "Box the knife.", "solution": "<answer>(1,2),(30,40)</answer>"}
    boxed = {"image": str(tmp_path / "other" / "b.png"), "text": "What cuts bread?", "box": [100, 200, 300.6, 400]}
    by_instruction = {"image": "imgs/a.png", "instruction": "What holds soup?", "box": [0, 0, 1000, 1000]}
    (tmp_path / "lisa.json").write_text(json.dumps([canonical, boxed, by_instruction]))

    rows = grounding.load_lisa_json(tmp_path / "lisa.json")
    assert [r["image"] for r in rows] == [
        {"bytes": None, "path": str(tmp_path / "imgs" / "a.png")},
        {"bytes": None, "path": str(tmp_path / "other" / "b.png")},
        {"bytes": None, "path": str(tmp_path / "imgs" / "a.png")},
    ]
    assert rows[0]["problem"] == "Box the knife." and rows[0]["solution"] == canonical["solution"]
    assert rows[1]["problem"] == grounding.problem("What cuts bread?")
    assert rows[1]["solution"] == "<answer>(100,200),(301,400)</answer>"
    assert rows[2]["problem"] == grounding.problem("What holds soup?")
    assert parse_solution(rows[2]["solution"]) == Box(0, 0, 1000, 1000)
    for row in rows:
        with Image.open(row["image"]["path"]) as image:
            assert image.size == (8, 6)


def test_load_lisa_json_image_root(tmp_path):
    write_image(tmp_path / "images" / "a.png")
    (tmp_path / "ann").mkdir()
    (tmp_path / "ann" / "val.json").write_text(json.dumps([{"image": "a.png", "text": "x", "box": [1, 2, 3, 4]}]))
    (row,) = grounding.load_lisa_json(str(tmp_path / "ann" / "val.json"), image_root=tmp_path / "images")
    assert row["image"]["path"] == str(tmp_path / "images" / "a.png")


def test_load_lisa_json_errors(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(DataError, match="nope.json"):
        grounding.load_lisa_json(missing)

    def load(records):
        path = tmp_path / "bad.json"
        path.write_text(json.dumps(records))
        return grounding.load_lisa_json(path)

    ok = {"image": "a.png", "text": "x", "box": [1, 2, 3, 4]}
    with pytest.raises(DataError, match=r"bad\.json record 1: missing field 'image'"):
        load([ok, {"text": "x", "box": [1, 2, 3, 4]}])
    with pytest.raises(DataError, match=r"bad\.json record 2: missing field 'solution' \(or 'box'\)"):
        load([ok, ok, {"image": "a.png", "text": "x"}])
    with pytest.raises(DataError, match=r"bad\.json record 0: missing field 'problem'"):
        load([{"image": "a.png", "box": [1, 2, 3, 4]}])
    with pytest.raises(DataError, match=r"record 0: field 'box' must be 4 numbers"):
        load([{"image": "a.png", "text": "x", "box": [1, 2, 3]}])
    with pytest.raises(DataError, match=r"record 0: field 'box' must be 4 numbers"):
        load([{"image": "a.png", "text": "x", "box": ["1", 2, 3, 4]}])
    with pytest.raises(DataError, match="JSON list"):
        load({"image": "a.png"})
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(DataError, match="broken.json"):
        grounding.load_lisa_json(tmp_path / "broken.json")


# ----------------------------------------------------------------------------- LISA as released

PIXELS = dict(min_pixels=3136, max_pixels=12544, factor=28)


def test_the_originals_box_annotation_json_gives_one_row_per_instruction(tmp_path):
    """gen_box_ann.py's output: image_path, the `text` list as `instruction`, pixel boxes (the first one is used)."""
    Image.new("RGB", (200, 100), (200, 30, 30)).save(tmp_path / "img_1.jpg")
    records = [{"image_path": str(tmp_path / "img_1.jpg"),
                "instruction": ["What holds the soup?", "Something to eat the soup with."],
                "boxes": [[20.5, 10.0, 100.0, 50.25], [0, 0, 5, 5]]},
               {"image_path": str(tmp_path / "gone.jpg"), "instruction": ["Where to sit?"], "boxes": [[1, 2, 3, 4]]}]
    (tmp_path / "lisa_train.json").write_text(json.dumps(records, indent=4))
    data = load_split(str(tmp_path / "lisa_train.json"), "train", get_task("grounding"), **PIXELS)
    assert [e.problem for e in data.examples] == [grounding.problem("What holds the soup?"),
                                                  grounding.problem("Something to eat the soup with.")]
    assert {e.solution for e in data.examples} == {"<answer>(102,100),(500,502)</answer>"}
    assert [(b.index, b.reason) for b in data.skipped] == [(2, f"image {tmp_path / 'gone.jpg'} does not exist")]
    with pytest.raises(DataError, match=r"record 0: field 'instruction' must be a list"):
        grounding.load_lisa_json(_dump(tmp_path, [{**records[0], "instruction": []}]))
    with pytest.raises(DataError, match=r"record 0: field 'boxes' must be a list of pixel boxes"):
        grounding.load_lisa_json(_dump(tmp_path, [{**records[0], "boxes": [[1, 2, 3]]}]))


def _dump(tmp_path, records):
    (tmp_path / "bad.json").write_text(json.dumps(records))
    return tmp_path / "bad.json"


def _reasonseg_item(tmp_path, split, name, size, texts, shapes):
    (tmp_path / "ReasonSeg" / split).mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (30, 200, 30)).save(tmp_path / "ReasonSeg" / split / f"{name}.jpg")
    item = {"text": texts, "is_sentence": True,
            "shapes": [{"label": label, "labelme_type": "polygon", "points": points, "group_id": None,
                        "shape_type": "polygon", "flags": {}} for label, points in shapes]}
    (tmp_path / "ReasonSeg" / split / f"{name}.json").write_text(json.dumps(item))


def test_the_raw_reasonseg_layout_loads_by_split_from_the_target_polygons(tmp_path):
    _reasonseg_item(tmp_path, "train", "1001", (400, 200), ["the thing that keeps you dry"],
                    [("ignore", [[0, 0], [400, 0], [400, 200]]),  # ignore: not part of the answer
                     ("target", [[40, 20], [120, 20], [80, 100]]),
                     ("target", [[100, 60], [200, 60], [200, 150], [100, 150]])])
    _reasonseg_item(tmp_path, "val", "2002", (100, 100), ["what a cat sleeps on", "the soft place"],
                    [("target", [[10.5, 20], [50, 20], [50, 60.4]])])
    train = load_split(str(tmp_path / "ReasonSeg"), "train", get_task("grounding"), **PIXELS)
    [row] = train.examples
    assert row.problem == grounding.problem("the thing that keeps you dry")
    assert row.solution == "<answer>(100,100),(500,750)</answer>"  # bounds of both targets: (40,20)-(200,150)
    assert row.image["path"] == str(tmp_path / "ReasonSeg" / "train" / "1001.jpg")
    val = load_split(str(tmp_path / "ReasonSeg"), "val", get_task("grounding"), **PIXELS)
    assert [e.solution for e in val.examples] == ["<answer>(105,200),(500,604)</answer>"] * 2
    assert [e.problem for e in val.examples] == [grounding.problem("what a cat sleeps on"),
                                                 grounding.problem("the soft place")]
    _reasonseg_item(tmp_path, "test", "3003", (10, 10), ["x"], [("ignore", [[1, 1], [2, 2], [3, 1]])])
    with pytest.raises(DataError, match=r"3003\.json: needs 'shapes' with a polygon labelled 'target'"):
        load_split(str(tmp_path / "ReasonSeg"), "test", get_task("grounding"), **PIXELS)
    import os

    os.mkfifo(tmp_path / "ReasonSeg" / "val" / "2003.json")  # never read: it would block
    with pytest.raises(DataError, match=r"ReasonSeg annotation .*2003\.json is not a regular file"):
        load_split(str(tmp_path / "ReasonSeg"), "val", get_task("grounding"), **PIXELS)
