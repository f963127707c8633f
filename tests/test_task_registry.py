"""A task is one `Task` in the registry: a toy task registered here is a config choice, has its rewards, default
weights, metric and headline, and is scored, with no other module knowing its name."""

from __future__ import annotations

import json

import pytest

from qlora_rft import rewards
from qlora_rft.config import load_config
from qlora_rft.errors import ConfigError
from qlora_rft.evaluation.rows import Row, ScoreOptions, Scored, mean, per_sample, percent
from qlora_rft.evaluation.runner import main_metric
from qlora_rft.evaluation.scoring import score_file
from qlora_rft.tasks import TASKS, Reward, Task, get_task
from qlora_rft.tasks.boxes import RELATIVE
from qlora_rft.tasks.common import extract_answer, per_completion, prompt


def parse(text: str, frame=RELATIVE) -> int | None:
    """The integer in the answer block; None when there is none."""
    answer = extract_answer(text)
    return int(answer) if answer is not None and answer.isdigit() else None


def parse_solution(text: str) -> int | None:
    return parse(text)


def score(completion: str, solution: str, frame=RELATIVE) -> float:
    found = parse(completion)
    return float(found is not None and found == parse_solution(solution))


def metrics(rows: list[Row], options: ScoreOptions) -> Scored:
    found = per_sample(rows, parse, parse_solution, score)
    return Scored({"num_predictions": len(found.scores), "hit_rate": percent(mean(found.scores))}, found.skipped)


TOY = Task(name="toy_count", prompt=prompt, parse=parse, parse_solution=parse_solution,
           rewards={"exact_count": Reward(per_completion(score, "exact_count"))},
           default_weights={"format": 1.0, "exact_count": 2.0}, metrics=metrics,
           prediction_keys=("completion", "solution"), headline="hit_rate")


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(TASKS, TOY.name, TOY)  # the one registry line
    return TOY


def test_a_registered_task_is_a_config_choice_with_its_rewards_and_metric(toy, tmp_path):
    cfg = load_config(None, ["data.task=toy_count", "rewards.weights={format: 1, exact_count: 2}"])
    assert get_task(cfg.data.task) is toy
    weights = rewards.default_weights(cfg.data.task)
    assert weights == {"format": 1.0, "exact_count": 2.0}
    got = rewards.score(["<think>two and one</think><answer>3</answer>", "<answer>4</answer>"], "<answer>3</answer>",
                        weights)
    assert got == {"format": [1.0, 0.0], "exact_count": [1.0, 0.0]}

    predictions = tmp_path / "predictions.jsonl"
    lines = [{"id": 0, "completion": "<answer>3</answer>", "solution": "<answer>3</answer>"},
             {"id": 1, "completion": "three", "solution": "<answer>3</answer>"},
             {"id": 2, "completion": "<answer>3</answer>", "solution": "<answer>many</answer>"}]  # a bad solution
    predictions.write_text("".join(json.dumps(line) + "\n" for line in lines))
    scored = score_file("toy_count", predictions)
    assert (scored["task"], scored["num_predictions"], scored["hit_rate"], scored["skipped"]) == ("toy_count", 2, 50.0,
                                                                                                  1)
    assert main_metric(scored) == ("hit_rate", 50.0)


def test_an_unknown_task_is_refused_everywhere(tmp_path):
    with pytest.raises(ConfigError, match="data.task must be one of classification, detection, grounding, generic; "
                                          "got 'toy_count'"):
        load_config(None, ["data.task=toy_count"])  # not registered outside the fixture
    (tmp_path / "p.jsonl").write_text('{"completion": "<answer>(0,0),(1,1)</answer>", "solution": "(0,0),(1,1)"}\n')
    with pytest.raises(ConfigError, match="unknown task 'toy_count'"):  # never scored as grounding
        score_file("toy_count", tmp_path / "p.jsonl")
    with pytest.raises(ConfigError, match="unknown task"):
        main_metric({"task": "toy_count", "mIoU": 1.0})
