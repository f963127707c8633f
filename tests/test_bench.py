"""The benchmark harness: both sides (ours, TRL's GRPOTrainer) run one tiny step each and the JSON is complete, for
every model family."""

from __future__ import annotations

import json

import pytest

from qlora_rft.bench import run_bench


def test_run_bench_tiny_writes_both_sides(tmp_path):
    out = tmp_path / "b.json"
    report = run_bench("tiny", steps=1, out=out, num_generations=4, max_completion_length=8, sampling_weights="int8")
    assert json.loads(out.read_text()) == report
    _check_report(report, "tiny", visual_tokens=9)  # at most 84x84 pixels: 3 x 3 merged 28x28 patches
    assert {"torch", "transformers", "trl", "peft", "bitsandbytes", "qlora_rft"} <= set(report["versions"])
    assert report["device"] and report["date"]


# Qwen3-VL: 32-pixel image tokens, so 84x84 pixels at most leave a 64x64 image, 2 x 2 merged patches.
@pytest.mark.slow
@pytest.mark.parametrize("preset, visual_tokens", [("qwen2.5-vl-tiny", 9), ("qwen3-vl-tiny", 4)])
def test_the_bench_command_runs_both_sides_on_every_family(preset, visual_tokens, tmp_path, capsys):
    """`qlora-rft bench --preset P`: TRL's GRPOTrainer runs each family too (model, processor, images as ours)."""
    from qlora_rft.cli import main

    out = tmp_path / "b.json"
    assert main(["bench", "--preset", preset, "--steps", "1", "--num-generations", "4", "--max-completion-length",
                 "8", "--sampling-weights", "int8", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    _check_report(report, preset, visual_tokens)
    assert f"ours {report['ours']['step_seconds']:.3f}, trl {report['trl']['step_seconds']:.3f}" in \
        capsys.readouterr().out


def _check_report(report: dict, preset: str, visual_tokens: int) -> None:
    """A bench of 1 measured step, G = 4, 8-token completions, int8 sampling weights."""
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
    settings = report["settings"]
    assert settings["preset"] == preset and settings["num_generations"] == 4 and settings["steps"] == 1
    assert settings["max_completion_length"] == settings["min_completion_length"] == 8
    assert settings["beta"] == 0.04 and settings["lora_r"] == 16 and settings["lora_alpha"] == 32
    assert settings["visual_tokens_per_prompt"] == visual_tokens
    assert "--sampling-weights int8" in report["command"]
    assert report["command"].startswith(f"qlora-rft bench --preset {preset} --compare trl --steps 1")


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
