"""The benchmark harness: both sides (ours, TRL's GRPOTrainer) run one tiny step each and the JSON is complete, for
every model family; the suite measures every sampling setting within a deadline and keeps what it measured."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qlora_rft.bench import run_bench
from qlora_rft.bench_suite import read_rows, run_suite


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
    assert {"torch", "transformers", "trl", "peft", "bitsandbytes", "qlora_rft"} <= set(report["versions"])
    assert report["device"] and report["date"]
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


CPU_CASES = ["smoke", "trl", "ours merged+static", "ours adapters+generate", "ours int8+static", "eval generate",
             "eval static"]


@pytest.mark.slow
def test_the_cpu_suite_measures_every_setting_and_fetches_nothing(tmp_path):
    """`qlora-rft bench --suite cpu` on the tiny preset, every process under the load spy of test_offline.py."""
    from test_offline import assert_nothing_fetched, spied

    out = tmp_path / "suite"
    records = spied(tmp_path / "spy.jsonl",
                    ["bench", "--suite", "cpu", "--deadline", "600", "--out", str(out), "--presets", "tiny"])
    assert_nothing_fetched(records, processes=7)  # the smoke pass, TRL's side, ours in three settings, two evals
    rows = read_rows(out)
    assert [r.case for r in rows] == CPU_CASES and all(r.status == "ok" for r in rows), rows
    checks = [c["name"] for c in rows[0].result["checks"]]  # no fp8 on the CPU
    assert checks == [f"ours {w}+{d}" for w in ("adapters", "merged", "int8") for d in ("generate", "static")] + \
        ["eval generate", "eval static"]
    trl = rows[1].result
    assert trl["completion_length"] == 8 and len(trl["step_seconds_all"]) == 2  # warm-up + 1 measured step
    table = [line for line in (out / "results.md").read_text().splitlines() if line.startswith("| tiny |")]
    assert len(table) == len(rows)
    for row, line in zip(rows[2:5], table[2:5]):
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        ours = row.result
        assert ours["sampling"]["weights"] == row.sampling_weights and ours["completion_length"] == 8
        assert cells[3] == f"{ours['step_seconds'] / trl['step_seconds']:.3f}"  # ratio to TRL
        assert cells[5] == f"{ours['peak_memory_bytes'] / 2**30:.2f}"
        assert cells[8] == f"{ours['step_seconds_all'][0] - ours['step_seconds']:.1f}"  # the first step's extra
    for row, line in zip(rows[5:], table[5:]):  # greedy evaluation: 3 batches of 4 prompts, the first a warm-up
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        seconds = row.result["step_seconds_all"]
        assert len(seconds) == 3 and row.result["sampling"]["decode"] == row.decode
        assert cells[10] == f"{4 / ((seconds[1] + seconds[2]) / 2):.2f}"  # prompts per second
    header = json.loads((out / "suite.json").read_text())
    assert header["command"] == f"qlora-rft bench --suite cpu --deadline 600 --out {out} --presets tiny"


@pytest.mark.slow
def test_the_deadline_times_out_the_running_case_and_skips_the_rest(tmp_path, capsys):
    from qlora_rft.bench import bench_settings

    bench_settings("tiny", num_generations=2, max_completion_length=4, device="cpu")  # the model and data built
    rows = run_suite("cpu", deadline=16, out=tmp_path / "suite", presets=["tiny"])  # ~11 s for the first case
    assert [r.case for r in rows] == CPU_CASES
    assert rows[0].status in ("timeout", "ok") and rows[0].seconds < 14
    assert all(r.status == "skipped" and r.error.startswith("deadline") for r in rows[1:])
    assert read_rows(tmp_path / "suite") == rows
    assert "skipped (deadline" in (tmp_path / "suite" / "results.md").read_text()


@pytest.mark.slow
def test_a_suite_killed_halfway_keeps_its_finished_rows(tmp_path):
    out = tmp_path / "suite"
    suite = subprocess.Popen([sys.executable, "-m", "qlora_rft", "bench", "--suite", "cpu", "--deadline", "600",
                              "--out", str(out), "--presets", "tiny"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results, give_up = out / "results.jsonl", time.monotonic() + 300
    while not (results.exists() and results.read_text().endswith("\n")):
        assert suite.poll() is None and time.monotonic() < give_up, "the smoke pass did not finish"
        time.sleep(0.2)
    os.kill(suite.pid, signal.SIGKILL)  # during TRL's side
    suite.wait()
    rows = read_rows(out)
    assert [r.case for r in rows] == ["smoke"] and rows[0].status == "ok"
    assert [json.loads(line)["case"] for line in results.read_text().splitlines()] == ["smoke"]
    assert "| tiny | smoke | ok: 8/8 checks |" in (out / "results.md").read_text()
    assert _running_cases("qlora-rft-tiny-trl-", within=10) == [], "the running case outlived the suite"


def _running_cases(marker: str, within: float) -> list[int]:
    """Pids of processes whose command line holds `marker`, after waiting up to `within` seconds for none."""
    give_up = time.monotonic() + within
    while True:
        found = []
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and marker in (proc / "cmdline").read_text():
                    found.append(int(proc.name))
            except OSError:
                continue
        if not found or time.monotonic() > give_up:
            return found
        time.sleep(0.5)


def test_the_gpu_suite_builds_each_preset_and_skips_a_preset_whose_build_failed(tmp_path, monkeypatch):
    """The gpu suite's order, with each case's process replaced: the smoke pass (which finds fp8), then per preset
    the build, TRL, ours in four settings and two evaluations; a failed build skips its preset's cases."""
    import torch

    from qlora_rft import bench_suite

    calls = []

    def fake_process(case, settings, out, timeout):
        calls.append((case.preset, case.name, settings.get("model_path") or settings.get("folder")))
        if case.kind == "smoke":
            return "ok", {"checks": [], "fp8": True, "device": "NVIDIA H200"}, ""
        if case.kind == "build":
            return ("failed", None, "exit 1\nout of memory") if case.preset == "qwen2-vl-2b" else ("ok", {}, "")
        return "ok", {"step_seconds": 2.0 if case.kind == "trl" else 1.0, "step_seconds_all": [3.0, 2.0],
                      "peak_memory_bytes": 2**30, "generation_tokens_per_second": 100.0, "prompts_per_second": 4.0,
                      "peak_memory_kind": "cuda_max_allocated"}, ""

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench_suite, "run_case_process", fake_process)
    monkeypatch.setattr(bench_suite, "bench_settings", lambda preset, *a, model_path=None, **k:
                        bench_suite.BenchSettings(preset, str(model_path), "cuda", "bfloat16", steps=1))
    rows = run_suite("gpu", deadline=600, out=tmp_path / "suite", presets=["qwen2-vl-7b", "qwen2-vl-2b"])
    per_preset = ["trl", "ours merged+static", "ours adapters+generate", "ours int8+static", "ours fp8+static",
                  "eval generate", "eval static"]
    assert [(r.preset, r.case) for r in rows] == [("tiny", "smoke"), ("qwen2-vl-7b", "build")] + \
        [("qwen2-vl-7b", c) for c in per_preset] + [("qwen2-vl-2b", "build")] + [("qwen2-vl-2b", c) for c in per_preset]
    assert all(r.status == "skipped" and "could not be built" in r.error for r in rows[10:])
    folder = calls[1][2]
    assert calls[1][:2] == ("qwen2-vl-7b", "build") and all(path == folder for _, _, path in calls[2:9])
    assert not Path(folder).exists() and not Path(folder).parent.exists()  # built outside --out, then removed
    table = (tmp_path / "suite" / "results.md").read_text()
    assert "on NVIDIA H200" in table and "| qwen2-vl-7b | ours fp8+static | ok | 0.500 | 1.00 | 1.00 | 100 |" in table
