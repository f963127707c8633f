"""The command line: bad input gives a one-line error and a non-zero exit, never a traceback (unless --debug)."""

from __future__ import annotations

import json
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
        (["train", "configs/tiny_demo.yaml", "data.train=/no/such/data"], "/no/such/data does not exist"),
        (["train", "configs/tiny_demo.yaml", "data.train=data/x"], "data/x does not exist (no such file or folder"),
        (["train", "configs/tiny_demo.yaml", "data.train="], "data.train is empty"),
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


def _cli(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qlora_rft", *argv], capture_output=True, text=True,
                          timeout=timeout)


def _assert_one_line_error(proc: subprocess.CompletedProcess, message: str) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr


def test_a_binary_config_is_one_line(tmp_path):
    config = tmp_path / "weights.yaml"
    config.write_bytes(bytes(range(256)) * 4)
    _assert_one_line_error(_cli("config", str(config)), f"config file {config} is not UTF-8 text")


def test_an_override_that_is_not_yaml_is_one_line():
    _assert_one_line_error(_cli("config", "configs/tiny_demo.yaml", "train.output_dir=[oops"),
                           "override 'train.output_dir=[oops' is not valid YAML")


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path):
    lists = ["&a0 [x, x, x, x, x, x, x, x, x]"] + [f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    bomb = tmp_path / "bomb.yaml"  # "billion laughs": 9**9 strings once expanded
    bomb.write_text(f"lora:\n  target_modules: [{', '.join(lists)}]\n")
    _assert_one_line_error(_cli("config", str(bomb), timeout=30), "expands through its aliases")


def test_score_without_a_usable_line_says_what_was_skipped(tmp_path):
    predictions = tmp_path / "p.jsonl"
    predictions.write_text('not json\n{"completion": "<answer>a</answer>"}\n')
    proc = _cli("score", "classification", "--predictions", str(predictions), "--out", str(tmp_path / "m.json"))
    _assert_one_line_error(proc, f"predictions file {predictions} has no usable line: 2 skipped (line 1: not valid "
                                 "JSON (Expecting value); line 2: missing key 'solution')")
    assert not (tmp_path / "m.json").exists()


def test_corrupt_adapter_weights_are_one_line(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (adapter / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": ")  # cut short
    proc = _cli("merge", "--base", "tiny:tiny", "--adapter", str(adapter), "--out", str(tmp_path / "merged"))
    _assert_one_line_error(proc, f"adapter weights file {adapter / 'adapter_model.safetensors'} is corrupt or "
                                 "truncated")


def test_file_system_errors_name_the_path(tmp_path):
    predictions = tmp_path / "p.jsonl"
    predictions.write_text('{"completion": "<answer>a</answer>", "solution": "<answer>a</answer>"}\n')
    (tmp_path / "file").write_text("")
    proc = _cli("score", "classification", "--predictions", str(predictions), "--out", str(tmp_path / "file" / "m"))
    _assert_one_line_error(proc, f"{tmp_path / 'file'}")


def test_score_out_a_folder_writes_metrics_json_in_it(tmp_path, capsys):
    predictions = tmp_path / "p.jsonl"
    predictions.write_text('{"completion": "<answer>a</answer>", "solution": "<answer>a</answer>"}\n')
    (tmp_path / "out").mkdir()
    assert main(["score", "classification", "--predictions", str(predictions), "--out", str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["accuracy"] == 100.0
    assert f"metrics written to {tmp_path / 'out' / 'metrics.json'}" in capsys.readouterr().out


def test_a_bug_still_shows_its_traceback(monkeypatch, capsys):
    import qlora_rft.cli as cli

    def broken(args):
        raise TypeError("a bug")

    monkeypatch.setattr(cli, "cmd_config", broken)
    with pytest.raises(TypeError, match="a bug"):
        main(["config"])
    monkeypatch.setattr(cli, "cmd_config", lambda args: open("/no/such/file"))
    assert main(["config"]) == 2
    assert capsys.readouterr().err == "error: No such file or directory: /no/such/file\n"


@pytest.mark.parametrize("kind", ["cuda", "cpu allocator", "python"])
def test_running_out_of_memory_is_one_line_naming_what_to_lower(monkeypatch, capsys, kind):
    import torch

    import qlora_rft.cli as cli

    error = {"cuda": torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
             "cpu allocator": RuntimeError("[enforce fail at alloc_cpu.cpp:118] data. DefaultCPUAllocator: can't "
                                           "allocate memory: you tried to allocate 1099511627776 bytes."),
             "python": MemoryError()}[kind]

    def out_of_memory(args):
        raise error

    monkeypatch.setattr(cli, "cmd_config", out_of_memory)
    assert main(["config"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: out of memory (") and err.count("\n") == 1
    assert "lower what one step holds at once (grpo.generation_chunk, grpo.backward_chunk" in err
