"""The benchmark harness: both sides (ours, TRL's GRPOTrainer) run one tiny step each and the JSON is complete."""

from __future__ import annotations

import json

import pytest

from qlora_rft.bench import run_bench


def test_run_bench_tiny_writes_both_sides(tmp_path):
    out = tmp_path / "b.json"
    report = run_bench("tiny", steps=1, out=out, num_generations=4, max_completion_length=8, sampling_weights="int8")

    assert out.is_file()
    assert json.loads(out.read_text()) == report
    for side in ("ours", "trl"):
        r = report[side]
        assert r["step_seconds"] > 0
        assert r["generation_tokens_per_second"] > 0
        assert r["peak_memory_bytes"] > 0
        assert r["peak_memory_kind"] in ("cuda_max_allocated", "cpu_peak_rss")
        assert len(r["step_seconds_all"]) == 2  # the warm-up step and the measured one
        assert r["completion_length"] == pytest.approx(8)  # EOS ignored on both sides: fixed lengths
        assert r["decode_weight_bytes"] > 0 and r["rows_per_decode_step"] == 4
        assert r["bandwidth_fraction"] is None  # no memory bandwidth figure for a CPU
    assert report["ours"]["sampling"]["weights"] == "int8" and report["ours"]["sampling"]["decode"] == "static"
    assert report["ratio"] == pytest.approx(report["ours"]["step_seconds"] / report["trl"]["step_seconds"])
    assert {"torch", "transformers", "trl", "peft", "bitsandbytes", "qlora_rft"} <= set(report["versions"])
    settings = report["settings"]
    assert settings["preset"] == "tiny" and settings["num_generations"] == 4 and settings["steps"] == 1
    assert settings["max_completion_length"] == settings["min_completion_length"] == 8
    assert settings["beta"] == 0.04 and settings["lora_r"] == 16 and settings["lora_alpha"] == 32
    assert settings["visual_tokens_per_prompt"] == 9  # at most 84x84 pixels: 3 x 3 merged 28x28 patches
    assert "--sampling-weights int8" in report["command"]
    assert report["command"].startswith("qlora-rft bench --preset tiny --compare trl --steps 1")
    assert report["device"] and report["date"]


def test_run_bench_refuses_unknown_comparison_and_modes(tmp_path):
    from qlora_rft.errors import UserError

    with pytest.raises(UserError):
        run_bench("tiny", compare="verl", out=tmp_path / "b.json")
    with pytest.raises(UserError, match="--sampling-weights 'int4'"):
        run_bench("tiny", out=tmp_path / "b.json", sampling_weights="int4")


def test_bandwidth_figures_by_device_name():
    from qlora_rft.bench import bandwidth_fraction, memory_bandwidth

    assert memory_bandwidth("NVIDIA H100 PCIe") == 2.0e12 and memory_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12
    side = {"decode_weight_bytes": 15e9, "generation_tokens_per_second": 287.0, "rows_per_decode_step": 8}
    assert bandwidth_fraction(side, 3.35e12) == pytest.approx(15e9 * 287 / 8 / 3.35e12)  # ~0.16
    assert bandwidth_fraction(side, None) is None
