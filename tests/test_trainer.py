"""A real QLoRA GRPO run on the tiny model: what changes, what must not, chunking, checkpoints and resume."""

from __future__ import annotations

import contextlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_RUN, first_shapes_rows
from safetensors.torch import load_file

from qlora_rft import checkpoint
from qlora_rft.config import load_config
from qlora_rft.distributed import Updates
from qlora_rft.errors import TrainingError, UserError
from qlora_rft.rewards import RewardSet
from qlora_rft.runlog import read_metrics
from qlora_rft.sampling import FiniteLogits
from qlora_rft.trainer import fit, train


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()} | {
        n: b.detach().clone() for n, b in model.named_buffers()
    }


def _alternating_rewards(rewards, texts, columns, frame=None, row=None):
    return {name: [float(k % 2) for k in range(len(texts))] for name in rewards.weights}


def test_two_step_qlora_grpo_changes_lora_weights_only(tiny_overrides, monkeypatch):
    import qlora_rft.run as run_module

    captured = {}
    real_load = run_module.load_policy

    def spy(*args, **kwargs):
        policy = real_load(*args, **kwargs)
        captured["policy"] = policy
        captured["before"] = _snapshot(policy.model)
        return policy

    monkeypatch.setattr(run_module, "load_policy", spy)
    # A random tiny model never earns a reward, so every advantage would be 0: give the group some spread.
    monkeypatch.setattr(RewardSet, "score", _alternating_rewards)
    cfg = load_config(None, tiny_overrides)
    result = train(cfg, log=True)

    after = _snapshot(captured["policy"].model)
    before = captured["before"]
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed, "nothing was trained"
    assert all("lora_" in n for n in changed), sorted(changed)[:5]
    assert any("lora_A" in n for n in changed) and any("lora_B" in n for n in changed)

    lines = [json.loads(l) for l in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [1, 2]
    for key in ("loss", "reward", "kl", "rewards/format", "rewards/classification", "tokens_per_second"):
        assert key in lines[0]
    assert [(l["decode_builds"], l["decode_compiles"]) for l in lines] == [(1, 0), (1, 0)]  # built once, eager
    sampling = json.loads((result.output_dir / "train_summary.json").read_text())["sampling"]
    assert (sampling["weights"], sampling["decode"]) == ("merged", "static")  # auto on the CPU
    assert sampling["weights_reason"].startswith("auto on the CPU") and sampling["decode_weight_bytes"] > 0
    assert sampling["importance_correction"] == "tis" and "merged copy" in sampling["importance_correction_reason"]
    for line in lines:  # the policy's entropy, and the sampler's distance from it (merged: float rounding only)
        assert 0 < line["entropy"] <= math.log(768)  # at most uniform over the tiny vocabulary
        assert 0 <= line["sampling/kl"] < 1e-6 and 1 - 1e-3 < line["sampling/ratio_max"] < 1 + 1e-3
    assert (result.adapter_dir / "adapter_config.json").is_file()
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
    assert [p.name for p in checkpoint.all_checkpoints(result.output_dir)] == ["checkpoint-1", "checkpoint-2"]


def test_int8_sampling_is_further_from_the_policy_than_merged_and_tis_trains_finite(tiny_overrides, monkeypatch):
    """One step each, the same seed: sampling/kl measures how far the sampling weights are from the trained ones
    (adapters and merged: rounding; int8: its quantization), auto corrects only a copy, and tis gives finite losses."""
    monkeypatch.setattr(RewardSet, "score", _alternating_rewards)
    found = {}
    for weights, correction in (("adapters", "auto"), ("merged", "auto"), ("int8", "auto"), ("int8", "none"),
                                ("int8", "sequence_tis")):
        out = Path(tiny_overrides[-1].split("=", 1)[1]) / f"{weights}-{correction}"
        cfg = load_config(None, [*tiny_overrides, "train.max_steps=1", "train.save_steps=0",
                                 f"grpo.sampling_weights={weights}", f"grpo.importance_correction={correction}",
                                 f"train.output_dir={out}"])
        result = train(cfg, log=False)
        summary = json.loads((out / "train_summary.json").read_text())["sampling"]
        found[weights, correction] = (result.metrics[0], summary["importance_correction"])
    assert [c for _, c in found.values()] == ["none", "tis", "tis", "none", "sequence_tis"]
    kl = {w: line["sampling/kl"] for (w, c), (line, _) in found.items() if c == "auto"}
    assert kl["int8"] > 100 * max(kl["merged"], 1e-9) and kl["int8"] > 100 * max(kl["adapters"], 1e-9), kl
    assert found["int8", "auto"][0]["sampling/ratio_max"] > 1.001
    assert all(math.isfinite(line["loss"]) and math.isfinite(line["grad_norm"]) for line, _ in found.values())
    # the same samples (same seed, same int8 copy), weighted or not: the correction changed the loss
    assert found["int8", "auto"][0]["reward"] == found["int8", "none"][0]["reward"]
    assert found["int8", "auto"][0]["loss"] != found["int8", "none"][0]["loss"]
    assert found["int8", "sequence_tis"][0]["reward"] == found["int8", "none"][0]["reward"]
    assert found["int8", "sequence_tis"][0]["loss"] not in (found["int8", "none"][0]["loss"],
                                                            found["int8", "auto"][0]["loss"])


def test_backward_chunks_give_the_same_gradient_as_the_whole_group(tiny_overrides):
    """For every loss type, off-policy (mu = 2) so that clipping and the ratio's gradient act: chunks of 4, 2 or 1
    completions of a group give the same gradient as the whole group at once, as one of a two-group step whose other
    group has twice its tokens (the token-normalised types divide by the step's counts, not a chunk's)."""
    from qlora_rft import grpo
    from qlora_rft.data import load_split
    from qlora_rft.model import load_policy, reference_mode
    from qlora_rft.prompts import encode_prompt
    from conftest import sample
    from qlora_rft.rollout import CompletionScorer
    from qlora_rft.sampling import Settings
    from qlora_rft.tasks import get_task
    from qlora_rft.trainer import Group, StepStats, backward_group, chunked_logprobs

    class Updates:  # a single process without an engine: plain backward
        accumulating = staticmethod(lambda last: contextlib.nullcontext())

        def backward(self, loss):
            loss.backward()

    cfg = load_config(None, tiny_overrides)
    policy = load_policy(cfg.model, cfg.lora)
    for name, p in policy.model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)  # non-zero adapters so that both LoRA factors get gradients
    task = get_task("classification")
    example = load_split(cfg.data.train, "train", task, min_pixels=cfg.data.min_pixels,
                         max_pixels=cfg.data.max_pixels, factor=policy.family.factor).examples[0]
    prompt = encode_prompt(policy.processor, task, example, cfg.data, policy.device)
    torch.manual_seed(0)
    rollout = sample(policy, [prompt], 4, 4, Settings(8))[0]
    total = torch.tensor([1.0, 0.0, 0.5, 0.0])
    scorer = CompletionScorer(policy.model)
    settings = ["grpo.num_iterations=2", "grpo.epsilon_high=5.0"]  # cispo's cap; clip-higher for the others
    g = load_config(None, [*tiny_overrides, *settings]).grpo
    with reference_mode(policy.model):
        ref_logp = chunked_logprobs(scorer, rollout, g)
    old_logp = chunked_logprobs(scorer, rollout, g) + 0.3 * torch.randn(ref_logp.shape)  # as if after an update
    tokens = float(rollout.mask.sum())
    for loss_type in grpo.LOSS_TYPES:
        grads = []
        for chunk in (4, 1):
            g = load_config(None, [*tiny_overrides, *settings, f"grpo.backward_chunk={chunk}",
                                   f"grpo.loss_type={loss_type}"]).grpo
            group = Group(rollout, {}, total, rollout.mask, grpo.advantages(total[None])[0], ref_logp, old_logp)
            size = grpo.StepSize(2, 4, g.max_completion_length, tokens=3 * tokens)  # the other group: twice as long
            policy.model.zero_grad()
            backward_group(scorer, Updates(), group, g, size, StepStats())
            grads.append([p.grad.clone() for p in policy.model.parameters() if p.requires_grad])
        assert any(bool(t.abs().sum() > 0) for t in grads[0]), loss_type
        for other in grads[1:]:
            for a, b in zip(grads[0], other):
                assert torch.allclose(a, b, atol=1e-6, rtol=1e-4), loss_type


