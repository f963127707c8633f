"""eval.protocol=paper: the original Visual-RFT evaluation. Class-existence maps (an excerpt of the released file,
and the released files themselves when present), the classes asked per image, the released training prompt, the
generation settings per task, the LISA first-box reading, and `qlora-rft eval` end to end on synthetic data."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from qlora_rft.config import load_config
from qlora_rft.errors import ConfigError, DataError, UserError
from qlora_rft.evaluation import runner
from qlora_rft.evaluation.class_sets import CLASS_SETS
from qlora_rft.evaluation.exist_map import asked_classes, check_exist_map, read_exist_map
from qlora_rft.evaluation.scoring import score_file
from qlora_rft.tasks import TASKS, detection, get_task, grounding
from qlora_rft.tasks.boxes import Box, Frame

EXCERPT = Path(__file__).parent / "data" / "exist_map_coco_Qwen2_vl_2B_baseline_excerpt.json"
RELEASED = Path(__file__).resolve().parents[2] / "shared" / "data" / "visual-rft-original"  # ../shared beside the repo
ANNOTATIONS = "synthetic:shapes-detection/test_coco.json"
DETECTION = [
    "model.name_or_path=tiny:tiny",
    "data.task=detection",
    "data.max_pixels=12544",
    f"eval.annotations={ANNOTATIONS}",
    "eval.images=synthetic:shapes-detection/images",
    "eval.batch_size=4",
]
# The problem column of a row of the released ViRFT_COCO training set (category 'umbrella'), as the model saw it.
RELEASED_ROW_PROBLEM = (
    "Detect all objects belonging to the category 'umbrella' in the image, and provide the bounding boxes (between 0 "
    "and 1000, integer) and confidence (between 0 and 1, with two decimal places).\nIf no object belonging to the "
    "category 'umbrella' in the image, return 'No Objects'.\nOutput the thinking process in <think> </think> and final "
    "answer in <answer> </answer> tags.The output answer format should be as follows:\n<think> ... </think> "
    "<answer>[{'Position': [x1, y1, x2, y2], 'Confidence': number}, ...]</answer>\nPlease strictly follow the format."
)


def synthetic_coco() -> dict:
    return json.loads(Path(runner.resolve_source(ANNOTATIONS)).read_text())


def write_map(tmp_path: Path, entries: dict) -> Path:
    path = tmp_path / "exist_map.json"
    path.write_text(json.dumps(entries))
    return path


# ----------------------------------------------------------------------------------------------- exist maps


def test_the_excerpt_of_the_released_map_is_read_as_released():
    exist_map = read_exist_map(EXCERPT)
    assert list(exist_map) == ["397133", "37777", "252219", "403385", "461275"]  # string keys, file order
    assert exist_map["403385"] == ["toilet", "sink"] and exist_map["461275"] == []
    fewshot = list(CLASS_SETS["coco_fewshot8"])
    assert {key: asked_classes(names, fewshot) for key, names in exist_map.items()} == {
        "397133": [], "37777": [], "252219": [], "403385": ["toilet"], "461275": []}
    ov15 = list(CLASS_SETS["coco_ov15"])
    assert asked_classes(exist_map["252219"], ov15) == []
    assert asked_classes(exist_map["403385"], ov15) == ["toilet"]


@pytest.mark.skipif(not RELEASED.is_dir(), reason=f"the original's released files are not at {RELEASED}")
def test_the_released_maps_are_read_and_match_the_paper_class_sets():
    lvis_classes = set(CLASS_SETS["lvis_fewshot6"]) | set(CLASS_SETS["lvis_ov13"])
    for folder, images, names in [("coco_evaluation/exist_map_coco", 5000, None),
                                  ("lvis_evaluation/exist_map_lvis", 19809, lvis_classes)]:
        for size in ("2B", "7B"):
            exist_map = read_exist_map(RELEASED / f"{folder}_Qwen2_vl_{size}_baseline.json")
            assert len(exist_map) == images and all(key.isdigit() for key in exist_map)
            listed = {name for found in exist_map.values() for name in found}
            if names is None:  # COCO: the 80 category names as the annotations spell them, the paper's sets among them
                assert len(listed) == 80 and set(CLASS_SETS["coco_ov15"]) <= listed and "dining table" in listed
            else:  # LVIS: only the 15 classes of the two evaluated sets
                assert listed == names
    coco = read_exist_map(RELEASED / "coco_evaluation/exist_map_coco_Qwen2_vl_2B_baseline.json")
    check_exist_map(coco, [397133, 37777], ["person", "toilet"], "coco map", "val2017 subset")  # ids as integers
    with pytest.raises(DataError, match="lists no entry for 1 of the 2 images"):
        check_exist_map(coco, [397133, 1], ["person"], "coco map", "annotations")


def test_a_map_that_does_not_fit_the_annotations_is_refused(tmp_path):
    coco = synthetic_coco()
    ids = [image["id"] for image in coco["images"]]
    names = [c["name"] for c in coco["categories"]]
    with pytest.raises(DataError, match="no image id in common with"):
        check_exist_map(read_exist_map(EXCERPT), ids, names, EXCERPT, "test_coco.json")
    with pytest.raises(DataError, match=r"lists no entry for 1 of the 24 images .* \(e.g. '23'\)"):
        check_exist_map({str(i): [] for i in ids[:-1]}, ids, names, "m.json", "test_coco.json")
    with pytest.raises(DataError, match="names no category of test_coco.json .* 'dining table'"):
        check_exist_map({str(i): ["dining table"] for i in ids}, ids, names, "m.json", "test_coco.json")
    for text, message in [("[1, 2]", "must be a JSON object"), ('{"1": "circle"}', "image '1' must list class names"),
                          ("{", "cannot read class-existence map")]:
        (tmp_path / "bad.json").write_text(text)
        with pytest.raises(DataError, match=message):
            read_exist_map(tmp_path / "bad.json")
    with pytest.raises(DataError, match="not found"):
        read_exist_map(tmp_path / "missing.json")


def test_paper_detection_asks_each_image_its_listed_evaluated_classes(tmp_path):
    coco = synthetic_coco()
    entries = {str(image["id"]): [] for image in coco["images"]}
    entries.update({"0": ["circle", "cross", "hexagon"], "1": ["square", "circle", "square"], "2": ["triangle"]})
    path = write_map(tmp_path, entries)
    cfg = load_config(None, [*DETECTION, "eval.protocol=paper", f"eval.exist_map={path}", "eval.classes=circle,square"])
    items = runner.eval_items(cfg, get_task("detection", "paper"))
    # image 0: circle (cross is not evaluated, hexagon is no category); image 1: square then circle, once each;
    # image 2: triangle is not evaluated; every other image lists nothing: not asked
    assert [it.key for it in items] == ["0|circle", "1|square", "1|circle"]
    assert all(it.example.problem == detection.released_problem(it.record["category"]) for it in items)
    names = {c["id"]: c["name"] for c in coco["categories"]}
    for item in items:  # the ground truth of the class asked, every box of it
        truth = [a for a in coco["annotations"]
                 if a["image_id"] == item.record["image_id"] and names[a["category_id"]] == item.record["category"]]
        assert len(detection.parse_solution(item.example.solution)) == len(truth)


def test_protocol_settings_are_checked_at_load():
    with pytest.raises(ConfigError, match="set eval.exist_map=FILE"):
        load_config(None, [*DETECTION, "eval.protocol=paper"])
    with pytest.raises(ConfigError, match="eval.exist_map is read only under eval.protocol=paper"):
        load_config(None, [*DETECTION, f"eval.exist_map={EXCERPT}"])
    with pytest.raises(ConfigError, match="eval.ask is for eval.protocol=ours"):
        load_config(None, [*DETECTION, "eval.protocol=paper", f"eval.exist_map={EXCERPT}", "eval.ask=present"])
    with pytest.raises(ConfigError, match=r"got 'present_classes' \(eval.protocol=present_classes is now eval.ask=pre"):
        load_config(None, [*DETECTION, "eval.protocol=present_classes"])
    load_config(None, ["data.task=classification", "eval.protocol=paper"])  # no map needed without annotations


# ----------------------------------------------------------------------------------------------- prompts


def test_the_paper_detection_prompt_is_the_released_training_text():
    from transformers import AutoProcessor

    from qlora_rft.data import Example

    from qlora_rft.model import resolve_model_path
    from qlora_rft.prompts import prompt_text

    assert detection.released_problem("umbrella") == RELEASED_ROW_PROBLEM
    # Training on a released row and the paper evaluation build the model's text with the same function.
    processor = AutoProcessor.from_pretrained(str(resolve_model_path("tiny:tiny")))
    task = get_task("detection", "paper")
    training = prompt_text(processor, get_task("detection"), Example(0, RELEASED_ROW_PROBLEM, "", {}).problem)
    assert prompt_text(processor, task, detection.released_problem("umbrella")) == training
    assert RELEASED_ROW_PROBLEM in training and "Find every" not in training


def test_the_paper_lisa_prompt_has_the_original_system_prompt_and_wording():
    from transformers import AutoProcessor

    from qlora_rft.model import resolve_model_path
    from qlora_rft.prompts import messages, prompt_text

    problem = grounding.problem("the thing you would sit on")
    task = get_task("grounding", "paper")
    system = {"role": "system", "content": [{"type": "text", "text": grounding.PAPER_SYSTEM}]}
    assert messages(task, problem)[0] == system
    assert task.ask(problem) == (
        "Output the bounding box in the image corresponding to the instruction: the thing you would sit on. Output the "
        'thinking process in <think> </think> and your grouding box. Following "<think> thinking process </think>\n'
        '<answer>(x1,y1),(x2,y2)</answer>)" format.')
    assert task.ask("a problem written otherwise").startswith("Output the bounding box in the image corresponding "
                                                               "to the instruction: a problem written otherwise. ")
    text = prompt_text(AutoProcessor.from_pretrained(str(resolve_model_path("tiny:tiny"))), task, problem)
    assert text.startswith(f"<|im_start|>system\n{grounding.PAPER_SYSTEM}<|im_end|>\n<|im_start|>user\n")
    assert messages(get_task("grounding"), problem)[0]["role"] == "user"  # ours: the template's default system


# ----------------------------------------------------------------------------------------------- generation


@pytest.mark.parametrize("task,tokens", [("detection", 1024), ("classification", 1024), ("grounding", 128)])
def test_paper_generation_settings_per_task(task, tokens):
    overrides = ["model.name_or_path=tiny:tiny", f"data.task={task}", "data.max_pixels=12544",
                 "data.max_prompt_length=256", "eval.max_new_tokens=7"]
    paper = runner.resolve_asking(load_config(None, [*overrides, "eval.protocol=paper"]), get_task(task, "paper"))
    assert paper == runner.Asking("paper", 3136, 401408, tokens, None, 1.0)  # tiny's processor: 3136..401408
    ours = runner.resolve_asking(load_config(None, overrides), get_task(task))
    assert ours == runner.Asking("ours", 3136, 12544, 7, 256, 1.0)


def test_the_repetition_penalty_is_the_model_folders(tmp_path):
    assert runner.shipped_repetition_penalty(tmp_path) == 1.0  # no generation_config.json
    (tmp_path / "generation_config.json").write_text(
        '{"do_sample": true, "temperature": 0.01, "top_p": 0.001, "top_k": 1, "repetition_penalty": 1.05}')
    assert runner.shipped_repetition_penalty(tmp_path) == 1.05


# ----------------------------------------------------------------------------------------------- LISA reading


def test_lisa_is_read_at_its_first_box_anywhere():
    read = grounding.parse_first_box
    assert read("<think>it is at (100,200),(300,400)</think><answer>(1,2),(3,4)</answer>") == Box(100, 200, 300, 400)
    assert read("no tags: ( 10 , 20 ) , ( 30 , 40 ) then (50,60),(70,80)") == Box(10, 20, 30, 40)
    assert read("<answer>(30,20),(10,40)</answer> (1,2),(3,4)") is None  # the first is invalid: no later one
    assert read("(1.5,2),(3,4)") is None and read("[10,20,30,40]") is None and read("") is None
    assert read("(0,0),(1200,900)") == Box(0, 0, 1200, 900)  # past the image: kept, as the original kept it
    assert read("(64,120),(320,480)", Frame(640, 480)) == Box(100, 250, 500, 1000)
    assert grounding.parse("<think>(100,200),(300,400)</think><answer>(1,2),(3,4)</answer>") == Box(1, 2, 3, 4)
    # IoU by hand: (0,0)-(10,10) against (0,0)-(10,20): 100 / 200
    assert grounding.paper_score("(0,0),(10,10) and more", "<answer>(0,0),(10,20)</answer>") == 0.5
    assert grounding.score("(0,0),(10,10) and more", "<answer>(0,0),(10,20)</answer>") == 0.0  # ours: tags needed


def test_paper_grounding_scores_the_first_box_and_asks_each_image_once(tmp_path):
    from qlora_rft.data import Example

    line = {"id": 1, "completion": "<think>(0,0),(10,10)</think><answer>(0,0),(10,20)</answer>",
            "solution": "<answer>(0,0),(10,20)</answer>"}
    predictions = tmp_path / "predictions.jsonl"
    predictions.write_text(json.dumps(line) + "\n")
    assert score_file("grounding", predictions)["mIoU"] == 100.0
    paper = score_file("grounding", predictions, protocol="paper")
    assert paper["mIoU"] == 50.0 and paper["protocol"] == "paper"

    cells = [{"bytes": None, "path": "/data/a.jpg"}, {"bytes": None, "path": "/data/a.jpg"},
             {"bytes": None, "path": "/data/b.jpg"}, {"bytes": b"png", "path": None}, {"bytes": b"png", "path": None}]
    examples = [Example(i, f"instruction {i}", "", cell) for i, cell in enumerate(cells)]
    assert [ex.index for ex in runner.first_per_image(examples)] == [0, 2, 3, 4]


def test_a_task_without_an_original_evaluation_refuses_the_paper_protocol_at_load():
    with pytest.raises(ConfigError, match="data.task=generic does not have: use eval.protocol=ours"):
        load_config(None, ["data.task=generic", "rewards.weights={format: 1}", "eval.protocol=paper"])
    assert {name: task.paper_max_new_tokens for name, task in TASKS.items()} == {
        "classification": 1024, "detection": 1024, "grounding": 128, "generic": None}


def test_detection_without_an_annotation_file_is_refused_before_anything_is_written(tmp_path, capsys):
    from qlora_rft.cli import main

    out = tmp_path / "eval"
    config = Path(__file__).parent.parent / "configs" / "synthetic_detection.yaml"
    assert main(["eval", str(config), "model.name_or_path=tiny:tiny", "eval.annotations=",
                 f"eval.output_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert "data.task=detection is evaluated against an annotation file: set eval.annotations=FILE" in err
    assert not out.exists() or not any(p.name != ".lock" for p in out.iterdir())


# ----------------------------------------------------------------------------------------------- end to end


def test_qlora_rft_eval_protocol_paper_end_to_end(tmp_path, capsys, monkeypatch):
    from qlora_rft.cli import main

    # 1024 tokens from a random tiny model take minutes on a CPU; the per-task lengths are checked above
    monkeypatch.setitem(TASKS, "detection", dataclasses.replace(TASKS["detection"], paper_max_new_tokens=16))

    coco = synthetic_coco()
    entries = {str(image["id"]): [] for image in coco["images"]}
    entries.update({"3": ["square", "dining table"], "5": ["circle", "cross"]})
    path = write_map(tmp_path, entries)
    out = tmp_path / "eval"
    config = Path(__file__).parent.parent / "configs" / "synthetic_detection.yaml"
    args = ["eval", str(config), "model.name_or_path=tiny:tiny", *DETECTION[2:],
            "eval.batch_size=3", f"eval.output_dir={out}"]
    assert main([*args, "eval.protocol=paper", f"eval.exist_map={path}", "eval.limit=2"]) == 0
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [(r["image_id"], r["category"]) for r in rows] == [(3, "square"), (5, "circle")]
    info = json.loads((out / "eval_info.json").read_text())
    assert info["protocol"] == "paper" and info["exist_map"] == str(path)
    assert (info["max_new_tokens"], info["min_pixels"], info["max_pixels"], info["max_prompt_length"]) == (
        16, 3136, 401408, None)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["protocol"] == "paper" and metrics["num_predictions"] == 2 and "mAP" in metrics

    # score reads the protocol from eval_info.json and reproduces the metrics; a resume under ours is refused
    assert main(["score", "detection", "--predictions", str(out / "predictions.jsonl"), "--annotations",
                 runner.resolve_source(ANNOTATIONS), "--classes", "all", "--out", str(tmp_path / "m.json")]) == 0
    assert json.loads((tmp_path / "m.json").read_text()) == metrics
    assert main([*args, "eval.limit=2"]) == 2
    assert "holds predictions of another evaluation (protocol 'paper' -> 'ours'" in capsys.readouterr().err
    with pytest.raises(UserError, match="exist_map .* -> None"):
        runner.check_resumable(out, {**info, "exist_map": None})


def test_an_eval_folder_written_before_eval_ask_resumes_as_ours(tmp_path):
    (tmp_path / "predictions.jsonl").write_text("")
    (tmp_path / "eval_info.json").write_text(json.dumps({"protocol": "present_classes", "max_new_tokens": 8}))
    runner.check_resumable(tmp_path, {"protocol": "ours", "ask": "present", "max_new_tokens": 8})
    with pytest.raises(UserError, match="ask 'present' -> 'all'"):
        runner.check_resumable(tmp_path, {"protocol": "ours", "ask": "all", "max_new_tokens": 8})
