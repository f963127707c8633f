"""train.report_to: TensorBoard event files and an offline W&B run hold every metrics.jsonl value at its step, the
config and the completion samples; a tracker whose package is missing is one line naming the extra."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from qlora_rft import trackers
from qlora_rft.cli import main
from qlora_rft.config import load_config
from qlora_rft.errors import ConfigError
from qlora_rft.rewards import RewardSet
from qlora_rft.runlog import RunLogger, read_metrics
from qlora_rft.trackers import TensorBoard, Trackers
from qlora_rft.trainer import fit

LINES = [{"step": 1, "loss": 0.25, "reward": 1.5, "kl": math.nan, "eval/accuracy": 12.5, "rewards/format": 1.0},
         {"step": 2, "loss": -0.125, "reward": 0.75, "kl": 0.5, "rewards/format": 0.0}]


def _tensorboard(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


def _scalars(events) -> dict[str, dict[int, float]]:
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def _hparams(events) -> dict:
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    values = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    return {key: value.WhichOneof("kind") and getattr(value, value.WhichOneof("kind")) for key, value in values.items()}


def _expected(lines: list[dict]) -> dict[str, dict[int, float]]:
    """metrics.jsonl values as a tracker should hold them: every finite number, by name and step."""
    out: dict[str, dict[int, float]] = {}
    for line in lines:
        for key, value in trackers.scalars(line).items():
            out.setdefault(key, {})[line["step"]] = value
    return out


def _wandb_records(path: Path):
    """The records of a W&B transaction log (run-ID.wandb): a 7-byte header (":W&B", magic, version), then LevelDB
    log blocks of 32 KiB, each record a 4-byte checksum, a 2-byte length, a 1-byte type (1 whole, 2 first,
    3 middle, 4 last piece) and its bytes; a block's tail shorter than a record header is padding."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pieces = 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        pieces += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            pieces = b""
            yield record


def _wandb_history(path: Path) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for record in _wandb_records(path):
        if record.WhichOneof("record_type") == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            for key, value in row.items():
                if not key.startswith(("_", "completions/")) and isinstance(value, (int, float)):  # not the table
                    out.setdefault(key, {})[row["_step"]] = value
    return out


def _wandb_config(path: Path) -> dict:
    runs = [r.run for r in _wandb_records(path) if r.WhichOneof("record_type") == "run"]
    return {item.key: json.loads(item.value_json) for item in runs[0].config.update}


@pytest.fixture
def fresh_wandb():
    """W&B reads its environment once per process (a singleton): start and end each test with a new one."""
    import wandb

    wandb.teardown()
    yield
    wandb.teardown()


def test_the_run_logger_writes_metrics_lines_and_text_to_tensorboard(tmp_path):
    folder = tmp_path / "tensorboard"
    board = Trackers([TensorBoard(folder, {"train": {"learning_rate": 0.01, "report_to": ["tensorboard"]}}, 0)])
    with RunLogger(tmp_path / "metrics.jsonl", 2, trackers=board) as logger:
        for line in LINES:
            logger.log(line)
        logger.samples(2, [{"prompt": "shape?", "completion": "<answer>a|b</answer>", "reward": 1.0}])
        logger.log({"step": 3, "loss": 9.0}, write=False)  # a line not written is not reported either

    events = _tensorboard(folder)
    assert _scalars(events) == {"loss": {1: 0.25, 2: -0.125}, "reward": {1: 1.5, 2: 0.75}, "kl": {2: 0.5},
                                "eval/accuracy": {1: 12.5}, "rewards/format": {1: 1.0, 2: 0.0}}  # exact in float32
    assert _hparams(events) == {"train.learning_rate": 0.01, "train.report_to": "['tensorboard']"}
    text = events.Tensors("completions/text_summary")
    assert [t.step for t in text] == [2]
    assert text[0].tensor_proto.string_val[0].decode() == (
        "| prompt | completion | reward |\n|---|---|---|\n| shape? | <answer>a\\|b</answer> | 1.0 |")
    samples = [json.loads(line) for line in (tmp_path / "completions.jsonl").read_text().splitlines()]
    assert samples == [{"step": 2, "prompt": "shape?", "completion": "<answer>a|b</answer>", "reward": 1.0}]


