"""The command line: bad input gives a one-line error and a non-zero exit, never a traceback (unless --debug)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from qlora_rft.cli import main


@pytest.mark.parametrize(
    "argv,message",
    [
        (["train", "configs/tiny_demo.yaml", "grpo.num_generations=1"], "grpo.num_generations must be >= 2"),
        (["train", "configs/tiny_demo.yaml", "grpo.beta=lots"], "grpo.beta must be a float"),
        (["train", "no/such/config.yaml"], "config file no/such/config.yaml not found"),
        (["train", "configs/tiny_demo.yaml", "model.name_or_path=/no/such/model"], "has no config.json"),
        (["train", "configs/tiny_demo.yaml", "data.train=/no/such/data"], "cannot load split"),
        (["tiny-model", "--out", "x", "--preset", "huge"], "unknown preset 'huge'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys, tmp_path):
    code = main([*argv, f"train.output_dir={tmp_path}"] if argv[0] == "train" else argv)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: ") and message in err
    assert "Traceback" not in err


def test_the_real_process_exits_non_zero_without_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "qlora_rft", "train", "configs/tiny_demo.yaml", "train.max_stepz=3"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    assert "did you mean 'max_steps'" in proc.stderr and "Traceback" not in proc.stderr


def test_config_command_prints_documented_defaults(capsys):
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert "backward_chunk: 0  # Completions per forward/backward" in out
