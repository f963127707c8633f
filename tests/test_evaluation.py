"""The evaluation runner: what is asked, predictions.jsonl, resume, and re-scoring that reproduces the metrics."""

from __future__ import annotations

import json

import pytest

from qlora_rft.config import load_config
from qlora_rft.errors import DataError, UserError
from qlora_rft.evaluation import runner
from qlora_rft.evaluation.scoring import score_file
from qlora_rft.tasks import get_task

DETECTION = [
    "model.name_or_path=tiny:tiny",
    "data.task=detection",
    "data.max_pixels=12544",
    "data.max_prompt_length=256",
    "eval.annotations=synthetic:shapes-detection/test_coco.json",
    "eval.images=synthetic:shapes-detection/images",
    "eval.max_new_tokens=12",
    "eval.batch_size=4",
]


def test_detection_asks_every_class_or_only_present_ones():
    every = runner.eval_items(load_config(None, DETECTION), get_task("detection"))
    present = runner.eval_items(load_config(None, [*DETECTION, "eval.ask=present"]), get_task("detection"))
    coco = json.loads(open(runner.resolve_source("synthetic:shapes-detection/test_coco.json")).read())
    assert len(every) == len(coco["images"]) * len(coco["categories"])
    names = {c["id"]: c["name"] for c in coco["categories"]}
    assert {it.key for it in present} == {f"{a['image_id']}|{names[a['category_id']]}" for a in coco["annotations"]}
    absent = next(it for it in every if it.key not in {p.key for p in present})
    assert absent.example.solution == "<answer>No Objects</answer>"
    subset = runner.eval_items(load_config(None, [*DETECTION, "eval.classes=circle,cross"]), get_task("detection"))
    assert {it.record["category"] for it in subset} == {"circle", "cross"}


def test_detection_eval_writes_predictions_resumes_and_rescoring_matches(tmp_path, monkeypatch):
    out = tmp_path / "eval"
    first = runner.run_eval(load_config(None, [*DETECTION, "eval.limit=4", f"eval.output_dir={out}"]))
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 4 and {"image_id", "category", "completion"} <= json.loads(lines[0]).keys()
    assert "mAP" in first.metrics and json.loads((out / "eval_info.json").read_text())["label"] == "base"

    # A crash mid-line, then a longer rerun: the cut line is dropped and only missing prompts are generated.
    with (out / "predictions.jsonl").open("a") as f:
        f.write('{"image_id": 1, "categ')
    asked = []
    real_answers = runner.answer_batches
    monkeypatch.setattr(runner, "answer_batches", lambda sampler, task, items, *rest: (
        asked.extend(items) or real_answers(sampler, task, items, *rest)))
    second = runner.run_eval(load_config(None, [*DETECTION, "eval.limit=6", f"eval.output_dir={out}"]))
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(asked) == 2 and len(rows) == 6
    assert len({(r["image_id"], r["category"]) for r in rows}) == 6

    rescored = score_file("detection", out / "predictions.jsonl",
                          runner.resolve_source("synthetic:shapes-detection/test_coco.json"), "all")
    assert rescored == second.metrics
    assert json.loads((out / "metrics.json").read_text()) == second.metrics


@pytest.mark.parametrize("preset", ["tiny", "qwen2.5-vl-tiny", "qwen3-vl-tiny"])
def test_the_static_decoder_answers_as_generate(preset, tmp_path):
    """eval.decode=static and generate: the same predictions, for a batch of 4 prompts and a last batch of 2 of
    different lengths (a longer class name: left padding); a decoding setting is part of what a resumed evaluation
    keeps."""
    coco = json.loads(open(runner.resolve_source("synthetic:shapes-detection/test_coco.json")).read())
    coco["categories"].append({"id": 99, "name": "very large striped purple polygon"})  # a longer prompt
    annotations = tmp_path / "coco.json"
    annotations.write_text(json.dumps(coco))
    common = [*DETECTION, f"model.name_or_path=tiny:{preset}", "eval.limit=6", "data.max_prompt_length=512",
              f"eval.annotations={annotations}"]
    found = {}
    for decode in ("generate", "static"):
        cfg = load_config(None, [*common, f"eval.decode={decode}", f"eval.output_dir={tmp_path / decode}"])
        run = runner.run_eval(cfg)
        found[decode] = [json.loads(line) for line in run.predictions.read_text().splitlines()]
    assert found["static"] == found["generate"] and len(found["static"]) == 6
    assert found["static"][4]["category"] == "very large striped purple polygon"  # in the last batch, left-padded
    assert len({line["completion"] for line in found["static"]}) > 1  # answers that differ between prompts
    with pytest.raises(UserError, match=r"decode 'static' -> 'generate'"):
        runner.run_eval(load_config(None, [*common, "eval.decode=generate", f"eval.output_dir={tmp_path / 'static'}"]))


