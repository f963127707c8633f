"""Exact resume: a run killed with SIGKILL and resumed ends with the same adapter, to the bit, as one never stopped.
A checkpoint file that would run code when unpickled is refused, unrun."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_RUN, first_shapes_rows
from safetensors.torch import load_file

from qlora_rft import checkpoint
from qlora_rft.config import load_config
from qlora_rft.errors import UserError
from qlora_rft.trainer import fit

sys.path.insert(0, str(Path(__file__).parent))
import resume_job  # noqa: E402


def _adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


@pytest.mark.parametrize("method,length", [("grpo", "steps"), ("sft", "steps"), ("grpo", "epochs")])
def test_killed_and_resumed_run_equals_an_uninterrupted_one(tiny_overrides, tmp_path, method, length):
    steps = ["train.max_steps=5", "train.save_steps=1", "train.save_total_limit=2", f"train.method={method}",
             "train.prompts_per_step=2"]
    if length == "epochs":  # 10 rows, 4 per step, 2 epochs: 5 steps; killed mid-epoch, step 3 crosses into epoch 2
        data = first_shapes_rows(tmp_path / "data", 10)
        steps += [f"data.train={data}", "train.max_steps=0", "train.epochs=2", "train.prompts_per_step=4"]
    whole = tmp_path / "whole"
    resume_job.run([*tiny_overrides, *steps, f"train.output_dir={whole}"])

    killed = tmp_path / "killed"
    args = [*tiny_overrides, *steps, f"train.output_dir={killed}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), *sys.path])}
    proc = subprocess.Popen([sys.executable, str(Path(resume_job.__file__)), *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while not (killed / "checkpoint-2" / checkpoint.STATE_FILE).exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "the job never wrote checkpoint-2"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "adapter").exists()
    assert checkpoint.latest(killed).name in ("checkpoint-2", "checkpoint-3")

    resume_job.run(args, resume=True)
    a, b = _adapter(whole), _adapter(killed)
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert any(t.abs().sum() > 0 for n, t in a.items() if "lora_B" in n)  # the run did learn something


def test_a_half_written_checkpoint_is_never_picked(tmp_path):
    (tmp_path / "checkpoint-4").mkdir()  # no state file: written by a run killed mid-save
    (tmp_path / ".checkpoint-5.abc").mkdir()
    done = tmp_path / "checkpoint-3"
    done.mkdir()
    (done / checkpoint.STATE_FILE).write_text('{"step": 3}')
    assert checkpoint.latest(tmp_path) == done


@pytest.mark.parametrize("room", [0, 100], ids=["full from the start", "full midway"])
def test_a_full_disk_during_a_checkpoint_says_so_and_keeps_the_previous_one(tmp_path, monkeypatch, room):
    """torch.save raises the OSError (ENOSPC) itself when its first write fails, a RuntimeError from it later."""
    import errno

    from qlora_rft.errors import OutputError

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    first = checkpoint.save(tmp_path, 1, model, optimizer, scheduler)
    saved = {p.name: p.read_bytes() for p in first.iterdir()}

    class FullFile:  # a file on a disk with `room` bytes left, failing its writes as the OS would
        def __init__(self, path, mode):
            self.written = 0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

        def write(self, data):
            self.written += len(data)
            if self.written > room:
                raise OSError(errno.ENOSPC, "No space left on device")
            return len(data)

        def flush(self):
            pass

    monkeypatch.setattr(checkpoint, "open", FullFile, raising=False)  # the files checkpoint.save writes torch into
    with pytest.raises(OutputError) as info:
        checkpoint.save(tmp_path, 2, model, optimizer, scheduler)
    message = str(info.value)
    assert message.startswith(f"no space left on the device (disk full or quota exceeded) while writing "
                              f"{tmp_path / 'checkpoint-2'}; the previous checkpoint, checkpoint-1, is kept")
    assert "continue with --resume" in message
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-1"]  # no checkpoint-2, no temporary
    assert {p.name: p.read_bytes() for p in first.iterdir()} == saved


def test_rng_states_come_back_exactly_from_a_weights_only_load(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.randn()  # numpy now holds a cached gaussian
    torch.save(checkpoint.rng_state(), tmp_path / "rng.pt")
    expected = random.random(), random.gauss(0, 1), np.random.randn(3).tolist(), torch.rand(3).tolist()
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    checkpoint.set_rng_state(checkpoint.load_plain(tmp_path / "rng.pt"))
    assert (random.random(), random.gauss(0, 1), np.random.randn(3).tolist(), torch.rand(3).tolist()) == expected


class _Planted:
    """A pickle that runs a shell command creating `marker` when it is loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    fit(load_config(None, [*TINY_RUN, "train.max_steps=1", f"train.output_dir={out}"]), log=False)
    return out