def _rewards_by_call(uniform_calls: int, per_step: int):
    """A scorer whose i-th group of each step (calls counted, `per_step` a step) gets equal rewards when
    i < uniform_calls, alternating 0/1 rewards otherwise; the calls are recorded."""
    calls = []

    def fake(rewards, texts, columns, frame=None, row=None):
        calls.append(columns)
        uniform = (len(calls) - 1) % per_step < uniform_calls
        return {name: [0.0 if uniform else float(k % 2) for k in range(len(texts))] for name in rewards.weights}

    return fake, calls


@pytest.mark.parametrize("uniform_calls,per_step,extra,skipped", [(2, 4, 2, 0.0), (5, 5, 3, 1.0)])
def test_dynamic_sampling_replaces_uniform_groups_within_the_bound(tiny_overrides, monkeypatch, uniform_calls,
                                                                    per_step, extra, skipped):
    """2 prompts a step, at most 3 fresh ones. Fresh groups with spread: both uniform groups are replaced at once
    (2 extra). Every group uniform: 2 fresh, still uniform, then only 1 more (the bound), and the group left
    uniform is skipped (beta 0: all its advantages are 0)."""

    fake, calls = _rewards_by_call(uniform_calls, per_step)
    monkeypatch.setattr(RewardSet, "score", fake)
    settings = ["grpo.dynamic_sampling=true", "grpo.max_extra_groups=3", "train.prompts_per_step=2",
                "grpo.beta=0", "train.save_steps=0"]
    result = train(load_config(None, [*tiny_overrides, *settings]), log=True)
    lines = read_metrics(result.output_dir / "metrics.jsonl")
    assert [line["extra_groups"] for line in lines] == [extra, extra]
    assert [line["skipped_groups"] for line in lines] == [skipped, skipped]
    assert len(calls) == 2 * (2 + extra)  # two steps of 2 prompts and their fresh ones, each scored once