def test_classification_eval_and_another_model_in_the_same_folder(tmp_path):
    overrides = ["model.name_or_path=tiny:tiny", "data.max_pixels=3136", "eval.limit=5", "eval.max_new_tokens=8",
                 f"eval.output_dir={tmp_path}"]
    run = runner.run_eval(load_config(None, overrides))
    assert run.label == "base" and set(run.metrics) >= {"accuracy", "num_predictions", "skipped"}
    assert run.metrics["num_predictions"] == 5
    assert score_file("classification", run.predictions) == run.metrics
    with pytest.raises(UserError, match="holds predictions of another evaluation"):
        runner.run_eval(load_config(None, [*overrides, "model.name_or_path=tiny:cpu-small"]))


def test_train_eval_base_and_adapter_then_report(tiny_overrides, tmp_path):
    from qlora_rft.evaluation.report import make_report
    from qlora_rft.trainer import train

    run = tmp_path / "run"
    result = train(load_config(None, [*tiny_overrides, f"train.output_dir={run / 'train'}"]))
    common = [*tiny_overrides, "eval.limit=4", "eval.max_new_tokens=8"]
    runner.run_eval(load_config(None, [*common, f"eval.output_dir={run / 'eval_base'}"]))
    runner.run_eval(load_config(None, [*common, f"eval.adapter={result.adapter_dir}",
                                       f"eval.output_dir={run / 'eval_adapter'}"]))
    report = make_report(run)
    summary = report.summary.read_text()
    assert "base" in summary and "adapter" in summary and "accuracy" in summary
    for name in ("rewards.png", "completion_length.png"):
        png = report.folder / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000


