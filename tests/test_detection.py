"""Detection: IoU and both rewards by hand, the parser's tolerance and strictness, and totality on arbitrary text."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qlora_rft.tasks import detection
from qlora_rft.tasks.common import FORMAT_INSTRUCTION
from qlora_rft.tasks.detection import (
    Box,
    Detection,
    confidence_reward,
    iou,
    iou_reward,
    parse,
    parse_solution,
    to_pixels,
)


def answer(*items: tuple[list, float]) -> str:
    """A completion listing (position, confidence) items in the released single-quote format."""
    body = ", ".join(f"{{'Position': {list(p)}, 'Confidence': {c}}}" for p, c in items)
    return f"<think>boxes</think><answer>[{body}]</answer>"


def truth(*boxes) -> str:
    return detection.solution(list(boxes))


def in_range(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and 0.0 <= value <= 1.0


# ------------------------------------------------------------------------------------------------------------ IoU


def test_iou_by_hand():
    assert iou(Box(0, 0, 10, 10), Box(5, 0, 15, 10)) == pytest.approx(50 / 150)  # 1/3
    assert iou(Box(0, 0, 10, 10), Box(0, 0, 10, 10)) == 1.0
    assert iou(Box(0, 0, 10, 10), Box(10, 0, 20, 10)) == 0.0  # touching edges
    assert iou(Box(0, 0, 10, 10), Box(2, 2, 6, 6)) == pytest.approx(16 / 100)  # inside
    assert iou(Box(0, 0, 0, 0), Box(0, 0, 0, 0)) == 0.0  # degenerate: no division by zero
    assert Box(0, 0, 10, 20).area == 200


def test_to_pixels_by_hand():
    assert to_pixels(Box(100, 250, 500, 1000), 640, 480) == Box(64, 120, 320, 480)
    assert to_pixels(Box(0, 0, 1000, 1000), 33, 7) == Box(0, 0, 33, 7)


# ------------------------------------------------------------------------------------------------------ IoU reward


def test_perfect_prediction_is_one():
    assert iou_reward(answer(([0, 0, 10, 10], 0.9)), truth((0, 0, 10, 10))) == 1.0


def test_two_truths_one_perfect_prediction_is_half():
    assert iou_reward(answer(([0, 0, 10, 10], 0.9)), truth((0, 0, 10, 10), (20, 0, 30, 10))) == 0.5


def test_junk_prediction_halves_the_reward_max_denominator():
    completion = answer(([0, 0, 10, 10], 0.9), ([500, 500, 600, 600], 0.8))
    assert iou_reward(completion, truth((0, 0, 10, 10))) == 0.5


def test_partial_iou_is_the_reward():
    # [0,0,10,10] vs [0,0,8,10]: 80 / 100
    assert iou_reward(answer(([0, 0, 8, 10], 0.9)), truth((0, 0, 10, 10))) == pytest.approx(0.8)


def test_iou_at_or_below_half_does_not_count():
    assert iou_reward(answer(([0, 0, 4, 10], 0.9)), truth((0, 0, 10, 10))) == 0.0  # IoU 0.4
    assert iou_reward(answer(([0, 0, 5, 10], 0.9)), truth((0, 0, 10, 10))) == 0.0  # IoU exactly 0.5
    assert iou_reward(answer(([0, 0, 6, 10], 0.9)), truth((0, 0, 10, 10))) == pytest.approx(0.6)


def test_greedy_matching_goes_by_confidence():
    # Truths T1 = [0,0,100,10], T2 = [20,0,120,10]; P = [0,0,100,10] (equals T1), Q = [5,0,105,10].
    # IoU(P,T1) = 1, IoU(P,T2) = 80/120 = 2/3, IoU(Q,T1) = 95/105 = 19/21, IoU(Q,T2) = 85/115 = 17/23.
    sol = truth((0, 0, 100, 10), (20, 0, 120, 10))
    p, q = [0, 0, 100, 10], [5, 0, 105, 10]
    # P first: P takes T1 (1), Q takes T2 (17/23) -> (1 + 17/23) / 2 = 20/23
    assert iou_reward(answer((q, 0.5), (p, 0.9)), sol) == pytest.approx(20 / 23)
    # Q first: Q takes T1 (19/21), P takes T2 (2/3) -> (19/21 + 14/21) / 2 = 11/14
    assert iou_reward(answer((q, 0.9), (p, 0.5)), sol) == pytest.approx(11 / 14)


def test_each_truth_is_matched_once():
    # Two identical-ish predictions of one truth: the second finds no free truth.
    completion = answer(([0, 0, 10, 10], 0.9), ([0, 0, 10, 9], 0.8))
    assert iou_reward(completion, truth((0, 0, 10, 10))) == 0.5


def test_no_objects():
    empty = truth()
    assert empty == "<answer>No Objects</answer>"
    assert iou_reward("<think>none</think><answer>No Objects</answer>", empty) == 1.0
    assert iou_reward("<think>none</think><answer> no objects </answer>", empty) == 1.0
    assert confidence_reward("<answer>NO OBJECTS</answer>", empty) == 1.0
    assert iou_reward("<answer>No Objects</answer>", truth((0, 0, 10, 10))) == 0.0
    assert confidence_reward("<answer>No Objects</answer>", truth((0, 0, 10, 10))) == 0.0
    assert iou_reward(answer(([0, 0, 10, 10], 0.1)), empty) == 0.0  # a box where there is none


# ------------------------------------------------------------------------------------------------ confidence reward


def test_confidence_reward_by_hand():
    completion = answer(([0, 0, 10, 10], 0.9), ([500, 500, 600, 600], 0.2))
    assert confidence_reward(completion, truth((0, 0, 10, 10))) == pytest.approx((0.9 + 0.8) / 2)
    # the same boxes with the confidences swapped: matching still goes to the same box, values flip
    swapped = answer(([0, 0, 10, 10], 0.2), ([500, 500, 600, 600], 0.9))
    assert confidence_reward(swapped, truth((0, 0, 10, 10))) == pytest.approx((0.2 + 0.1) / 2)


def test_confidence_reward_on_empty_truth_rewards_low_confidence():
    assert confidence_reward(answer(([0, 0, 10, 10], 0.25)), truth()) == pytest.approx(0.75)


def test_confidence_reward_uses_the_iou_threshold():
    assert confidence_reward(answer(([0, 0, 4, 10], 0.9)), truth((0, 0, 10, 10))) == pytest.approx(0.1)


def test_score_is_iou_reward():
    completion = answer(([0, 0, 8, 10], 0.9))
    assert detection.score(completion, truth((0, 0, 10, 10))) == pytest.approx(0.8)


# ----------------------------------------------------------------------------------------------------------- parser


def test_parse_reads_both_quote_styles_and_whitespace():
    expected = [Detection(Box(0, 0, 10, 10), 0.9)]
    assert parse("<answer>[{'Position': [0, 0, 10, 10], 'Confidence': 0.9}]</answer>") == expected
    assert parse('<answer>[{"Position": [0, 0, 10, 10], "Confidence": 0.9}]</answer>') == expected
    assert parse("<answer>\n[ {\n 'Position' : [ 0 ,0, 10,\n10 ] , 'Confidence':0.9 } ]\n</answer>") == expected
    double = '<answer>[{"Position": [0, 0, 10, 10], "Confidence": 0.9}]</answer>'
    assert iou_reward(double, truth((0, 0, 10, 10))) == 1.0


def test_truncated_list_keeps_the_complete_items():
    cut = "<answer>[{'Position': [0,0,10,10], 'Confidence': 0.9}, {'Posi"
    assert parse(cut) == [Detection(Box(0, 0, 10, 10), 0.9)]
    assert iou_reward(cut, truth((0, 0, 10, 10))) == 1.0
    assert parse("<answer>[{'Position': [0,0,10,10], 'Confi") is None  # nothing complete


def test_exact_duplicate_boxes_are_dropped_first_kept():
    completion = answer(([0, 0, 10, 10], 0.9), ([0, 0, 10, 10], 0.3), ([0, 0, 10, 10], 0.9))
    assert parse(completion) == [Detection(Box(0, 0, 10, 10), 0.9)]
    assert iou_reward(completion, truth((0, 0, 10, 10))) == 1.0  # without dropping: 1/3


def test_invalid_items_are_dropped_valid_ones_kept():
    good = "{'Position': [0, 0, 10, 10], 'Confidence': 0.9}"
    bad = [
        "{'Position': [0, 0, 10, 10]}",  # missing Confidence: invalid in a completion
        "{'position': [0, 0, 10, 10], 'Confidence': 0.9}",  # wrong key case
        "{'Position': [0, 0, 10, 10], 'Confidence': 0.9, 'Label': 'cat'}",  # extra key
        "{'Box': [0, 0, 10, 10], 'Confidence': 0.9}",
        "{'Position': [10, 0, 5, 10], 'Confidence': 0.9}",  # x2 < x1
        "{'Position': [0, 10, 10, 10], 'Confidence': 0.9}",  # y2 == y1
        "{'Position': [-1, 0, 10, 10], 'Confidence': 0.9}",
        "{'Position': [0, 0, 1001, 10], 'Confidence': 0.9}",
        "{'Position': [0, 0, 1e309, 10], 'Confidence': 0.9}",  # inf
        "{'Position': [0, 0, nan, 10], 'Confidence': 0.9}",
        "{'Position': [0, 0, 10, 10], 'Confidence': 1.5}",
        "{'Position': [0, 0, 10, 10], 'Confidence': -0.1}",
        "{'Position': [0, 0, 10, 10], 'Confidence': 1e309}",
        "{'Position': [0, 0, 10, 10], 'Confidence': True}",
        "{'Position': [0, 0, 10], 'Confidence': 0.9}",
        "{'Position': ['0', 0, 10, 10], 'Confidence': 0.9}",
        f"{{'Position': [0, 0, {10 ** 400}, 10], 'Confidence': 0.9}}",
    ]
    for item in bad:
        assert parse(f"<answer>[{item}]</answer>") is None, item
        assert parse(f"<answer>[{item}, {good}]</answer>") == [Detection(Box(0, 0, 10, 10), 0.9)], item


def test_missing_tags_or_empty_answer_is_unusable():
    listing = "[{'Position': [0, 0, 10, 10], 'Confidence': 0.9}]"
    assert parse(listing) is None  # completions need the answer tags
    assert iou_reward(listing, truth((0, 0, 10, 10))) == 0.0
    assert parse("<answer></answer>") is None
    assert parse("<answer>a cat at the left</answer>") is None
    assert parse("<answer>[]</answer>") == []  # an explicit empty list means no objects


def test_parse_solution_accepts_bare_lists_and_no_objects():
    assert parse_solution("[{'Position': [1, 2, 3, 4], 'Confidence': 1}]") == [Box(1, 2, 3, 4)]
    assert parse_solution("<answer>[{'Position': [1, 2, 3, 4]}]</answer>") == [Box(1, 2, 3, 4)]  # no confidence
    assert parse_solution("No Objects") == []
    assert parse_solution("<answer>No Objects</answer>") == []
    assert parse_solution("a cat") is None
    assert iou_reward(answer(([1, 2, 3, 4], 0.9)), "a cat") == 0.0


def test_solution_round_trips():
    boxes = [(1, 2, 3, 4), (10.5, 0, 999, 1000)]
    text = detection.solution(boxes)
    assert text.startswith("<answer>[{'Position': [1, 2, 3, 4], 'Confidence': 1.0}")
    assert parse_solution(text) == [Box(*b) for b in boxes]


def test_prompt_and_problem():
    problem = detection.problem("zebra")
    for needed in ("zebra", "1000", "top-left", "bottom-right", "width", "height", "Confidence", "No Objects",
                   "<think>", "<answer>"):
        assert needed in problem, needed
    assert detection.prompt(problem) == problem  # the problem carries its own format instruction
    assert detection.prompt("Find the cat.") == f"Find the cat. {FORMAT_INSTRUCTION}"


def test_nasty_inputs_are_finite_and_in_range():
    sol = truth((0, 0, 10, 10))
    nasty = [
        "<answer>[{'Position': [nan, nan, nan, nan], 'Confidence': nan}]</answer>",
        "<answer>[{'Position': [0, 0, inf, 10], 'Confidence': inf}]</answer>",
        "<answer>[{'Position': [0, 0, 1e309, 1e309], 'Confidence': 1e309}]</answer>",
        "<answer>[{'Position': [-5, -5, -1, -1], 'Confidence': -1}]</answer>",
        "<answer>[{'Position': [10, 10, 0, 0], 'Confidence': 0.5}]</answer>",
        "<answer>[{'Pos': [0, 0, 10, 10], 'Conf': 0.5}]</answer>",
        "<answer>[{'Position': [0, 0, 10, 10], 'Confidence': 0.5, 'x': {'y': [[[[]]]]}}]</answer>",
        "<answer>" + "[" * 5000 + "</answer>",
        "<answer>{" * 300 + "}" * 300 + "</answer>",
        "<answer>[{'Position': [0, 0, 10, 10], 'Confidence': 0.5" + "0" * 10000 + "}]</answer>",
        "<answer>[{'Position': [０, 0, 10, 10], 'Confidence': 0.9}, {'Positión': [0, 0, 10, 10]}] 猫 🐱</answer>",
        "<answer>[{'Position': [0, 0, 10, 10], 'Confidence': '\\x'}]</answer>",
        "<answer>[{'Position': [0, 0, 10, 10], 'Confidence': 1+2j}]</answer>",
        "<answer></answer>",
        "cat",
        "",
    ]
    for completion in nasty:
        for sol_text in (sol, truth(), completion):
            for fn in (iou_reward, confidence_reward, detection.score):
                assert in_range(fn(completion, sol_text)), (fn.__name__, completion[:80])
        assert iou_reward(completion, sol) == 0.0, completion[:80]  # none holds a valid matching box


# ------------------------------------------------------------------------------------------------------- properties

_number = st.one_of(
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=0, max_value=1000),
    st.floats(min_value=0, max_value=1),
)
_key = st.sampled_from(["Position", "Confidence", "position", "Box", ""]) | st.text(max_size=8)
_value = st.one_of(_number, st.lists(_number, max_size=5), st.text(max_size=8), st.none())
_item = st.dictionaries(_key, _value, max_size=3) | st.fixed_dictionaries(
    {"Position": st.lists(_number, min_size=4, max_size=4), "Confidence": _number}
)


def _render(items: list[dict], double: bool) -> str:
    text = repr(items)
    return text.replace("'", '"') if double else text


@settings(max_examples=300, deadline=None)
@given(
    st.text(),
    st.lists(_item, max_size=6),
    st.booleans(),
    st.integers(min_value=0, max_value=200),
    st.lists(st.tuples(*[st.integers(0, 1000)] * 4), max_size=4),
)
def test_rewards_are_total_and_in_range(text, items, double, cut, truth_boxes):
    listing = _render(items, double)
    completions = [
        text,
        f"<answer>{text}</answer>",
        f"<think>{text}</think><answer>{listing}</answer>",
        f"<answer>{listing[:cut]}",  # truncated
    ]
    valid_truth = [b for b in truth_boxes if b[2] > b[0] and b[3] > b[1]]
    solutions = [detection.solution(valid_truth), text, f"<answer>{listing}</answer>", listing]
    for completion in completions:
        parsed = parse(completion)
        assert parsed is None or all(isinstance(d, Detection) for d in parsed)
        for sol in solutions:
            for fn in (iou_reward, confidence_reward):
                assert in_range(fn(completion, sol)), fn.__name__


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 999), st.integers(0, 999), st.integers(1, 1000), st.integers(1, 1000)),
                max_size=6))
def test_the_solution_scores_itself_perfectly(raw):
    boxes = list(dict.fromkeys((x, y, min(1000, x + w), min(1000, y + h)) for x, y, w, h in raw))
    sol = detection.solution(boxes)
    assert parse_solution(sol) == [Box(*b) for b in boxes]
    assert iou_reward(sol, sol) == 1.0
    assert confidence_reward(sol, sol) == 1.0
