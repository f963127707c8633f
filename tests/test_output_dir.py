"""train.output_dir: one run at a time, an earlier run never written over unless told (--resume, --overwrite), and a
folder that cannot be written refused before any model loads. Each as `qlora-rft train` processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qlora_rft.config import load_config
from qlora_rft.errors import UserError
from qlora_rft.files import LOCK_FILE
from qlora_rft.trainer import fit, train

ROOT = Path(__file__).parents[1]


def _command(tmp_path: Path, overrides: list[str], *args: str) -> list[str]:
    """`qlora-rft train` of the tiny run (tiny_overrides: into tmp_path / "run"); later overrides win."""
    config = tmp_path / "tiny.yaml"
    config.write_text("# the tiny run of tests/conftest.py, set by overrides\n")
    return [sys.executable, "-m", "qlora_rft", "train", str(config), *overrides, *args]


def _env(cache: Path | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    if cache is not None:  # an empty cache stays empty only if no model (tiny or warmed) was built or loaded
        env["QLORA_RFT_CACHE"] = str(cache)
    return env


def _refused(cmd: list[str], cache: Path) -> str:
    """Run a train that must be refused before any model loads; its one-line error."""
    cache.mkdir()
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(cache), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert list(cache.iterdir()) == []
    return proc.stderr


def test_a_second_train_on_a_folder_in_use_is_refused_and_the_first_finishes(tmp_path, tiny_overrides):
    out = tmp_path / "run"
    first = subprocess.Popen(_command(tmp_path, tiny_overrides, "train.max_steps=3"), cwd=ROOT, env=_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while "pid" not in ((out / LOCK_FILE).read_text() if (out / LOCK_FILE).exists() else ""):
            assert first.poll() is None, first.stderr.read()
            time.sleep(0.05)
        first.send_signal(signal.SIGSTOP)  # holds the lock, whatever the machine's speed
        error = _refused(_command(tmp_path, tiny_overrides), tmp_path / "empty-cache")
        assert f"train.output_dir={out} is in use by pid {first.pid} on " in error
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=600) == 0, first.stderr.read()
    assert (out / "metrics.jsonl").read_text().count('"step"') == 3  # one writer
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_a_finished_run_is_kept_unless_overwrite_is_given(tmp_path, tiny_overrides):
    out = tmp_path / "run"
    train(load_config(None, [*tiny_overrides, "train.save_steps=0"]))
    kept = [out / "adapter" / "adapter_model.safetensors", out / "adapter" / "adapter_config.json",
            out / "metrics.jsonl", out / "train_summary.json"]
    before = [p.read_bytes() for p in kept]

    error = _refused(_command(tmp_path, tiny_overrides, "train.save_steps=0"), tmp_path / "empty-cache")
    assert f"train.output_dir={out} holds a run (adapter, metrics.jsonl, train_summary.json)" in error
    assert "pass --resume to continue it, --overwrite to replace it" in error
    assert [p.read_bytes() for p in kept] == before
    with pytest.raises(UserError, match="no complete checkpoint in .*; start afresh with --overwrite"):
        train(load_config(None, tiny_overrides), resume=True)

    proc = subprocess.run(_command(tmp_path, tiny_overrides, "train.max_steps=1", "--overwrite"), cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert (out / "metrics.jsonl").read_text().count('"step"') == 1  # the new run's, not appended
    assert '"steps": 1' in (out / "train_summary.json").read_text()
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-1"]


def test_resume_and_overwrite_together_are_refused(tiny_overrides):
    with pytest.raises(UserError, match="--resume continues the run in train.output_dir and --overwrite replaces it"):
        fit(load_config(None, tiny_overrides), resume=True, overwrite=True)


@pytest.mark.parametrize("kind", ["read-only folder", "file"])
def test_an_output_dir_that_cannot_be_written_is_refused_before_any_model_loads(tmp_path, tiny_overrides,
                                                                                 kind):
    out = tmp_path / "run"
    if kind == "file":
        out.write_text("")
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders: this case needs another user")
        out.mkdir()
        out.chmod(0o555)
    error = _refused(_command(tmp_path, tiny_overrides), tmp_path / "empty-cache")
    reason = "File exists" if kind == "file" else "Permission denied"
    assert f"train.output_dir={out} cannot be written ({reason})" in error


def test_a_config_of_the_users_in_the_folder_is_never_written_over_or_deleted(tmp_path, tiny_overrides):
    out = tmp_path / "run"
    out.mkdir()
    mine = out / "config.yaml"
    mine.write_text("# my commented settings\ntrain:\n  max_steps: 2  # two steps\n")
    before = mine.read_bytes()
    overrides = [o for o in tiny_overrides if not o.startswith("train.output_dir=")]
    for flags in ([], ["--overwrite"]):
        cmd = [sys.executable, "-m", "qlora_rft", "train", str(mine), *overrides, f"train.output_dir={out}", *flags]
        error = _refused(cmd, tmp_path / f"empty-cache{len(flags)}")
        assert f"train.output_dir={out} holds a config.yaml that no run wrote" in error
        assert mine.read_bytes() == before


def test_a_runs_own_config_is_known_as_such(tmp_path, tiny_overrides):
    from qlora_rft.config import dump
    from qlora_rft.run import check_config_file

    out = tmp_path / "run"
    out.mkdir()
    dump(load_config(None, tiny_overrides), out / "config.yaml")  # a run killed before its first step left it
    check_config_file(out)
    assert load_config(out / "config.yaml").train.max_steps == 2
    (out / "config.yaml").unlink()
    (out / "config.yaml").symlink_to(tmp_path / "elsewhere.yaml")
    with pytest.raises(UserError, match="holds a config.yaml that no run wrote"):
        check_config_file(out)