def test_score_and_report_commands(tmp_path, capsys):
    from qlora_rft.cli import main

    predictions = tmp_path / "p.jsonl"
    predictions.write_text(
        '{"id": 1, "completion": "<answer>red square</answer>", "solution": "<answer>red square</answer>"}\n'
        "not json\n"
        '{"id": 2, "completion": "<answer>blue</answer>", "solution": "<answer>red cross</answer>"}\n'
    )
    out = tmp_path / "m.json"
    assert main(["score", "classification", "--predictions", str(predictions), "--out", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["accuracy"] == 50.0 and metrics["skipped"] == 1 and metrics["skipped_lines"][0]["line"] == 2
    assert main(["score", "detection", "--predictions", str(predictions)]) == 2
    assert "needs --annotations" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2


def test_eval_and_score_refuse_the_same_annotation_files(tmp_path):
    good = json.loads(open(runner.resolve_source("synthetic:shapes-detection/test_coco.json")).read())
    broken = {
        "no_width.json": lambda d: d["images"][0].pop("width"),
        "bad_box.json": lambda d: d["annotations"][0].update(bbox=[1, 2, "3", 4]),
        "not_coco.json": lambda d: d.pop("categories"),
        "unknown_category.json": lambda d: d["annotations"][0].update(category_id=999),
        "shared_annotation_id.json": lambda d: d["annotations"][1].update(id=d["annotations"][0]["id"]),
        "shared_image_id.json": lambda d: d["images"].append({**d["images"][0], "width": 7, "height": 9}),
        "shared_category_id.json": lambda d: d["categories"].append({"id": d["categories"][0]["id"], "name": "new"}),
        "listed_image_id.json": lambda d: d["images"][0].update(id=[1]),
        "orphan_annotation.json": lambda d: d["annotations"][0].update(image_id=987654),
        "negative_box.json": lambda d: d["annotations"][0].update(bbox=[1, 2, -3, 4]),
    }
    predictions = tmp_path / "p.jsonl"
    predictions.write_text('{"image_id": 1, "category": "circle", "completion": "No Objects"}\n')
    for name, damage in broken.items():
        data = json.loads(json.dumps(good))
        damage(data)
        path = tmp_path / name
        path.write_text(json.dumps(data))
        with pytest.raises(DataError) as by_score:
            score_file("detection", predictions, path)
        with pytest.raises(DataError) as by_eval:
            runner.eval_items(load_config(None, [*DETECTION, f"eval.annotations={path}"]), get_task("detection"))
        assert str(by_eval.value) == str(by_score.value) and str(path) in str(by_eval.value)
        if name.startswith("shared"):
            what = name.split("_")[1]
            assert f"{what} ids {data[what + 's' if what != 'category' else 'categories'][0]['id']!r} appear more " \
                   "than once" in str(by_eval.value)
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(DataError, match="cannot read annotation file .* as JSON"):
        runner.eval_items(load_config(None, [*DETECTION, f"eval.annotations={tmp_path / 'binary.json'}"]),
                          get_task("detection"))


def test_a_class_name_holding_a_vision_token_is_refused_before_any_model_loads(tmp_path):
    data = json.loads(open(runner.resolve_source("synthetic:shapes-detection/test_coco.json")).read())
    data["categories"][0]["name"] = "cat<|image_pad|>"
    path = tmp_path / "a.json"
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"category 'cat<\|image_pad\|>' holds the vision token <\|image_pad\|>"):
        runner.eval_items(load_config(None, [*DETECTION, f"eval.annotations={path}"]), get_task("detection"))


def test_eval_resumed_with_settings_that_change_the_answers_is_refused(tmp_path):
    overrides = ["model.name_or_path=tiny:tiny", "data.max_pixels=3136", "eval.limit=2", "eval.max_new_tokens=4",
                 f"eval.output_dir={tmp_path}"]
    runner.run_eval(load_config(None, overrides))
    for change, message in [("data.max_pixels=12544", "max_pixels 3136 -> 12544"),
                            ("eval.max_new_tokens=8", "max_new_tokens 4 -> 8"),
                            ("data.max_prompt_length=512", "max_prompt_length 1024 -> 512"),
                            ("model.mode=lora", "mode 'qlora' -> 'lora'")]:
        with pytest.raises(UserError, match=f"holds predictions of another evaluation \\({message}\\)"):
            runner.run_eval(load_config(None, [*overrides, change]))
    lines = (tmp_path / "predictions.jsonl").read_text()

    # An eval_info.json from before these settings were recorded: the settings it lacks cannot be compared.
    info = json.loads((tmp_path / "eval_info.json").read_text())
    old = {key: info[key] for key in ("label", "task", "model", "mode", "adapter", "annotations", "classes",
                                      "protocol", "data", "split", "max_pixels")}
    (tmp_path / "eval_info.json").write_text(json.dumps(old))
    runner.run_eval(load_config(None, [*overrides, "eval.max_new_tokens=8"]))
    assert json.loads((tmp_path / "eval_info.json").read_text())["max_new_tokens"] == 8
    assert (tmp_path / "predictions.jsonl").read_text() == lines  # nothing left to ask
    with pytest.raises(UserError, match="max_new_tokens 8 -> 4"):
        runner.run_eval(load_config(None, overrides))


def test_corrupt_weight_files_are_named(tmp_path):
    import shutil

    from qlora_rft.model import resolve_model_path

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (adapter / "adapter_model.safetensors").write_bytes(b"\xff" * 64)  # header length far past the end
    overrides = ["model.name_or_path=tiny:tiny", "data.max_pixels=3136", "eval.limit=2", "eval.max_new_tokens=4",
                 f"eval.adapter={adapter}", f"eval.output_dir={tmp_path / 'eval'}"]
    with pytest.raises(UserError, match=f"adapter weights file {adapter / 'adapter_model.safetensors'} is corrupt"):
        runner.run_eval(load_config(None, overrides))

    base = tmp_path / "base"
    shutil.copytree(resolve_model_path("tiny:tiny"), base)
    weights = base / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # an interrupted copy
    with pytest.raises(UserError, match=f"model weights file {weights} is corrupt or truncated"):
        runner.run_eval(load_config(None, [*overrides[1:], f"model.name_or_path={base}", "eval.adapter="]))


def lvis_v1(tmp_path):
    """An annotation file shaped like LVIS v1's lvis_v1_val.json: images carry coco_url and no file_name, categories
    synonyms / frequency / synset, and the image files sit in COCO's val2017/ folder."""
    from PIL import Image

    (tmp_path / "coco" / "val2017").mkdir(parents=True)
    Image.new("RGB", (64, 48), (200, 30, 30)).save(tmp_path / "coco" / "val2017" / "000000397133.jpg")
    Image.new("RGB", (48, 64), (30, 30, 200)).save(tmp_path / "coco" / "000000037777.jpg")  # fallback: name alone
    images = [
        {"id": 397133, "license": 4, "height": 48, "width": 64, "date_captured": "2013-11-14 17:02:52",
         "flickr_url": "http://farm7.staticflickr.com/6116/6255196340_da26cf2c9e_z.jpg",
         "coco_url": "http://images.cocodataset.org/val2017/000000397133.jpg",
         "neg_category_ids": [2], "not_exhaustive_category_ids": []},
        {"id": 37777, "license": 1, "height": 64, "width": 48, "date_captured": "2013-11-14 20:55:31",
         "flickr_url": "http://farm9.staticflickr.com/8429/7839199426_f6d48aa585_z.jpg",
         "coco_url": "http://images.cocodataset.org/val2017/000000037777.jpg",
         "neg_category_ids": [], "not_exhaustive_category_ids": [1]},
    ]
    categories = [
        {"id": 1, "name": "aerosol_can", "synonyms": ["aerosol_can", "spray_can"], "def": "a dispenser...",
         "synset": "aerosol.n.02", "frequency": "c", "image_count": 109, "instance_count": 362},
        {"id": 2, "name": "apple", "synonyms": ["apple"], "def": "fruit with red or yellow or green skin...",
         "synset": "apple.n.01", "frequency": "f", "image_count": 1207, "instance_count": 5928},
    ]
    annotations = [{"id": 1, "image_id": 397133, "category_id": 1, "bbox": [8.0, 6.0, 16.0, 12.0], "area": 192.0,
                    "segmentation": [[8.0, 6.0, 24.0, 6.0, 24.0, 18.0, 8.0, 18.0]]}]
    path = tmp_path / "lvis_v1_val.json"
    path.write_text(json.dumps({"info": {"version": "1.0"}, "licenses": [], "images": images,
                                "annotations": annotations, "categories": categories}))
    return path


def test_lvis_v1_images_are_found_from_their_coco_url_and_scored(tmp_path):
    path = lvis_v1(tmp_path)
    cfg = load_config(None, [*DETECTION, f"eval.annotations={path}", f"eval.images={tmp_path / 'coco'}"])
    items = runner.eval_items(cfg, get_task("detection"))
    assert [it.key for it in items] == ["397133|aerosol_can", "397133|apple", "37777|aerosol_can", "37777|apple"]
    assert items[0].example.image["path"] == str(tmp_path / "coco" / "val2017" / "000000397133.jpg")
    assert items[2].example.image["path"] == str(tmp_path / "coco" / "000000037777.jpg")
    assert items[0].example.solution == "<answer>[{'Position': [125, 125, 375, 375], 'Confidence': 1.0}]</answer>"
    predictions = tmp_path / "p.jsonl"
    predictions.write_text("".join(json.dumps({**it.record, "completion": it.example.solution}) + "\n"
                                   for it in items))
    metrics = score_file("detection", predictions, path)
    assert metrics["annotation_format"] == "lvis" and metrics["per_class"]["aerosol_can"] == 100.0
    data = json.loads(path.read_text())
    del data["images"][1]["coco_url"]
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match="image 37777 has neither a 'file_name' nor a 'coco_url'"):
        runner.eval_items(cfg, get_task("detection"))