@pytest.mark.parametrize("mask", [True, False])
def test_truncated_completions_are_left_out_of_the_loss(tiny_overrides, monkeypatch, mask):
    """EOS suppressed up to the length limit: every completion is truncated. Masked, no token counts: loss and
    gradient are 0; unmasked, the same rewards train."""

    monkeypatch.setattr(RewardSet, "score", _alternating_rewards)
    settings = ["grpo.min_completion_length=8", f"grpo.mask_truncated_completions={str(mask).lower()}",
                "train.save_steps=0"]
    lines = train(load_config(None, [*tiny_overrides, *settings])).metrics
    if mask:
        assert [(line["loss"], line["grad_norm"]) for line in lines] == [(0.0, 0.0), (0.0, 0.0)]
    else:
        assert all(line["grad_norm"] > 0 for line in lines)


def test_resume_continues_from_the_newest_complete_checkpoint(tiny_overrides):
    cfg = load_config(None, tiny_overrides)
    first = train(cfg, log=True)
    half_written = first.output_dir / "checkpoint-9"
    half_written.mkdir()  # no trainer_state.json: must be ignored
    (first.output_dir / ".checkpoint-10.tmp").mkdir()
    with pytest.raises(UserError, match="--resume"):
        train(cfg)
    longer = load_config(None, [*tiny_overrides, "train.max_steps=3"])
    resumed = train(longer, resume=True, log=True)
    assert [m["step"] for m in resumed.metrics] == [3]
    lines = [json.loads(l) for l in (first.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [1, 2, 3]
    state = json.loads((first.output_dir / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["step"] == 3


def test_two_epochs_of_ten_rows_at_four_per_step_are_five_steps_each_row_once_per_epoch(tiny_overrides, tmp_path,
                                                                                       monkeypatch):
    import qlora_rft.trainer as trainer

    seen = []  # the row of every prompt, in the order trained
    encode = trainer.encode_prompt

    def recording(processor, task, example, *args):
        seen.append(example.index)
        return encode(processor, task, example, *args)

    monkeypatch.setattr(trainer, "encode_prompt", recording)
    data = first_shapes_rows(tmp_path / "data", 10)
    cfg = load_config(None, [*tiny_overrides, f"data.train={data}", "train.max_steps=0", "train.epochs=2",
                             "train.prompts_per_step=4", "train.save_steps=0"])
    result = train(cfg, log=True)
    assert result.steps == 5 and [line["step"] for line in result.metrics] == [1, 2, 3, 4, 5]
    assert [line["epoch"] for line in read_metrics(result.output_dir / "metrics.jsonl")] == [0.4, 0.8, 1.2, 1.6, 2.0]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert all(len(set(seen[i:i + 4])) == 4 for i in range(0, 20, 4))
    summary = json.loads((result.output_dir / "train_summary.json").read_text())
    assert (summary["steps"], summary["epochs"], summary["data_rows"]) == (5, 2.0, 10)


def test_resume_without_checkpoints_is_a_clear_error(tiny_overrides):
    with pytest.raises(UserError, match="no complete checkpoint"):
        train(load_config(None, tiny_overrides), resume=True)


def _all_finite(run_dir: Path) -> dict[str, bool]:
    """Each checkpoint's adapter and optimizer state in a run folder -> whether every value in it is finite."""
    found = {}
    for ckpt in checkpoint.all_checkpoints(run_dir):
        adapter = load_file(str(ckpt / "adapter" / "adapter_model.safetensors"))
        optimizer = torch.load(ckpt / "optimizer.pt", weights_only=True)["state"]
        tensors = [*adapter.values(), *(t for s in optimizer.values() for t in s.values() if torch.is_tensor(t))]
        found[ckpt.name] = all(bool(torch.isfinite(t).all()) for t in tensors)
    return found


def test_a_non_finite_gradient_stops_the_process_before_the_update(tmp_path):
    """The issue's run: at learning rate 1e10 (beta 0.04) the gradient of step 2 is NaN on cpu-small."""
    out = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text("{}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "qlora_rft", "train", str(config), *TINY_RUN, "model.name_or_path=tiny:cpu-small",
         "train.learning_rate=1e10", "train.max_steps=3", f"train.output_dir={out}"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.startswith("error: step 2: the gradient norm is nan") and proc.stderr.count("\n") == 1
    assert "train.learning_rate=1e+10 is too high" in proc.stderr
    assert _all_finite(out) == {"checkpoint-1": True}  # step 2 neither applied nor saved
    assert not (out / "adapter").exists()
    assert [line["step"] for line in read_metrics(out / "metrics.jsonl")] == [1]


def test_sft_stops_at_a_non_finite_loss(tiny_overrides):
    cfg = load_config(None, [*tiny_overrides, "train.method=sft", "train.learning_rate=1e20", "train.max_steps=3"])
    with pytest.raises(TrainingError, match="step 2: the loss is nan"):
        fit(cfg)
    assert _all_finite(Path(cfg.train.output_dir)) == {"checkpoint-1": True}


def test_sampling_from_non_finite_logits_stops_the_run(tiny_overrides):
    """Weights of 1e22 are finite, but the tiny model's activations overflow: its logits are NaN."""
    cfg = load_config(None, [*tiny_overrides, "train.learning_rate=1e22"])
    with pytest.raises(TrainingError, match="step 2: the policy's next-token logits were NaN or infinite"):
        train(cfg)
    assert _all_finite(Path(cfg.train.output_dir)) == {"checkpoint-1": True}


@pytest.mark.parametrize("save_steps,folder", [(1, "checkpoint-1"), (0, "adapter")])
def test_non_finite_weights_are_never_saved(tiny_overrides, monkeypatch, save_steps, folder):
    real_step = Updates.step

    def poisoned_step(self, loss):
        norm = real_step(self, loss)
        next(p for p in self.model.parameters() if p.requires_grad).data[0] = float("nan")
        return norm

    monkeypatch.setattr(Updates, "step", poisoned_step)
    steps = ["train.max_steps=1", f"train.save_steps={save_steps}"]
    cfg = load_config(None, [*tiny_overrides, "train.method=sft", *steps])
    with pytest.raises(TrainingError, match=f"{folder} was not written: some trained weights are NaN or infinite"):
        fit(cfg)
    assert not (Path(cfg.train.output_dir) / folder).exists()


def test_rows_of_logits_with_nan_or_inf_end_their_completion():
    eos = 2
    finite = FiniteLogits(eos)
    scores = torch.tensor([[0.5, -torch.inf, 1.0], [0.5, torch.nan, 1.0], [torch.inf, 0.0, 0.0]])  # [B=3, V=3]
    out = finite(None, scores.clone())
    assert torch.equal(out[0], scores[0])  # -inf: a suppressed token, not a fault
    assert torch.equal(out[1], torch.tensor([-torch.inf, -torch.inf, 0.0]))
    assert torch.equal(out[2], torch.tensor([-torch.inf, -torch.inf, 0.0]))
    assert not finite.ok
    assert FiniteLogits(eos).ok
    clean = FiniteLogits(eos)
    clean(None, scores[:1].clone())
    assert clean.ok


def _with_a_long_prompt(folder: Path) -> Path:
    """Three rows of the synthetic shapes set, the middle one with a problem far over data.max_prompt_length=128."""
    import pyarrow.parquet as pq

    from qlora_rft.data import resolve_source

    table = pq.read_table(Path(resolve_source("synthetic:shapes")) / "train.parquet").slice(0, 3)
    problems = table.column("problem").to_pylist()
    problems[1] = "Look very carefully at the picture. " * 40 + problems[1]
    folder.mkdir()
    pq.write_table(table.set_column(table.schema.get_field_index("problem"), "problem", [problems]),
                   folder / "train.parquet")
    return folder


def test_a_prompt_over_max_prompt_length_is_skipped_and_training_goes_on(tiny_overrides, tmp_path):
    data = _with_a_long_prompt(tmp_path / "data")
    result = train(load_config(None, [*tiny_overrides, f"data.train={data}", "train.max_steps=3"]), log=False)
    assert [line["step"] for line in result.metrics] == [1, 2, 3] and result.skipped_rows == 1
    summary = json.loads((result.output_dir / "train_summary.json").read_text())
    assert summary["data_rows"] == 2
    [bad] = summary["data_skipped"]
    assert bad["index"] == 1 and "over data.max_prompt_length=128" in bad["reason"]
    with pytest.raises(UserError, match=r"row 1: prompt is \d+ tokens, over data.max_prompt_length=128"):
        train(load_config(None, [*tiny_overrides, f"data.train={data}", "data.on_bad_row=error",
                                 f"train.output_dir={tmp_path / 'run2'}"]), log=False)
