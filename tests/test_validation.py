"""The evaluation during training (train.eval_steps) on the tiny model: eval/<metric> lines, the same answers as
`qlora-rft eval` of the saved adapter, training left bit-exactly as without it, and resume."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from qlora_rft.config import load_config
from qlora_rft.errors import ConfigError
from qlora_rft.rewards import RewardSet
from qlora_rft.runlog import read_metrics
from qlora_rft.trainer import fit

sys.path.insert(0, str(Path(__file__).parent))
from resume_job import text_rewards  # noqa: E402  rewards of the sampled text: a run depends on every RNG draw

EVAL = ["data.eval=synthetic:shapes", "eval.limit=3", "eval.batch_size=2", "eval.max_new_tokens=8"]
TRAINED = ("loss", "reward", "kl", "grad_norm", "completion_length", "rewards/format", "rewards/classification",
           "entropy", "sampling/kl", "sampling/ratio_max")


def _adapter(run_dir: Path) -> dict:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def _eval_lines(run_dir: Path) -> list[tuple]:
    return [(line["step"], line["eval/accuracy"], line["eval/num_predictions"])
            for line in read_metrics(run_dir / "metrics.jsonl") if "eval/accuracy" in line]


@pytest.mark.parametrize("method", ["grpo", "sft"])
def test_evaluating_during_training_leaves_training_bit_exact(tiny_overrides, tmp_path, monkeypatch, method):
    monkeypatch.setattr(RewardSet, "score", text_rewards)
    plain, watched = tmp_path / "plain", tmp_path / "watched"
    run = [*tiny_overrides, f"train.method={method}", "lora.dropout=0.1"]  # dropout: training mode and RNG matter
    fit(load_config(None, [*run, f"train.output_dir={plain}"]))
    result = fit(load_config(None, [*run, *EVAL, "train.eval_steps=1", f"train.output_dir={watched}"]))

    a, b = _adapter(plain), _adapter(watched)
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert any(t.abs().sum() > 0 for k, t in a.items() if "lora_B" in k)  # it did train
    lines = [read_metrics(run / "metrics.jsonl") for run in (plain, watched)]
    for key in (TRAINED if method == "grpo" else ("loss", "grad_norm")):
        assert [line[key] for line in lines[0]] == [line[key] for line in lines[1]], key
    assert not any(k.startswith("eval/") for line in lines[0] for k in line)

    # eval/<metric> at steps 1 and 2, from the predictions written under evals/step-N/
    assert [(step, n) for step, _, n in _eval_lines(watched)] == [(1, 3), (2, 3)]
    for line in lines[1]:
        folder = watched / "evals" / f"step-{line['step']}"
        assert json.loads((folder / "metrics.json").read_text())["accuracy"] == line["eval/accuracy"]
        assert len((folder / "predictions.jsonl").read_text().splitlines()) == 3
    assert result.metrics[-1]["eval/accuracy"] == lines[1][-1]["eval/accuracy"]


def test_the_last_evaluation_answers_as_qlora_rft_eval_of_the_saved_adapter(tiny_overrides, tmp_path, monkeypatch):
    """The same functions on the same weights: the evaluation at the last step and `eval` of the saved adapter
    write the same lines (the run's adapters are the policy's, in memory, not merged)."""
    from qlora_rft.evaluation.runner import run_eval

    monkeypatch.setattr(RewardSet, "score", text_rewards)
    out = tmp_path / "run"
    fit(load_config(None, [*tiny_overrides, *EVAL, "train.eval_steps=5", "train.max_steps=1",
                           f"train.output_dir={out}"]))  # only the evaluation at the end
    assert [step for step, _, _ in _eval_lines(out)] == [1]
    evaluated = run_eval(load_config(None, [*tiny_overrides, *EVAL, f"eval.adapter={out / 'adapter'}",
                                            f"eval.output_dir={tmp_path / 'eval'}"]))
    during = (out / "evals" / "step-1" / "predictions.jsonl").read_text().splitlines()
    assert during == evaluated.predictions.read_text().splitlines()
    assert json.loads((out / "evals" / "step-1" / "metrics.json").read_text()) == evaluated.metrics


def test_a_resumed_run_evaluates_as_an_uninterrupted_one(tiny_overrides, tmp_path, monkeypatch):
    monkeypatch.setattr(RewardSet, "score", text_rewards)
    args = [*tiny_overrides, *EVAL, "train.eval_steps=1", "train.max_steps=4", "train.save_steps=2"]
    out = Path(load_config(None, args).train.output_dir)
    fit(load_config(None, args))
    whole = _eval_lines(out), [(out / "evals" / f"step-{s}" / "predictions.jsonl").read_text() for s in range(1, 5)]

    # A crash after step 4's line and evaluation, before its checkpoint: resume from checkpoint-2.
    shutil.rmtree(out / "checkpoint-4")
    shutil.rmtree(out / "adapter")
    (out / "train_summary.json").unlink()
    (out / "evals" / "step-3" / "stale").write_text("from before the crash")
    fit(load_config(None, args), resume=True)

    assert not (out / "evals" / "step-3" / "stale").exists()  # step 3 was evaluated again, afresh
    assert sorted(p.name for p in (out / "evals").iterdir()) == ["step-1", "step-2", "step-3", "step-4"]
    resumed = _eval_lines(out), [(out / "evals" / f"step-{s}" / "predictions.jsonl").read_text()
                                 for s in range(1, 5)]
    assert resumed == whole
    assert [line["step"] for line in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4]


@pytest.mark.parametrize("extra,message", [
    (["train.eval_steps=5"], "train.eval_steps=5 evaluates held-out data: set data.eval"),
    (["train.eval_steps=5", "data.task=detection"], "set eval.annotations"),
    (["train.eval_steps=-1"], "train.eval_steps must be >= 0"),
])
def test_an_evaluation_without_held_out_data_is_refused_at_load(extra, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, extra)


def test_held_out_data_makes_the_evaluation_valid():
    assert load_config(None, ["train.eval_steps=5", "data.eval=synthetic:shapes"]).train.eval_steps == 5


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["zero3", "ddp"])
def test_under_a_launch_every_process_answers_its_share_and_training_is_unchanged(tmp_path, launcher):
    """2 processes (ZeRO-3 in full mode, the weights gathered whole for the answers; DDP in qlora mode), real
    sampling with rewards of every sampled character: with the evaluation each step the run trains exactly as
    without, and the main process scores all eval.limit prompts, in the order one process asks them."""
    import torch
    from test_distributed import JOB, PAPER, _launch, _run, _weights

    sample = [str(JOB), str(PAPER), "--sample", "train.lr_scheduler=constant"]
    if launcher == "ddp":
        torchrun = str(Path(sys.executable).parent / "torchrun")
        qlora = ["model.mode=qlora", "lora.train_vision=false", "lora.dropout=0.0", "train.learning_rate=0.001"]
        launch = lambda *args: _run([torchrun, "--nproc_per_node", "2", *sample, *qlora, *args])  # noqa: E731
    else:
        launch = lambda *args: _launch(*sample, *args)  # noqa: E731
    plain, watched = tmp_path / "plain", tmp_path / "watched"
    launch(f"train.output_dir={plain}")
    launch(f"train.output_dir={watched}", "train.eval_steps=1", *EVAL)

    m1, m2 = (json.loads((run / "job_metrics.json").read_text()) for run in (plain, watched))
    assert [(a["loss"], a["reward"]) for a in m1] == [(b["loss"], b["reward"]) for b in m2]
    assert [b["eval/num_predictions"] for b in m2] == [3, 3]
    if launcher == "ddp":
        a, b = (load_file(str(run / "adapter" / "adapter_model.safetensors")) for run in (plain, watched))
    else:
        a, b = _weights(plain / "model"), _weights(watched / "model")
    assert all(torch.equal(a[k], b[k]) for k in a)
    for step in (1, 2):
        lines = (watched / "evals" / f"step-{step}" / "predictions.jsonl").read_text().splitlines()
        assert [json.loads(line)["id"] for line in lines] == [0, 1, 2]  # rank 0 asked 0 and 2, rank 1 asked 1