def test_a_prompt_over_max_prompt_length_is_recorded_as_skipped_not_asked(tmp_path):
    import pyarrow.parquet as pq

    table = pq.read_table(runner.resolve_source("synthetic:shapes/test.parquet")).slice(0, 3)
    problems = table.column("problem").to_pylist()
    problems[1] = "Look very carefully at the picture. " * 40 + problems[1]
    (tmp_path / "data").mkdir()
    pq.write_table(table.set_column(table.schema.get_field_index("problem"), "problem", [problems]),
                   tmp_path / "data" / "test.parquet")
    overrides = ["model.name_or_path=tiny:tiny", "data.max_pixels=3136", "data.max_prompt_length=128",
                 f"data.eval={tmp_path / 'data'}", "eval.max_new_tokens=4", f"eval.output_dir={tmp_path / 'eval'}"]
    run = runner.run_eval(load_config(None, overrides))
    assert run.metrics["num_predictions"] == 2 and run.metrics["skipped"] == 1
    [line] = run.metrics["skipped_lines"]
    assert line["line"] == 1 and "not asked: prompt is" in line["reason"] and "max_prompt_length=128" in line["reason"]
    assert score_file("classification", run.predictions) == run.metrics
    with pytest.raises(DataError, match=r"eval prompt 1: prompt is \d+ tokens"):
        runner.run_eval(load_config(None, [*overrides, "data.on_bad_row=error", f"eval.output_dir={tmp_path / 'e2'}"]))


