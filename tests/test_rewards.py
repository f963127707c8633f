"""Rewards: hand-worked cases for each rule, TRL's completion forms, and totality on arbitrary text."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from qlora_rft.rewards import RANGES, REWARDS, classification_reward, format_reward, score
from qlora_rft.tasks import classification
from qlora_rft.tasks.common import extract_answer, has_format


def test_format_reward_rules():
    good = "<think>it is red</think> <answer>red circle</answer>"
    assert format_reward([good, "<think>\nmulti\nline\n</think>\n<answer>x</answer>\n"]) == [1.0, 1.0]
    assert format_reward(["<answer>red circle</answer>"]) == [0.0]  # no think
    assert format_reward([good + " trailing"]) == [0.0]  # something after the answer
    assert format_reward(["<think>a</think>"]) == [0.0]  # no answer


def test_classification_is_normalised_exact_match_never_substring():
    sol = ["<answer>Garden Phlox</answer>"]
    assert classification_reward(["<think></think><answer>garden_phlox</answer>"], sol) == [1.0]
    assert classification_reward(["<answer> GARDEN  PHLOX </answer>"], sol) == [1.0]
    assert classification_reward(["<answer>phlox</answer>"], sol) == [0.0]  # substring of the truth
    assert classification_reward(["<answer>garden phlox, rose</answer>"], sol) == [0.0]  # truth is a substring
    assert classification_reward(["<answer></answer>"], sol) == [0.0]  # empty answer (their bug scored 1)
    assert classification_reward(["garden phlox"], sol) == [0.0]  # no answer tags in a completion


def test_the_last_answer_block_counts():
    assert extract_answer("<answer>a</answer> then <answer>b</answer>") == "b"
    assert classification.parse("<answer>a</answer><answer>Red Circle</answer>") == "redcircle"


def test_trl_conversational_completions_are_read():
    conversational = [[{"role": "assistant", "content": "<think>x</think><answer>red circle</answer>"}]]
    assert format_reward(conversational) == [1.0]
    assert classification_reward(conversational, ["<answer>red circle</answer>"]) == [1.0]


def test_score_returns_every_named_reward_per_completion():
    got = score(["<think>a</think><answer>red circle</answer>", "blue"], "<answer>red circle</answer>",
                {"format": 1.0, "classification": 1.0})
    assert got == {"format": [1.0, 0.0], "classification": [1.0, 0.0]}


@settings(max_examples=300, deadline=None)
@given(st.text(), st.text())
def test_every_reward_is_total_and_in_range(completion, solution_text):
    for sol in (solution_text, f"<answer>{solution_text}</answer>"):
        for name, fn in REWARDS.items():
            for c in (completion, f"<think>{completion}</think><answer>{completion}</answer>"):
                (value,) = fn([c], solution=[sol])
                low, high = RANGES[name]
                assert isinstance(value, float) and math.isfinite(value) and low <= value <= high, name
    assert isinstance(has_format(completion), bool)


def test_detection_and_grounding_rewards_take_trl_forms_and_solution_columns():
    from qlora_rft.rewards import confidence_reward, grounding_reward, iou_reward

    box = "[{'Position': [100, 100, 200, 200], 'Confidence': 0.75}]"
    conversational = [[{"role": "assistant", "content": f"<think>one</think><answer>{box}</answer>"}]]
    truth = ['<answer>[{"Position": [100, 100, 200, 200], "Confidence": 1.0}]</answer>']
    assert iou_reward(conversational, truth) == [1.0]
    assert confidence_reward(conversational, truth) == [0.75]
    # TRL passes every dataset column as a keyword: extra columns must be accepted and ignored
    assert grounding_reward(["<answer>(0,0),(10,10)</answer>"], ["<answer>(0,0),(10,10)</answer>"],
                            problem=["p"], image=[None]) == [2.0]