@pytest.mark.parametrize("planted", ["rng.pt", "optimizer.pt"])
def test_a_planted_pickle_in_a_checkpoint_is_refused_unrun(finished_run, tmp_path, planted):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    marker = tmp_path / "ran"
    target = run / "checkpoint-1" / planted
    torch.save(_Planted(marker), target)
    proc = subprocess.run(
        [sys.executable, "-m", "qlora_rft", "train", str(run / "config.yaml"), "train.max_steps=2",
         f"train.output_dir={run}", "--resume"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.startswith(f"error: {target} was not loaded") and proc.stderr.count("\n") == 1
    assert "could execute code" in proc.stderr
    assert not marker.exists()
    torch.load(target, weights_only=False)  # what loading it used to do
    assert marker.exists()


def test_an_rng_file_of_the_old_format_is_refused(tmp_path):
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
               tmp_path / "rng.pt")  # numpy's state holds an ndarray: loading it needs more than weights_only
    with pytest.raises(UserError, match="rng.pt was not loaded: it holds more than tensors and plain values"):
        checkpoint.load_plain(tmp_path / "rng.pt")


def test_sharded_checkpoint_files_are_checked_before_deepspeed_and_accelerate_unpickle_them(tmp_path):
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    folder = tmp_path / "checkpoint-1"
    (folder / "pytorch_model").mkdir(parents=True)
    (folder / checkpoint.STATE_FILE).write_text(json.dumps({"step": 1, "world_size": 1}))
    torch.save({"zero_stage": ZeroStageEnum.weights, "loss_scaler": LossScaler(1.0), "fp32": [torch.ones(2)]},
               folder / "pytorch_model" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")  # as DeepSpeed writes
    torch.save({"last_epoch": 1, "base_lrs": [0.1]}, folder / "custom_checkpoint_0.pkl")  # accelerate: the schedule
    checkpoint.check_plain(folder, checkpoint._sharded_classes())

    marker = tmp_path / "ran"
    torch.save(_Planted(marker), folder / "custom_checkpoint_0.pkl")  # accelerate loads it with weights_only=False
    with pytest.raises(UserError, match="custom_checkpoint_0.pkl was not loaded"):
        checkpoint.load_sharded(None, folder, world_size=1)  # refused before the accelerator is used
    assert not marker.exists()


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("two") / "run"
    fit(load_config(None, [*TINY_RUN, "train.max_steps=2", f"train.output_dir={out}"]), log=False)
    assert [p.name for p in checkpoint.all_checkpoints(out)] == ["checkpoint-1", "checkpoint-2"]
    return out


def _damage(file: Path, how: str) -> None:
    data = file.read_bytes()
    file.write_bytes(b"" if how == "empty" else data[: len(data) // 2])


@pytest.mark.parametrize("name,how", [("optimizer.pt", "cut"), ("rng.pt", "empty"), ("scheduler.pt", "cut"),
                                      (checkpoint.STATE_FILE, "cut"), ("adapter/adapter_model.safetensors", "cut"),
                                      ("adapter/adapter_config.json", "empty")])
def test_a_damaged_checkpoint_is_named_and_the_newest_whole_one_resumes(two_checkpoints, tmp_path, name, how):
    import io

    from rich.console import Console

    run = tmp_path / "run"
    shutil.copytree(two_checkpoints, run)
    _damage(run / "checkpoint-2" / name, how)
    said = io.StringIO()
    fit(load_config(run / "config.yaml", [f"train.output_dir={run}"]), resume=True, log=False,
        console=Console(file=said, width=400))
    said = " ".join(said.getvalue().split())
    assert f"passed over a damaged checkpoint: {run / 'checkpoint-2' / name} is truncated or corrupt" in said
    assert "resuming from checkpoint-1, the newest checkpoint that reads whole" in said
    expected, got = _adapter(two_checkpoints), _adapter(run)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


def test_a_run_whose_checkpoints_are_all_damaged_is_one_line_naming_each(two_checkpoints, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(two_checkpoints, run)
    _damage(run / "checkpoint-2" / "optimizer.pt", "cut")
    _damage(run / "checkpoint-1" / checkpoint.STATE_FILE, "empty")
    proc = subprocess.run([sys.executable, "-m", "qlora_rft", "train", str(run / "config.yaml"),
                           f"train.output_dir={run}", "--resume"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr[-3000:]
    assert f"no checkpoint in {run} reads whole ({run / 'checkpoint-2' / 'optimizer.pt'} is truncated" in proc.stderr
    assert f"; {run / 'checkpoint-1' / checkpoint.STATE_FILE} is truncated or corrupt" in proc.stderr


def test_resume_refuses_changed_training_settings_naming_each(two_checkpoints, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(two_checkpoints, run)
    own = [f"train.output_dir={run}"]
    with pytest.raises(UserError, match=r"--resume: checkpoint-2 was trained with other settings \(grpo."
                                        r"num_generations 4 -> 2; train.learning_rate 0.01 -> 0.5\): settings that "
                                        r"change training cannot change mid-run"):
        fit(load_config(run / "config.yaml", [*own, "train.learning_rate=0.5", "grpo.num_generations=2"]),
            resume=True, log=False)
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace("tiny:tiny", "tiny:cpu-small"))
    with pytest.raises(UserError, match=r'other settings \(model.name_or_path "tiny:tiny" -> "tiny:cpu-small"\)'):
        fit(load_config(run / "config.yaml", own), resume=True, log=False)


def test_resume_accepts_a_longer_run_and_other_logging_and_keeps_the_runs_time(two_checkpoints, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(two_checkpoints, run)
    trained = json.loads((run / "checkpoint-2" / checkpoint.STATE_FILE).read_text())["seconds"]
    assert trained > 0
    cfg = load_config(run / "config.yaml", [f"train.output_dir={run}"])
    fit(cfg, resume=True, log=False)  # a finished run resumed: nothing to train, its time kept
    assert json.loads((run / "train_summary.json").read_text())["seconds"] >= trained
    fit(load_config(run / "config.yaml", [f"train.output_dir={run}", "train.max_steps=3", "train.logging_steps=2",
                                          "train.save_total_limit=1", "eval.limit=3"]), resume=True, log=False)
    assert [p.name for p in checkpoint.all_checkpoints(run)] == ["checkpoint-3"]


def test_an_older_checkpoint_of_another_model_is_refused_by_its_adapter_shapes(two_checkpoints, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(two_checkpoints, run)
    for folder in checkpoint.all_checkpoints(run):  # as an older version wrote them: no config recorded
        state = json.loads((folder / checkpoint.STATE_FILE).read_text())
        del state["config"]
        (folder / checkpoint.STATE_FILE).write_text(json.dumps(state))
    text = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(text.replace("tiny:tiny", "tiny:cpu-small"))
    with pytest.raises(UserError, match=r"checkpoint-2's adapter does not fit this model: model\."
                                        r"language_model\.layers\.0\.mlp\.down_proj has 128 inputs in the adapter"):
        fit(load_config(run / "config.yaml", [f"train.output_dir={run}"]), resume=True, log=False)
    (run / "config.yaml").write_text(text.replace("  r: 16", "  r: 8"))
    with pytest.raises(UserError, match=r"checkpoint-2's adapter does not fit this model: model\.language_model\."
                                        r"layers\.0\.mlp\.down_proj\.lora_A\.weight is \[16, 128\] in the adapter "
                                        r"and \[8, 128\] here \(another lora.r\)"):
        fit(load_config(run / "config.yaml", [f"train.output_dir={run}"]), resume=True, log=False)