@pytest.mark.parametrize("preset", ["tiny", "qwen2.5-vl-tiny", "qwen3-vl-tiny"])
def test_prompt_lengths_are_the_encoded_lengths(preset):
    from transformers import AutoProcessor

    from qlora_rft.data import load_split

    from qlora_rft.model import model_family, resolve_model_path
    from qlora_rft.prompts import encode_prompts, prompt_lengths

    processor = AutoProcessor.from_pretrained(str(resolve_model_path(f"tiny:{preset}")))
    task = get_task("classification")
    factor = model_family(f"tiny:{preset}").factor
    examples = load_split("synthetic:shapes", "test", task, min_pixels=3136, max_pixels=12544, factor=factor).examples
    lengths = prompt_lengths(processor, task, examples[:6], 3136, 12544)
    for example, length in zip(examples[:6], lengths):
        batch, _ = encode_prompts(processor, task, [example], 3136, 12544, 10_000, "cpu")
        assert batch["input_ids"].shape[1] == length


def test_two_evaluations_into_one_folder_never_run_at_once(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).parents[1]
    out = tmp_path / "eval"
    cmd = [sys.executable, "-m", "qlora_rft", "eval", "configs/tiny_demo.yaml", "model.name_or_path=tiny:tiny",
           "eval.limit=6", "eval.max_new_tokens=4", f"eval.output_dir={out}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), *sys.path])}
    first = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while "pid" not in ((out / ".lock").read_text() if (out / ".lock").exists() else ""):
            assert first.poll() is None, first.stderr.read()
            time.sleep(0.05)
        first.send_signal(signal.SIGSTOP)  # holds the folder, whatever the machine's speed
        second = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
        assert second.returncode == 2 and second.stderr.count("\n") == 1, second.stderr
        assert f"eval.output_dir={out} is in use by pid {first.pid} on " in second.stderr
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=600) == 0, first.stderr.read()
    assert len((out / runner.PREDICTIONS).read_text().splitlines()) == 6


def test_a_predictions_file_no_evaluation_wrote_is_left_alone(tmp_path):
    out = tmp_path / "eval"
    out.mkdir()
    (out / runner.PREDICTIONS).write_text('{"id": 0, "completion": "mine"}\n')
    cfg = load_config(None, ["model.name_or_path=tiny:tiny", "eval.limit=1", f"eval.output_dir={out}"])
    with pytest.raises(UserError, match="holds a predictions.jsonl that no evaluation wrote"):
        runner.run_eval(cfg)
    assert (out / runner.PREDICTIONS).read_text() == '{"id": 0, "completion": "mine"}\n'