def test_a_grpo_run_reports_to_tensorboard_and_offline_wandb(tiny_overrides, tmp_path, monkeypatch, fresh_wandb):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):  # the user's folders stay untouched
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name))
    monkeypatch.setattr(RewardSet, "score", lambda rewards, texts, columns, frame=None, row=None:  # some spread
                        {name: [float(k % 2) for k in range(len(texts))] for name in rewards.weights})
    out = Path(load_config(None, tiny_overrides).train.output_dir)
    fit(load_config(None, [*tiny_overrides, "train.report_to=tensorboard,wandb", "train.log_completions=1",
                           "train.eval_steps=2", "data.eval=synthetic:shapes", "eval.limit=2",
                           "eval.max_new_tokens=4"]))
    lines = read_metrics(out / "metrics.jsonl")
    expected = _expected(lines)
    assert {"loss", "reward", "kl", "rewards/format", "eval/accuracy", "eval/num_predictions"} <= expected.keys()
    assert expected["eval/num_predictions"] == {2: 2.0}

    events = _tensorboard(out / "tensorboard")
    board = _scalars(events)
    assert board.keys() == expected.keys()
    for key, values in expected.items():
        assert board[key] == pytest.approx(values, rel=1e-6), key  # TensorBoard stores float32
    hparams = _hparams(events)
    assert hparams["train.learning_rate"] == pytest.approx(0.01) and hparams["data.task"] == "classification"
    assert [t.step for t in events.Tensors("completions/text_summary")] == [1, 2]
    samples = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [1, 1, 1, 1, 2, 2, 2, 2]  # G = 4 completions of the first prompt
    assert [s["rewards/format"] for s in samples[:4]] == [0.0, 1.0, 0.0, 1.0]
    assert [s["reward"] for s in samples[:4]] == [0.0, 2.0, 0.0, 2.0]  # format + classification, weights 1
    assert [s["advantage"] > 0 for s in samples[:4]] == [False, True, False, True]
    assert {"prompt", "solution", "completion", "rewards/format", "rewards/classification", "advantage"} <= \
        samples[0].keys()

    logs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(logs) == 1
    history = _wandb_history(logs[0])
    assert history.keys() == expected.keys()
    for key, values in expected.items():
        assert history[key] == pytest.approx(values, rel=1e-12), key  # W&B keeps float64: the values themselves
    config = _wandb_config(logs[0])
    assert config["train"]["report_to"] == ["tensorboard", "wandb"] and config["train"]["learning_rate"] == 0.01
    tables = list(logs[0].parent.glob("files/media/table/completions_*.table.json"))
    assert len(tables) == 2  # steps 1 and 2


def test_a_missing_tracker_package_is_one_line_naming_the_extra(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(trackers, "find_spec", lambda name: None)
    code = main(["train", "configs/tiny_demo.yaml", "train.report_to=wandb", f"train.output_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("error: train.report_to=wandb needs the wandb package: pip install 'qlora-rft[wandb]'")
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_wandb_without_an_account_or_offline_mode_says_what_to_set(tmp_path, monkeypatch, fresh_wandb):
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc, no W&B settings: no key anywhere
    for name in ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name))
    with pytest.raises(ConfigError, match="W&B did not start .*set WANDB_MODE=offline"):
        trackers.WandB(tmp_path / "run", {}, 0)


@pytest.mark.parametrize("value,message", [
    ("mlflow", "train.report_to=mlflow: choose among none, tensorboard, wandb"),
    ("none,wandb", "none cannot be combined"),
])
def test_report_to_names_known_trackers_only(value, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [f"train.report_to={value}"])


def test_a_resumed_run_replaces_tensorboard_events_past_its_checkpoint(tmp_path):
    first = TensorBoard(tmp_path, {"train": {"seed": 0}}, 0)
    for step in (1, 2, 3):
        first.log({"loss": float(step)}, step)  # steps 2 and 3 were written after checkpoint-1, then a crash
    first.close()
    resumed = TensorBoard(tmp_path, {"train": {"seed": 0}}, 1)
    for step in (2, 3):
        resumed.log({"loss": 10.0 * step}, step)
    resumed.close()
    events = _tensorboard(tmp_path).Scalars("loss")
    assert [(e.step, e.value) for e in events] == [(1, 1.0), (2, 20.0), (3, 30.0)]  # the crashed run's 2, 3 purged
