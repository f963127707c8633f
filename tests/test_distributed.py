"""Paper mode under `accelerate launch`: DeepSpeed ZeRO-3 on 2 CPU processes (gloo), its equality with one process,
and the launches that are refused before any model loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qlora_rft.config import load_config
from qlora_rft.distributed import Launch, check_launch
from qlora_rft.errors import ConfigError

ROOT = Path(__file__).parents[1]
ZERO3_CPU = ROOT / "configs" / "accelerate" / "zero3_cpu.yaml"
PAPER = ROOT / "configs" / "tiny_paper_mode.yaml"
JOB = Path(__file__).parent / "dist_job.py"


def _env() -> dict:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]


def _launch(*args: str, processes: int = 2) -> None:
    accelerate = Path(sys.executable).parent / "accelerate"
    _run([str(accelerate), "launch", "--config_file", str(ZERO3_CPU), "--num_processes", str(processes), *args])


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    """The weights of a from_pretrained folder, as plain transformers loads them."""
    from transformers import AutoModelForImageTextToText

    model, info = AutoModelForImageTextToText.from_pretrained(str(folder), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info  # nothing left at random init
    return model.state_dict()


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["tiny", "qwen2.5-vl-tiny", "qwen3-vl-tiny", "tiny-tied"])  # every family; tied
def test_paper_mode_trains_on_two_zero3_processes_and_saves_a_plain_model(tmp_path, preset):
    """tiny-tied: lm_head is embed_tokens (as in Qwen2-VL-2B); the saved model loads tied, and the one weight
    trained."""
    from safetensors import safe_open
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from qlora_rft.model import resolve_model_path

    base = resolve_model_path(f"tiny:{preset}")  # built here once, in the test session's cache
    out = tmp_path / "run"
    _launch("-m", "qlora_rft", "train", str(PAPER), f"model.name_or_path=tiny:{preset}", f"train.output_dir={out}")

    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2]  # one writer, not one per process
    assert json.loads((out / "train_summary.json").read_text())["processes"] == 2
    weights = _weights(out / "model")  # plain transformers, every weight found
    AutoProcessor.from_pretrained(str(out / "model"))
    reference = _weights(base)
    assert weights.keys() == reference.keys()
    for name, tensor in reference.items():
        assert weights[name].shape == tensor.shape, name
    tied = preset == "tiny-tied"
    model = AutoModelForImageTextToText.from_pretrained(str(out / "model"))
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert (head is embed) == model.config.tie_word_embeddings == tied
    with safe_open(str(out / "model" / "model.safetensors"), "pt") as f:  # tied: one weight, stored once
        assert any("lm_head" in k for k in f.keys()) != tied
    embed_key = next(k for k in reference if k.endswith("embed_tokens.weight"))
    assert not torch.equal(weights[embed_key], reference[embed_key])  # trained


@pytest.mark.slow
def test_two_zero3_processes_update_the_weights_exactly_as_one_process(tmp_path):
    """Teacher-forced completions: 2 processes x 1 prompt under ZeRO-3 against 1 plain process x the same 2 prompts
    (gradient accumulation over prompts). Same loss, same rewards, same updated weights."""
    from qlora_rft.model import resolve_model_path

    base = _weights(resolve_model_path("tiny:tiny"))
    one, two = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, str(JOB), str(PAPER), "train.prompts_per_step=2", f"train.output_dir={one}"])
    # two backward passes per step in each process: accumulation across passes is exercised too
    _launch(str(JOB), str(PAPER), "train.prompts_per_step=1", "grpo.backward_chunk=2", f"train.output_dir={two}")

    m1 = json.loads((one / "job_metrics.json").read_text())
    m2 = json.loads((two / "job_metrics.json").read_text())
    for a, b in zip(m1, m2, strict=True):
        assert a["reward"] == pytest.approx(b["reward"], abs=1e-9)
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
        assert a["learning_rate"] == pytest.approx(b["learning_rate"], abs=1e-12)
    assert m1[0]["reward_std"] > 0  # rewards differ inside each group: a real update

    w1, w2 = _weights(one / "model"), _weights(two / "model")
    assert w1.keys() == w2.keys() == base.keys()
    moved = torch.cat([(w1[k] - base[k]).abs().flatten() for k in base])
    gap = torch.cat([(w1[k] - w2[k]).abs().flatten() for k in base])
    assert moved.median() > 1e-4  # lr 1e-4, two Adam steps: the weights did move (by ~1.5e-4)...
    # ...and the same way. Tolerance: the two sum the same gradients in a different order (float rounding), and
    # Adam divides each gradient element by its own size, so an element whose gradient is nearly 0 turns rounding
    # into a visible step. Measured: max 1e-6, 7 of 260,480 elements above 1e-7.
    assert gap.max() < 1e-5, f"one process vs two: max weight difference {gap.max():.2e}"
    assert (gap > 1e-7).float().mean() < 1e-4, f"{int((gap > 1e-7).sum())} elements differ by more than 1e-7"


@pytest.mark.slow
def test_lora_mode_under_zero3_trains_the_adapters_as_one_process(tmp_path):
    """LoRA on a full-precision base under ZeRO-3: the reference is the adapters-disabled policy, sharded like it,
    and the adapter folder is written from the gathered shards."""
    from safetensors.torch import load_file

    lora = ["model.mode=lora", "lora.train_vision=false", "lora.dropout=0.0", "train.learning_rate=0.001"]
    one, two = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, str(JOB), str(PAPER), *lora, "train.prompts_per_step=2", f"train.output_dir={one}"])
    _launch(str(JOB), str(PAPER), *lora, "train.prompts_per_step=1", "grpo.backward_chunk=2",
            f"train.output_dir={two}")

    a = load_file(str(one / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(two / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and len(a) == 28  # 7 adapted linears x 2 layers x (A, B)
    assert max(t.abs().max().item() for k, t in a.items() if "lora_B" in k) > 1e-3
    gap = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])  # measured: max 1.4e-6, 7 of 32,768 above 1e-7
    assert gap.max() < 1e-5 and (gap > 1e-7).float().mean() < 1e-3, f"max adapter difference {gap.max():.2e}"


@pytest.mark.slow
def test_two_ddp_processes_train_the_adapters_exactly_as_one_process(tmp_path):
    """QLoRA mode under DDP (torchrun with gloo: what configs/accelerate/ddp.yaml does on GPUs): the reference is
    the adapters-disabled base in each process, and the adapters' gradients are averaged over the processes."""
    from safetensors.torch import load_file

    qlora = ["model.mode=qlora", "lora.train_vision=false", "lora.dropout=0.0", "train.learning_rate=0.001"]
    one, two = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, str(JOB), str(PAPER), *qlora, "train.prompts_per_step=2", f"train.output_dir={one}"])
    torchrun = Path(sys.executable).parent / "torchrun"
    _run([str(torchrun), "--nproc_per_node", "2", str(JOB), str(PAPER), *qlora, "train.prompts_per_step=1",
          "grpo.backward_chunk=2", f"train.output_dir={two}"])  # the first pass of each step without all-reduce

    m1 = json.loads((one / "job_metrics.json").read_text())
    m2 = json.loads((two / "job_metrics.json").read_text())
    assert [a["loss"] for a in m1] == pytest.approx([b["loss"] for b in m2], abs=1e-7)
    a = load_file(str(one / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(two / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert max(t.abs().max().item() for k, t in a.items() if "lora_B" in k) > 1e-3  # the adapters learned...
    # ...the same way, within the rounding that Adam magnifies on near-zero gradient elements (see the ZeRO-3 test).
    # Measured: bit-identical with one pass per step; with two, 1 of 32,768 elements differs by 1.2e-6 (chunking
    # alone in one process does the same).
    gap = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert gap.max() < 1e-5, f"one process vs two: max adapter difference {gap.max():.2e}"
    assert (gap > 1e-7).float().mean() < 1e-3, f"{int((gap > 1e-7).sum())} elements differ by more than 1e-7"
    assert json.loads((two / "train_summary.json").read_text())["processes"] == 2


@pytest.mark.slow
def test_step_wide_counts_span_the_processes_under_ddp(tmp_path):
    """dapo divides by every process's tokens and batch scaling by the std of every process's rewards: groups that
    differ in both (--varied), 2 DDP processes x 1 prompt still update the adapters as 1 process x 2 prompts."""
    from safetensors.torch import load_file

    settings = ["model.mode=qlora", "lora.train_vision=false", "lora.dropout=0.0", "train.learning_rate=0.001",
                "grpo.loss_type=dapo", "grpo.scale_rewards=batch"]
    one, two = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, str(JOB), str(PAPER), *settings, "train.prompts_per_step=2", f"train.output_dir={one}",
          "--varied"])
    torchrun = Path(sys.executable).parent / "torchrun"
    _run([str(torchrun), "--nproc_per_node", "2", str(JOB), str(PAPER), *settings, "train.prompts_per_step=1",
          f"train.output_dir={two}", "--varied"])
    m1 = json.loads((one / "job_metrics.json").read_text())
    m2 = json.loads((two / "job_metrics.json").read_text())
    assert [a["loss"] for a in m1] == pytest.approx([b["loss"] for b in m2], abs=1e-7)
    a = load_file(str(one / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(two / "adapter" / "adapter_model.safetensors"))
    assert max(t.abs().max().item() for k, t in a.items() if "lora_B" in k) > 1e-3  # the adapters learned
    gap = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert gap.max() < 1e-5, f"one process vs two: max adapter difference {gap.max():.2e}"


@pytest.mark.slow
def test_a_resumed_zero3_run_equals_an_uninterrupted_one(tmp_path):
    """Sharded checkpoints (weights, Adam state, schedule and each process's RNG) resume under the same launch."""
    steps = ["train.lr_scheduler=constant", "train.save_steps=1", "train.save_total_limit=1"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    _launch(str(JOB), str(PAPER), *steps, "train.max_steps=3", f"train.output_dir={whole}")
    _launch(str(JOB), str(PAPER), *steps, "train.max_steps=2", f"train.output_dir={split}")
    assert [p.name for p in split.glob("checkpoint-*")] == ["checkpoint-2"]  # pruned to the newest
    _launch(str(JOB), str(PAPER), *steps, "train.max_steps=3", f"train.output_dir={split}", "--resume")

    a, b = _weights(whole / "model"), _weights(split / "model")
    for name in a:
        assert torch.equal(a[name], b[name]), name
    whole_lines = json.loads((whole / "job_metrics.json").read_text())
    resumed_lines = json.loads((split / "job_metrics.json").read_text())
    assert [line["step"] for line in resumed_lines] == [3]
    assert resumed_lines[0]["loss"] == whole_lines[2]["loss"]


@pytest.mark.slow
def test_a_resumed_ddp_run_equals_an_uninterrupted_one(tmp_path):
    """Without DeepSpeed the checkpoint holds one copy of the (replicated) adapter and optimizer, and every
    process's RNG states (rng.pt, rng-1.pt, ...): real sampling, rewards that depend on every sampled character."""
    from safetensors.torch import load_file

    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", str(JOB), str(PAPER),
                "--sample"]
    steps = ["model.mode=qlora", "lora.train_vision=false", "lora.dropout=0.0", "train.learning_rate=0.001",
             "train.lr_scheduler=constant", "train.save_steps=1"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    _run([*torchrun, *steps, "train.max_steps=3", f"train.output_dir={whole}"])
    _run([*torchrun, *steps, "train.max_steps=2", f"train.output_dir={split}"])
    assert (split / "checkpoint-2" / "rng.pt").is_file() and (split / "checkpoint-2" / "rng-1.pt").is_file()
    _run([*torchrun, *steps, "train.max_steps=3", f"train.output_dir={split}", "--resume"])

    a = load_file(str(whole / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(split / "adapter" / "adapter_model.safetensors"))
    assert max(t.abs().max().item() for k, t in a.items() if "lora_B" in k) > 0  # the run learned something
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_a_full_mode_checkpoint_resumes_in_one_process(tmp_path):
    """Full mode without DeepSpeed: the checkpoint holds the whole model's weights instead of an adapter."""
    steps = ["train.lr_scheduler=constant", "train.save_steps=1", "train.save_total_limit=1"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    _run([sys.executable, str(JOB), str(PAPER), *steps, "train.max_steps=3", f"train.output_dir={whole}"])
    _run([sys.executable, str(JOB), str(PAPER), *steps, "train.max_steps=2", f"train.output_dir={split}"])
    assert (split / "checkpoint-2" / "model.pt").is_file()
    _run([sys.executable, str(JOB), str(PAPER), *steps, "train.max_steps=3", f"train.output_dir={split}",
          "--resume"])
    a, b = _weights(whole / "model"), _weights(split / "model")
    for name in a:
        assert torch.equal(a[name], b[name]), name


def _cfg(*overrides: str):
    return load_config(PAPER, list(overrides))


def test_launch_is_read_from_what_accelerate_launch_sets():
    assert Launch.from_env({}) == Launch()
    env = {"WORLD_SIZE": "16", "RANK": "9", "LOCAL_RANK": "1", "ACCELERATE_USE_DEEPSPEED": "true",
           "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}
    assert Launch.from_env(env) == Launch(16, 9, 1, True, 3)
    file_env = {"WORLD_SIZE": "2", "ACCELERATE_USE_DEEPSPEED": "true",
                "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(ROOT / "configs/accelerate/deepspeed/zero3_cpu.json")}
    assert Launch.from_env(file_env).zero_stage == 3  # read from the DeepSpeed file


def test_bad_launches_are_named_before_any_model_loads(tmp_path):
    zero3 = Launch(world_size=8, deepspeed=True, zero_stage=3)
    check_launch(_cfg(), zero3, rows=512)  # the paper's setup is fine
    with pytest.raises(ConfigError, match="model.mode=qlora under DeepSpeed ZeRO-3"):
        check_launch(_cfg("model.mode=qlora"), zero3)
    check_launch(_cfg("train.prompts_per_step=2"), zero3, rows=65)  # LVIS few-shot on 8 GPUs: uneven is fine
    with pytest.raises(ConfigError, match="12 training rows cannot be divided among 8 processes x "
                                          "train.prompts_per_step=2") as info:
        check_launch(_cfg("train.prompts_per_step=2"), zero3, rows=12)
    assert "launch at most 6 processes" in str(info.value)
    with pytest.raises(ConfigError, match="train.method=sft runs in one process"):
        check_launch(_cfg("train.method=sft"), Launch(world_size=2))

    ds_file = tmp_path / "ds.json"
    ds_file.write_text(json.dumps({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 3}))
    launch = Launch(world_size=2, deepspeed=True, zero_stage=3, deepspeed_config_file=str(ds_file))
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu=3 does not fit the groups") as info:
        check_launch(_cfg("grpo.num_generations=8", "grpo.backward_chunk=4"), launch)
    assert "set train_micro_batch_size_per_gpu to \"auto\" (the trainer fills it in) or 4" in str(info.value)
    ds_file.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 4}))
    check_launch(_cfg("grpo.num_generations=8", "grpo.backward_chunk=4", "train.prompts_per_step=2"), launch)


def test_the_cli_refuses_a_bad_launch_with_one_line_and_exit_2(tmp_path):
    env = {**_env(), "WORLD_SIZE": "2", "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}
    proc = subprocess.run([sys.executable, "-m", "qlora_rft", "train", str(PAPER), "model.mode=qlora",
                           f"train.output_dir={tmp_path}"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "model.mode=qlora under DeepSpeed ZeRO-3" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "paper").glob("*.yaml")), ids=lambda p: p.name)
def test_paper_configs_hold_the_papers_settings_and_fit_an_8_gpu_zero3_launch(path):
    cfg = load_config(path)
    assert cfg.model.mode == "full" and cfg.model.dtype == "bfloat16" and cfg.lora.train_vision
    assert cfg.train.learning_rate == 1e-6 and cfg.grpo.beta == 0.04 and cfg.train.prompts_per_step == 2
    assert cfg.grpo.num_generations == (8 if path.name.startswith("2b") else 4)
    assert (cfg.data.max_pixels, cfg.data.max_prompt_length, cfg.grpo.max_completion_length) == (401408, 1024, 256)
    assert cfg.grpo.top_k == 50  # transformers' generate default, which the original sampled with
    # The original's length: its scripts' num_train_epochs (COCO base65 2, classification 1, LISA 6); 200 steps for
    # the few-shot detection sets it has no script for.
    task = path.stem.split("_", 1)[1]
    epochs = {"coco_base65_ov": 2, "lisa_grounding": 6, "coco_8cat_4shot": 0, "lvis_fewshot": 0}.get(task, 1)
    assert (cfg.train.epochs, cfg.train.max_steps) == ((epochs, 0) if epochs else (0, 200))
    text = path.read_text()
    assert f"accelerate launch --config_file configs/accelerate/zero3.yaml -m qlora_rft train configs/paper/" \
           f"{path.name}" in text and "# Hardware:" in text
    assert " Length: " in text and "~200 steps" not in text
    check_launch(cfg, Launch(world_size=8, deepspeed=True, zero_stage=3))
