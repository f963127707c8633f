"""Sweeps: the grid's settings, each trained and evaluated, a results table, and finished settings skipped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rich.console import Console

from qlora_rft.errors import ConfigError
from qlora_rft.sweep import SweepRow, _write_results, parse_grid, run_sweep, summarise


def test_grid_is_the_cartesian_product_in_order():
    settings = parse_grid(["train.method=grpo,sft", "lora.r=4,8"])
    assert [s.name for s in settings] == [
        "train.method=grpo,lora.r=4", "train.method=grpo,lora.r=8", "train.method=sft,lora.r=4",
        "train.method=sft,lora.r=8",
    ]
    with pytest.raises(ConfigError, match="section.key=v1,v2"):
        parse_grid(["method"])


def test_settings_that_differ_only_by_seed_share_a_group():
    settings = parse_grid(["train.seed=0,1", "train.method=grpo,sft"])
    assert [s.group for s in settings] == ["train.method=grpo", "train.method=sft"] * 2
    assert [s.group for s in parse_grid(["train.seed=3,4"])] == ["", ""]


def test_summary_over_seeds_by_hand():
    """Mean, sample standard deviation (n - 1), min and max of each group, groups in order of first appearance."""
    rows = [SweepRow("a,train.seed=0", "accuracy", 0.2, 10, 4.0, "a", 0),
            SweepRow("b,train.seed=0", "accuracy", 0.5, 10, None, "b", 0),
            SweepRow("a,train.seed=1", "accuracy", 0.4, 10, 6.0, "a", 1),
            SweepRow("a,train.seed=2", "accuracy", 0.6, 12, 8.0, "a", 2)]
    a, b = summarise(rows)
    assert (a.setting, a.runs, a.seeds, a.values) == ("a", 3, [0, 1, 2], [0.2, 0.4, 0.6])
    assert a.mean == pytest.approx(0.4) and a.sd == pytest.approx(0.2)  # sqrt((0.04 + 0 + 0.04) / 2)
    assert (a.low, a.high, a.steps, a.train_seconds) == (0.2, 0.6, 12, 6.0)
    assert (b.setting, b.runs, b.mean, b.sd, b.train_seconds) == ("b", 1, 0.5, None, None)


def test_results_table_over_seeds_and_with_one_seed(tmp_path):
    seeded = [SweepRow("base-0", "accuracy", 24.0, 0, None, "base", 0),
              SweepRow("base-1", "accuracy", 26.0, 0, None, "base", 1),
              SweepRow("train.method=grpo,train.seed=0", "accuracy", 30.0, 60, 100.0, "train.method=grpo", 0),
              SweepRow("train.method=grpo,train.seed=1", "accuracy", 34.0, 60, 110.0, "train.method=grpo", 1)]
    result = _write_results(tmp_path / "seeded", seeded, Console(quiet=True))
    assert result.table.read_text().splitlines() == [
        "| setting | accuracy (%) mean | sd | min | max | seeds | steps | train seconds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        "| base | 25.00 | 1.41 | 24.00 | 26.00 | 0,1 | 0 |  |",  # sd: sqrt(2)
        "| train.method=grpo | 32.00 | 2.83 | 30.00 | 34.00 | 0,1 | 60 | 105 |",  # sd: sqrt(8)
    ]
    assert len(result.csv.read_text().splitlines()) == 1 + 4  # one line per run
    assert result.plot.read_bytes()[:4] == b"\x89PNG"

    single = [SweepRow("base", "accuracy", 24.5, 0, None, "base", 0),
              SweepRow("train.method=grpo", "accuracy", 31.0, 60, 190.0, "train.method=grpo", 0)]
    result = _write_results(tmp_path / "single", single, Console(quiet=True))
    assert result.table.read_text().splitlines() == [
        "| setting | accuracy (%) | steps | train seconds |", "|---|---:|---:|---:|",
        "| base | 24.50 | 0 |  |", "| train.method=grpo | 31.00 | 60 | 190 |",
    ]


@pytest.mark.slow
def test_a_seed_axis_is_trained_per_seed_and_summarised_per_setting(tiny_overrides, tmp_path):
    """2 seeds x 1 method, each seed with its own warm-up: two bases and two adapters, one row each."""
    out = tmp_path / "sweep"
    overrides = [*tiny_overrides, "eval.limit=4", "eval.max_new_tokens=6", "train.save_steps=0", "warmup.steps=2",
                 "warmup.batch_size=2"]
    result = run_sweep(None, ["train.method=sft", "train.seed=0,1"], out=out, overrides=overrides)
    assert [r.setting for r in result.rows] == ["base-0", "base-1", "train.method=sft,train.seed=0",
                                                "train.method=sft,train.seed=1"]
    assert [(s.setting, s.runs, s.seeds) for s in result.settings] == [("base", 2, [0, 1]),
                                                                       ("train.method=sft", 2, [0, 1])]
    trained = result.settings[1]
    assert trained.mean == pytest.approx((result.rows[2].value + result.rows[3].value) / 2)
    assert trained.steps == 2 and trained.sd is not None
    table = result.table.read_text().splitlines()
    assert table[0].startswith("| setting | accuracy (%) mean | sd | min | max | seeds |")
    assert table[3].startswith("| train.method=sft | ") and "| 0,1 | 2 |" in table[3]
    bases = [json.loads((out / name / "train" / "train_summary.json").read_text())["base"]
             for name in ("train.method=sft,train.seed=0", "train.method=sft,train.seed=1")]
    assert bases[0] != bases[1]  # each seed warmed its own base


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


def test_a_folder_of_other_files_is_refused_and_a_sweeps_own_is_not(tmp_path):
    from qlora_rft.errors import OutputError
    from qlora_rft.sweep import sweep_outputs

    out = tmp_path / "sweep"
    (out / "train.method=sft").mkdir(parents=True)
    (out / "base").mkdir()
    (out / "results.md").write_text("")
    assert sorted(sweep_outputs(out)) == sorted(["results.md", "results.csv", "results.png", "report",
                                                 "train.method=sft", "base"])
    (out / "notes.txt").write_text("keep")
    with pytest.raises(OutputError, match=f"--out {out} is not empty .it holds notes.txt."):
        run_sweep("configs/tiny_demo.yaml", ["train.method=grpo,sft"], out=out)
    assert (out / "notes.txt").read_text() == "keep"
