"""Sweeps: the grid's settings, each trained and evaluated, a results table, and finished settings skipped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qlora_rft.errors import ConfigError
from qlora_rft.sweep import parse_grid, run_sweep


def test_grid_is_the_cartesian_product_in_order():
    settings = parse_grid(["train.method=grpo,sft", "lora.r=4,8"])
    assert [s.name for s in settings] == [
        "train.method=grpo,lora.r=4", "train.method=grpo,lora.r=8", "train.method=sft,lora.r=4",
        "train.method=sft,lora.r=8",
    ]
    with pytest.raises(ConfigError, match="section.key=v1,v2"):
        parse_grid(["method"])


def test_sweep_trains_evaluates_tabulates_and_skips_finished_settings(tiny_overrides, tmp_path, monkeypatch):
    import qlora_rft.trainer as trainer

    out = tmp_path / "sweep"
    overrides = [*tiny_overrides, "eval.limit=4", "eval.max_new_tokens=6", "train.save_steps=0"]
    result = run_sweep(None, ["train.method=grpo,sft"], out=out, overrides=overrides)
    assert [r.setting for r in result.rows] == ["base", "train.method=grpo", "train.method=sft"]
    assert all(r.metric == "accuracy" for r in result.rows)
    table = result.table.read_text()
    assert "| train.method=sft |" in table and "| base |" in table
    assert result.csv.read_text().splitlines()[0] == "setting,metric,value,steps,train_seconds"
    assert result.plot.read_bytes()[:4] == b"\x89PNG"

    calls = []
    monkeypatch.setattr(trainer, "fit", lambda *a, **k: calls.append(a))
    again = run_sweep(None, ["train.method=grpo,sft"], out=out, overrides=overrides)
    assert calls == [] and [r.value for r in again.rows] == [r.value for r in result.rows]


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["qwen2.5-vl-tiny", "qwen3-vl-tiny"])  # tiny (Qwen2-VL): the test above
def test_a_sweep_of_two_settings_runs_on_every_family(preset, tiny_overrides, tmp_path):
    from qlora_rft.models import family_of
    from qlora_rft.tiny import PRESETS

    out = tmp_path / "sweep"
    overrides = [*tiny_overrides, f"model.name_or_path=tiny:{preset}", "train.max_steps=1", "train.save_steps=0",
                 "eval.limit=2", "eval.max_new_tokens=6"]
    result = run_sweep(None, ["train.method=grpo,sft"], out=out, overrides=overrides)
    assert [(r.setting, r.steps) for r in result.rows] == [("base", 0), ("train.method=grpo", 1),
                                                           ("train.method=sft", 1)]
    assert all(r.metric == "accuracy" and 0 <= r.value <= 100 for r in result.rows)
    bases = {json.loads((out / s / "train" / "train_summary.json").read_text())["base"]
             for s in ("train.method=grpo", "train.method=sft")}
    assert [family_of(Path(b)).name for b in bases] == [PRESETS[preset][0].name]  # one base, of the family
    assert (out / "base" / "eval" / "metrics.json").is_file() and "| train.method=sft |" in result.table.read_text()


def test_a_setting_whose_final_save_ran_out_of_space_is_trained_again(tiny_overrides, tmp_path, monkeypatch):
    """adapter/ appears whole or not at all, after train_summary.json: a setting that failed while saving it has
    none, and the next sweep trains it again (afresh: with train.save_steps=0 it left metrics but no checkpoint)."""
    import errno

    from transformers import ProcessorMixin

    from qlora_rft.errors import OutputError

    real_save = ProcessorMixin.save_pretrained

    def full_disk(self, folder, *args, **kwargs):  # the last write of the adapter folder fails
        if Path(folder).name.startswith(".adapter.new-"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, folder, *args, **kwargs)

    monkeypatch.setattr(ProcessorMixin, "save_pretrained", full_disk)
    out = tmp_path / "sweep"
    overrides = [*tiny_overrides, "eval.limit=2", "eval.max_new_tokens=6", "train.save_steps=0"]
    with pytest.raises(OutputError, match=r"no space left .* the final adapter/ in .*; no checkpoint was written"):
        run_sweep(None, ["train.method=grpo"], out=out, overrides=overrides)
    train_dir = out / "train.method=grpo" / "train"
    assert sorted(p.name for p in train_dir.iterdir()) == [".lock", "config.yaml", "metrics.jsonl",
                                                           "train_summary.json"]
    monkeypatch.undo()
    result = run_sweep(None, ["train.method=grpo"], out=out, overrides=overrides)
    assert [r.setting for r in result.rows] == ["base", "train.method=grpo"]
    assert (train_dir / "adapter" / "adapter_model.safetensors").is_file()
