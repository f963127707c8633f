"""The generic task: JSON-lines rows with a prompt (text and one or several images) and the columns a plugin reward
needs train on the tiny model, are evaluated, and are scored by the mean of their rewards."""

from __future__ import annotations

import json
from dataclasses import replace
from functools import partial

import pytest
from PIL import Image

from qlora_rft.config import load_config
from qlora_rft.data import load_split
from qlora_rft.errors import ConfigError, DataError
from qlora_rft.evaluation.runner import main_metric
from qlora_rft.evaluation.scoring import score_file
from qlora_rft.tasks import get_task

PIXELS = dict(min_pixels=3136, max_pixels=3136, factor=28)
COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220)}
ROWS = [
    {"problem": "Which colour is the image?", "image": "red.png", "colour": "red"},
    {"problem": "Which colour do both images share?", "images": ["blue.png", "blue.png"], "colour": "blue"},
    {"problem": "Name the colour of the first image.", "images": ["red.png", "blue.png"], "colour": "red"},
    {"problem": "Which colour is the image?", "image": "blue.png", "colour": "blue", "solution": "blue"},
]
PLUGIN = '''
def names_colour(completions, colour, **columns):
    """1.0 when the completion's text names the row's colour."""
    return [float(c in completion) for completion, c in zip(completions, colour)]
'''


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture
def folder(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for name, rgb in COLOURS.items():
        Image.new("RGB", (56, 56), rgb).save(data / f"{name}.png")
    write_jsonl(data / "train.jsonl", ROWS)
    (tmp_path / "colour_rewards.py").write_text(PLUGIN)
    return data


def test_jsonl_rows_keep_their_images_and_columns(folder):
    data = load_split(str(folder / "train.jsonl"), "train", get_task("generic"), **PIXELS)
    assert [len(ex.images) for ex in data.examples] == [1, 2, 2, 1] and not data.skipped
    assert data.examples[2].images[1]["path"] == str(folder / "blue.png")  # relative to the file's folder
    assert data.examples[1].reward_columns() == {"problem": "Which colour do both images share?", "solution": "",
                                                 "colour": "blue"}
    assert data.examples[3].solution == "blue"
    same = load_split(str(folder), "train", get_task("generic"), **PIXELS)  # a folder holding SPLIT.jsonl
    assert [ex.problem for ex in same.examples] == [row["problem"] for row in ROWS]


@pytest.mark.parametrize("preset", ["tiny", "qwen2.5-vl-tiny", "qwen3-vl-tiny"])
def test_several_images_are_encoded_in_order_and_counted(folder, preset):
    from transformers import AutoProcessor

    from qlora_rft.model import model_family, resolve_model_path
    from qlora_rft.prompts import encode_prompts, prompt_lengths

    Image.new("RGB", (112, 56), COLOURS["blue"]).save(folder / "blue.png")  # two image sizes
    processor = AutoProcessor.from_pretrained(str(resolve_model_path(f"tiny:{preset}")))
    task = get_task("generic")
    pixels = dict(min_pixels=3136, max_pixels=12544)
    examples = load_split(str(folder / "train.jsonl"), "train", task, factor=model_family(f"tiny:{preset}").factor,
                          **pixels).examples
    lengths = prompt_lengths(processor, task, examples, **pixels)
    for example, length in zip(examples, lengths):
        batch, _ = encode_prompts(processor, task, [example], **pixels, max_prompt_length=10_000, device="cpu")
        assert batch["input_ids"].shape[1] == length
        assert batch["image_grid_thw"].shape[0] == len(example.images)
    batch, _ = encode_prompts(processor, task, examples, **pixels, max_prompt_length=10_000, device="cpu")
    grids = batch["image_grid_thw"].tolist()  # every image of every prompt, in order
    assert len(grids) == 6 and grids[1] == grids[2] == grids[4] and grids[0] == grids[3] != grids[1]


def test_rows_the_generic_task_cannot_use(folder):
    load = partial(load_split, split="train", task=get_task("generic"), **PIXELS)
    with pytest.raises(DataError, match="has no column 'image'.*data.task=generic needs problem and image"):
        load(write_jsonl(folder / "a.jsonl", [{"problem": "p", "colour": "red"}]))
    data = load(write_jsonl(folder / "b.jsonl", [ROWS[0], {"problem": "p", "images": []},
                                                 {"problem": "", "image": "red.png"}]))
    assert [(b.index, b.reason) for b in data.skipped] == [(1, "no image (an empty 'images' list)"),
                                                           (2, "empty problem")]
    boxes = [{"problem": "p", "images": ["red.png", "blue.png"], "solution": "<answer>(0,0),(10,10)</answer>"}]
    with pytest.raises(DataError, match="row 0 holds 2 images: data.task=grounding takes one image per prompt"):
        load(write_jsonl(folder / "c.jsonl", boxes), task=get_task("grounding"))
    (folder / "d.jsonl").write_text('{"problem": "p", "image": "red.png"}\nnot json\n')
    with pytest.raises(DataError, match="d.jsonl line 2 is not valid JSON"):
        load(str(folder / "d.jsonl"))


def test_generic_needs_named_rewards_and_a_solution_to_imitate():
    with pytest.raises(ConfigError, match="data.task=generic has no default rewards"):
        load_config(None, ["data.task=generic"])
    task = get_task("generic")
    assert task.warmup_target("blue") == "<think></think><answer>blue</answer>"
    with pytest.raises(DataError, match="no solution to learn from"):
        task.warmup_target("")


def test_generic_metrics_are_the_means_of_the_recorded_rewards(tmp_path):
    lines = [{"id": 0, "completion": "a", "reward": 1.5, "rewards": {"names_colour": 1.0, "format": 1.0}},
             {"id": 1, "completion": "b", "reward": 0.0, "rewards": {"names_colour": 0.0, "format": 0.0}},
             {"id": 1, "completion": "c", "reward": 1.0, "rewards": {"names_colour": 1.0, "format": 0.0}},  # repeat
             {"id": 2, "completion": "d", "reward": "high", "rewards": {}},
             {"id": 3, "completion": "e", "rewards": {}}]  # no reward
    metrics = score_file("generic", write_jsonl(tmp_path / "p.jsonl", lines))
    assert {k: metrics[k] for k in ("num_predictions", "reward", "rewards/names_colour", "rewards/format")} == {
        "num_predictions": 2, "reward": 0.75, "rewards/names_colour": 0.5, "rewards/format": 0.5}
    assert [s["line"] for s in metrics["skipped_lines"]] == [3, 4, 5]
    assert main_metric(metrics) == ("reward", 0.75)


def test_generic_task_trains_evaluates_and_scores_with_a_plugin_reward(folder, tiny_overrides, tmp_path):
    from qlora_rft.evaluation.runner import run_eval
    from qlora_rft.trainer import train

    cfg = load_config(None, [
        *tiny_overrides, "data.task=generic", f"data.train={folder / 'train.jsonl'}", "data.max_prompt_length=256",
        f"rewards.plugins={tmp_path / 'colour_rewards.py'}", "rewards.weights={names_colour: 1, format: 0.5}",
        "train.prompts_per_step=2", "grpo.generation_chunk=8",  # both prompts of a step in one call
        f"eval.output_dir={tmp_path / 'eval'}", "eval.max_new_tokens=8", "eval.batch_size=4",
        "train.eval_steps=2", f"data.eval={folder / 'train.jsonl'}",  # and evaluated during training, at the end
    ])
    result = train(cfg)
    lines = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2]
    assert all(0.0 <= line["rewards/names_colour"] <= 1.0 for line in lines)

    evaluated = run_eval(replace(cfg, eval=replace(cfg.eval, adapter=str(result.adapter_dir))))
    predictions = [json.loads(line) for line in evaluated.predictions.read_text().splitlines()]
    assert sorted(p["id"] for p in predictions) == [0, 1, 2, 3]
    for p in predictions:  # each line's rewards are the plugin's and the format reward, weighted 1 and 0.5
        names = float(ROWS[p["id"]]["colour"] in p["completion"])
        assert p["rewards"]["names_colour"] == names
        assert p["reward"] == pytest.approx(names + 0.5 * p["rewards"]["format"])
    metrics = evaluated.metrics
    assert metrics["task"] == "generic" and metrics["num_predictions"] == 4
    assert metrics["reward"] == pytest.approx(sum(p["reward"] for p in predictions) / 4, abs=1e-6)
    assert metrics["reward"] == pytest.approx(metrics["rewards/names_colour"] + 0.5 * metrics["rewards/format"],
                                              abs=1e-5)
    assert score_file("generic", evaluated.predictions) == metrics  # recomputed from the file alone
    assert lines[-1]["eval/num_predictions"] == 4  # the same evaluation during training, of the same adapter
    assert lines[-1]["eval/reward"] == pytest.approx(metrics["reward"])
