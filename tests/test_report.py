"""`make_report` on fake run folders: training plots, per-evaluation markdown and charts, the comparison table."""

from __future__ import annotations

import json
import math

import pytest
from PIL import Image

from qlora_rft.cli import main
from qlora_rft.errors import OutputError, UserError
from qlora_rft.evaluation.report import Report, make_report, moving_average

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TRAIN_PNGS = ("rewards.png", "kl.png", "entropy.png", "completion_length.png", "tokens_per_second.png")


def metrics_lines(steps: int = 20) -> list[dict]:
    lines = []
    for step in range(1, steps + 1):
        lines.append({
            "step": step, "loss": 0.1, "reward": 0.1 * step, "reward_std": 0.2, "kl": 0.01 * step,
            "clip_ratio": 0.0, "completion_length": 30.0 + step, "skipped_groups": 0.0, "grad_norm": 1.0,
            "learning_rate": 1e-5, "tokens_per_second": 100.0 + step, "step_seconds": 2.0,
            "elapsed_seconds": 2.0 * step, "rewards/format": 0.5 + 0.01 * step, "rewards/iou": 0.05 * step,
            "entropy": 2.0 - 0.05 * step, "sampling/kl": 1e-4,
        })
    lines[6]["kl"] = None  # the logger writes non-finite values as null
    lines[19]["reward"] = math.nan  # the last reward: the summary's "last" must skip it
    return lines


def write_metrics(path, lines) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(line) + "\n" for line in lines)
    path.write_text(text + '{"step": 21, "reward": 0.')  # a last line cut by a crash


def write_eval(folder, metrics: dict, info: dict | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(json.dumps(metrics))
    if info is not None:
        (folder / "eval_info.json").write_text(json.dumps(info))


def assert_png(path) -> None:
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == PNG_SIGNATURE, path
    with Image.open(path) as image:
        image.verify()


@pytest.fixture
def full_run(tmp_path):
    write_metrics(tmp_path / "metrics.jsonl", metrics_lines())
    write_eval(
        tmp_path / "eval_base",
        {"task": "detection", "mAP": 31.25, "per_class": {"circle": 40.0, "square": None, "triangle": 22.5},
         "num_predictions": 24, "skipped": 2},
        {"label": "base", "model": "Qwen/Qwen2-VL-2B-Instruct", "adapter": None},
    )
    # "eval_adapter" sorts before "eval_base": the report must still put base first
    write_eval(
        tmp_path / "eval_adapter",
        {"task": "detection", "mAP": 42.5, "per_class": {"circle": 55.5, "square": 20.0, "triangle": 30.0},
         "num_predictions": 24, "skipped": 0},
        {"label": "adapter", "model": "Qwen/Qwen2-VL-2B-Instruct", "adapter": "runs/train/adapter"},
    )
    return tmp_path


def test_full_run_writes_plots_and_summary(full_run):
    report = make_report(full_run)
    assert isinstance(report, Report)
    assert report.folder == full_run / "report"
    assert report.summary == report.folder / "summary.md" and report.summary in report.files
    names = {p.name for p in report.files}
    expected_pngs = {*TRAIN_PNGS, "per_class_base.png", "per_class_adapter.png"}
    assert expected_pngs | {"eval_base.md", "eval_adapter.md", "summary.md"} == names
    for name in expected_pngs:
        assert_png(report.folder / name)
        assert f"]({name})" in report.summary.read_text()  # linked with a relative path


def test_summary_compares_base_and_adapter(full_run):
    summary = make_report(full_run).summary.read_text()
    assert "| metric | base | adapter | Δ (adapter − base) |" in summary
    assert "| mAP | 31.25 | 42.50 | +11.25 |" in summary
    assert "| num_predictions | 24 | 24 | +0 |" in summary
    assert "| skipped | 2 | 0 | -2 |" in summary
    assert "| AP circle | 40.00 | 55.50 | +15.50 |" in summary
    assert "| AP square | n/a | 20.00 | n/a |" in summary
    assert "| AP triangle | 22.50 | 30.00 | +7.50 |" in summary
    assert "[base](eval_base.md)" in summary and "[adapter](eval_adapter.md)" in summary
    # training table: the NaN reward and the null kl are skipped, the cut last line ignored
    assert "20 logged steps, last step 20" in summary
    assert "| reward | 0.1 | 1.9 | 1.9 |" in summary
    assert "| kl | 0.01 | 0.2 | 0.2 |" in summary
    assert "| rewards/iou | 0.05 | 1 | 1 |" in summary
    assert "| entropy | 1.95 | 1 | 1.95 |" in summary and "| sampling/kl | 0.0001 | 0.0001 | 0.0001 |" in summary


def test_evaluation_markdown(full_run):
    make_report(full_run)
    base = (full_run / "report" / "eval_base.md").read_text()
    assert "# Evaluation: base" in base
    assert "- task: detection" in base and "- **mAP**: 31.25 %" in base
    assert "- num_predictions: 24" in base and "- skipped: 2" in base
    assert "| square | n/a |" in base and "| circle | 40.00 |" in base
    assert "![per-class AP](per_class_base.png)" in base
    assert "- adapter: runs/train/adapter" in (full_run / "report" / "eval_adapter.md").read_text()


def test_metrics_only_run_skips_missing_and_null_curves(tmp_path):
    lines = metrics_lines()
    for line in lines:
        line["kl"] = line["sampling/kl"] = None
        del line["tokens_per_second"], line["entropy"]
    write_metrics(tmp_path / "train" / "metrics.jsonl", lines)
    report = make_report(tmp_path)
    assert {p.name for p in report.files} == {"rewards.png", "completion_length.png", "summary.md"}
    assert_png(report.folder / "rewards.png")
    summary = report.summary.read_text()
    assert "`train/metrics.jsonl`: 20 logged steps" in summary
    assert "Evaluations" not in summary and "kl.png" not in summary


def test_empty_folder_raises_user_error(tmp_path):
    with pytest.raises(UserError, match="metrics.jsonl.*metrics.json"):
        make_report(tmp_path)
    assert not (tmp_path / "report").exists()


def test_missing_folder_raises_user_error(tmp_path):
    with pytest.raises(UserError, match="not a folder"):
        make_report(tmp_path / "nope")


def test_classification_eval_in_run_dir_itself(tmp_path):
    run = tmp_path / "cls_eval"
    write_eval(run, {"task": "classification", "accuracy": 87.5, "num_predictions": 40, "skipped": 0})
    report = make_report(run)
    assert {p.name for p in report.files} == {"eval_cls_eval.md", "summary.md"}  # label: the folder name
    assert not list(report.folder.glob("per_class_*.png"))
    text = (report.folder / "eval_cls_eval.md").read_text()
    assert "- task: classification" in text and "- **accuracy**: 87.50 %" in text and "Per-class" not in text
    summary = report.summary.read_text()
    assert "[cls_eval](eval_cls_eval.md)" in summary and "## Comparison" not in summary


def test_three_evaluations_have_no_delta_column(tmp_path):
    for name, miou in (("eval_a", 50.0), ("eval_b", 60.0), ("eval_c", 70.0)):
        write_eval(tmp_path / name, {"task": "grounding", "mIoU": miou, "acc@0.5": miou + 5, "num_predictions": 9})
    summary = make_report(tmp_path).summary.read_text()
    assert "| metric | eval_a | eval_b | eval_c |" in summary and "Δ" not in summary
    assert "| mIoU | 50.00 | 60.00 | 70.00 |" in summary
    assert "| acc@0.5 | 55.00 | 65.00 | 75.00 |" in summary


def test_all_null_per_class_has_no_chart(tmp_path):
    write_eval(tmp_path, {"task": "detection", "mAP": 0.0, "per_class": {"circle": None}}, {"label": "base"})
    report = make_report(tmp_path)
    assert not (report.folder / "per_class_base.png").exists()
    assert "| circle | n/a |" in (report.folder / "eval_base.md").read_text()


def test_bad_metrics_json_raises_user_error(tmp_path):
    (tmp_path / "eval_x").mkdir()
    (tmp_path / "eval_x" / "metrics.json").write_text('{"task": ')
    with pytest.raises(UserError, match="not valid JSON"):
        make_report(tmp_path)


def test_moving_average():
    assert moving_average([1.0, 2.0, 3.0, 4.0], 2) == [1.0, 1.5, 2.5, 3.5]
    assert moving_average([5.0], 3) == [5.0]


def test_evaluation_during_training_is_plotted_beside_the_reward(tmp_path):
    lines = metrics_lines()
    for line, accuracy in zip(lines[4::5], (20.0, 35.0, 30.0, 50.0)):  # train.eval_steps=5: steps 5, 10, 15, 20
        line.update({"eval/accuracy": accuracy, "eval/num_predictions": 40, "eval/skipped": 0})
    write_metrics(tmp_path / "metrics.jsonl", lines)
    report = make_report(tmp_path)
    with Image.open(report.folder / "rewards.png") as image:
        assert image.size == (1400, 400)  # two 7x4 inch panels at 100 dpi: reward, then the evaluation
    with Image.open(report.folder / "entropy.png") as image:
        assert image.size == (700, 400)
    summary = report.summary.read_text()
    assert "| eval/accuracy | 20 | 50 | 50 |" in summary  # first, last, max
    assert "eval/num_predictions" not in summary  # counts are not plotted as percentages


def test_a_run_without_evaluation_keeps_one_reward_panel(tmp_path):
    write_metrics(tmp_path / "metrics.jsonl", metrics_lines())
    with Image.open(make_report(tmp_path).folder / "rewards.png") as image:
        assert image.size == (700, 400)


def test_a_new_report_replaces_the_old_one_whole(full_run):
    make_report(full_run)
    (full_run / "eval_adapter" / "metrics.json").unlink()  # that evaluation is gone: so are its files
    report = make_report(full_run)
    names = sorted(p.name for p in report.folder.iterdir())
    assert names == sorted(p.name for p in report.files)
    assert "eval_adapter.md" not in names and "per_class_adapter.png" not in names
    assert sorted(p.name for p in full_run.iterdir()) == ["eval_adapter", "eval_base", "metrics.jsonl", "report"]


def test_a_report_folder_holding_other_files_is_refused_and_kept(full_run):
    make_report(full_run)
    before = {p.name: p.read_bytes() for p in (full_run / "report").iterdir()}
    (full_run / "report" / "notes.txt").write_text("keep")
    with pytest.raises(OutputError, match="not empty .*notes.txt"):
        make_report(full_run)
    after = {p.name: p.read_bytes() for p in (full_run / "report").iterdir()}
    assert after == {**before, "notes.txt": b"keep"}


def test_a_report_file_or_an_input_as_the_folder_is_refused(full_run):
    (full_run / "report").write_text("mine")
    with pytest.raises(OutputError, match="is a file"):
        make_report(full_run)
    assert (full_run / "report").read_text() == "mine"
    for out in (full_run / "eval_base", full_run):
        with pytest.raises(OutputError, match="would write over the input"):
            make_report(full_run, out)
    assert sorted(p.name for p in (full_run / "eval_base").iterdir()) == ["eval_info.json", "metrics.json"]


def test_report_out_elsewhere(full_run, tmp_path_factory, capsys):
    out = tmp_path_factory.mktemp("elsewhere") / "r"
    assert main(["report", str(full_run), "--out", str(out)]) == 0
    assert "report in" in capsys.readouterr().out
    assert (out / "summary.md").is_file() and (out / "eval_base.md").is_file()
    assert not (full_run / "report").exists()
