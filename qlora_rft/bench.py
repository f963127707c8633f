"""Time one GRPO optimizer step of ours against TRL's GRPOTrainer on identical settings (model, data, G, lengths).

Each side runs in its own subprocess (`python -m qlora_rft.bench --side ours|trl`), so peak memory is per side.
On CUDA each side also reports `bandwidth_fraction`: the bytes of weights one decode step reads times the decode
steps per second, over the device's memory bandwidth (`MEMORY_BANDWIDTH`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path

from qlora_rft.errors import UserError

SIDES = ("ours", "trl")
REAL_IMAGE_TOKENS_SIDE = 23  # real-size presets: images resized up to 23 x 23 merged patches = 529 visual tokens

# Memory bandwidth by device name (bytes/s; vendors' data sheets), first match wins; None: not known here.
MEMORY_BANDWIDTH = (("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12))  # "H100": the SXM (HBM3) card
REWARD_WEIGHTS = {"format": 1.0, "classification": 1.0}


@dataclass
class BenchSettings:
    """Everything both sides share; written into the results JSON."""

    preset: str
    model_path: str  # the preset's cached random-weight folder
    device: str  # cpu | cuda
    dtype: str  # compute dtype: float32 on the CPU, bfloat16 on CUDA
    steps: int  # measured optimizer steps (after one warm-up step)
    warmup_steps: int = 1
    num_generations: int = 8
    prompts_per_step: int = 1
    max_completion_length: int = 32
    min_completion_length: int = 32  # = max: EOS ignored, every completion the same length
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    beta: float = 0.04
    num_iterations: int = 1
    epsilon: float = 0.2
    learning_rate: float = 1e-5
    lr_scheduler: str = "linear"
    max_grad_norm: float = 1.0
    optimizer: str = "adamw"  # adamw on the CPU, paged_adamw_8bit on CUDA
    quantization: str = "nf4, double quant, 4-bit (vision tower and lm_head kept in full precision)"
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_regex: str = ""
    gradient_checkpointing: bool = False
    data: str = "synthetic:shapes"
    split: str = "train"
    task: str = "classification"
    min_pixels: int = 3136
    max_pixels: int = 7056
    visual_tokens_per_prompt: int = 0  # of the first measured prompt (all synthetic images are the same size)
    max_prompt_length: int = 1024
    rewards: tuple = ("format_reward", "classification_reward")
    seed: int = 0
    sampling_weights: str = "auto"  # ours: grpo.sampling_weights
    decode: str = "auto"  # ours: grpo.decode


# ----------------------------------------------------------------------------- the parent


def run_bench(
    preset: str,
    compare: str = "trl",
    steps: int = 3,
    out: str | Path | None = None,
    timeout: float | None = None,
    **options,
) -> dict:
    """Run each side in its own subprocess on identical settings (`bench_settings(preset, steps, **options)`);
    return and write the comparison JSON (default benchmarks/results/PRESET-DEVICE.json)."""
    if compare != "trl":
        raise UserError(f"bench --compare {compare!r}: only 'trl' (TRL's GRPOTrainer) is supported")
    settings = bench_settings(preset, steps, **options)
    cuda = settings.device == "cuda"
    out = Path(out) if out is not None else Path("benchmarks/results") / f"{preset}-{settings.device}.json"
    results = {}
    with tempfile.TemporaryDirectory(prefix="qlora-rft-bench-") as tmp:
        for side in SIDES:
            results[side] = side_process(side, settings, Path(tmp), timeout)

    command = (f"qlora-rft bench --preset {preset} --compare {compare} --steps {steps} "
               f"--num-generations {settings.num_generations} "
               f"--max-completion-length {settings.max_completion_length} "
               f"--sampling-weights {settings.sampling_weights} --decode {settings.decode} "
               f"--out {shlex.quote(str(out))}")
    bandwidth = memory_bandwidth(device_name(cuda)) if cuda else None
    for side in SIDES:
        results[side]["bandwidth_fraction"] = bandwidth_fraction(results[side], bandwidth)
    report = {
        "ours": results["ours"],
        "trl": results["trl"],
        "ratio": results["ours"]["step_seconds"] / results["trl"]["step_seconds"],
        "device": device_name(cuda),
        "memory_bandwidth_bytes_per_second": bandwidth,
        "versions": versions(),
        "settings": asdict(settings),
        "command": command,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=2)
    out.write_text(text + "\n")
    return json.loads(text)  # exactly what the file holds (tuples as lists)


def bench_settings(
    preset: str,
    steps: int = 3,
    num_generations: int = 8,
    max_completion_length: int = 32,
    beta: float = 0.04,
    temperature: float = 1.0,
    learning_rate: float = 1e-5,
    gradient_checkpointing: bool | None = None,
    max_pixels: int | None = None,
    sampling_weights: str = "auto",
    decode: str = "auto",
    model_path: str | Path | None = None,
    device: str | None = None,
) -> BenchSettings:
    """The settings both sides share, checked; the synthetic data generated once, here.

    `model_path` None: the preset's cached random model (built here once, so neither side pays for it). `device`
    None: cuda when available. `gradient_checkpointing` None: off for the tiny presets, on otherwise. Images: at most
    84x84 for the tiny presets (`max_pixels` None: 7056); for the real-size ones resized up to 23 x 23 visual tokens
    (529 a prompt: 644x644 pixels for Qwen2/2.5-VL, 736x736 for Qwen3-VL).
    """
    from qlora_rft import tiny
    from qlora_rft.config import GRPOConfig, LoraSettings
    from qlora_rft.data import load_split
    from qlora_rft.model import lora_target_regex
    from qlora_rft.models import family_of
    from qlora_rft.tasks import get_task

    if steps < 1:
        raise UserError("bench --steps must be >= 1")
    if num_generations < 2:
        raise UserError("bench --num-generations must be >= 2")
    if preset not in tiny.PRESETS:
        raise UserError(f"unknown preset {preset!r}: choose one of {', '.join(tiny.PRESETS)}")
    choices = {f.name: f.metadata["choices"] for f in fields(GRPOConfig)}
    for flag, value, name in (("--sampling-weights", sampling_weights, "sampling_weights"),
                              ("--decode", decode, "decode")):
        if value not in choices[name]:
            raise UserError(f"bench {flag} {value!r}: choose one of {', '.join(choices[name])}")
    small = preset in tiny.SMALL_PRESETS
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = device == "cuda"

    model_path = Path(model_path) if model_path is not None else tiny.cached_model(preset)
    factor = family_of(model_path).factor  # pixels per visual token side: 28 (Qwen2/2.5-VL) or 32 (Qwen3-VL)
    real_pixels = (REAL_IMAGE_TOKENS_SIDE * factor) ** 2
    settings = BenchSettings(
        preset=preset,
        model_path=str(model_path),
        device=device,
        dtype="bfloat16" if cuda else "float32",
        steps=steps,
        num_generations=num_generations,
        max_completion_length=max_completion_length,
        min_completion_length=max_completion_length,
        temperature=temperature,
        beta=beta,
        learning_rate=learning_rate,
        optimizer="paged_adamw_8bit" if cuda else "adamw",
        lora_target_regex=lora_target_regex(LoraSettings(), family_of(model_path)),
        gradient_checkpointing=(not small) if gradient_checkpointing is None else gradient_checkpointing,
        min_pixels=3136 if small else real_pixels,
        max_pixels=max_pixels or (7056 if small else real_pixels),
        sampling_weights=sampling_weights,
        decode=decode,
    )
    load_split(settings.data, settings.split, get_task(settings.task), min_pixels=settings.min_pixels,
               max_pixels=settings.max_pixels, factor=factor)
    settings.visual_tokens_per_prompt = visual_tokens(settings)
    return settings


def side_process(side: str, settings: BenchSettings, tmp: Path, timeout: float | None) -> dict:
    """One side in a fresh interpreter: `python -m qlora_rft.bench --side SIDE`; its result JSON back."""
    settings_file, result_file = tmp / f"{side}-settings.json", tmp / f"{side}-result.json"
    settings_file.write_text(json.dumps(asdict(settings)))
    cmd = [sys.executable, "-m", "qlora_rft.bench", "--side", side, "--settings", str(settings_file),
           "--result", str(result_file), "--workdir", str(tmp / side)]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    if proc.returncode != 0 or not result_file.is_file():
        tail = (proc.stderr or proc.stdout or "")[-4000:]
        raise RuntimeError(f"bench side {side!r} failed (exit {proc.returncode}):\n{tail}")
    return json.loads(result_file.read_text())


def visual_tokens(s: BenchSettings) -> int:
    """Image tokens in the first measured prompt: one per merged patch of the resized image."""
    from qlora_rft.data import open_image, resize_image
    from qlora_rft.models import family_of

    factor = family_of(Path(s.model_path)).factor
    width, height = resize_image(open_image(measured_rows(s)[0]), s.min_pixels, s.max_pixels, factor).size
    return (width // factor) * (height // factor)


def memory_bandwidth(name: str) -> float | None:
    """The device's memory bandwidth in bytes/s from `MEMORY_BANDWIDTH`, or None when not listed.

    >>> memory_bandwidth("NVIDIA H100 80GB HBM3"), memory_bandwidth("NVIDIA H200"), memory_bandwidth("NVIDIA L4")
    (3350000000000.0, 4800000000000.0, None)
    """
    return next((bandwidth for key, bandwidth in MEMORY_BANDWIDTH if key in name), None)


def bandwidth_fraction(side: dict, bandwidth: float | None) -> float | None:
    """bytes of weights a decode step reads x decode steps per second / memory bandwidth. Decode steps per second
    are generated tokens per second over the rows decoded together; the generation time includes the prefill (and
    the merge), so this is a lower bound of the decode loop's own fraction.

    >>> bandwidth_fraction({"decode_weight_bytes": 10**9, "generation_tokens_per_second": 800.0,
    ...                     "rows_per_decode_step": 8}, 2e11)
    0.5
    """
    if bandwidth is None or not side.get("decode_weight_bytes"):
        return None
    steps_per_second = side["generation_tokens_per_second"] / side["rows_per_decode_step"]
    return side["decode_weight_bytes"] * steps_per_second / bandwidth


def device_name(cuda: bool) -> str:
    if cuda:
        import torch

        return torch.cuda.get_device_name(0)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores visible)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "transformers", "trl", "peft", "bitsandbytes", "accelerate", "qlora_rft"):
        try:
            found[name] = version(name.replace("_", "-"))
        except PackageNotFoundError:
            found[name] = None
    found["python"] = platform.python_version()
    return found


# ----------------------------------------------------------------------------- the sides (subprocesses)


def peak_memory() -> tuple[int, str]:
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated()), "cuda_max_allocated"
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "cpu_peak_rss"  # KB on Linux


def measured_rows(s: BenchSettings) -> list:
    """The prompts of steps 1..warmup+steps, in the order our trainer visits them (same seed, same order)."""
    from qlora_rft.data import load_split
    from qlora_rft.order import PromptOrder
    from qlora_rft.tasks import get_task

    from qlora_rft.models import family_of

    data = load_split(s.data, s.split, get_task(s.task), min_pixels=s.min_pixels, max_pixels=s.max_pixels,
                      factor=family_of(s.model_path).factor)
    order = PromptOrder(len(data.examples), s.seed, s.prompts_per_step)
    count = (s.warmup_steps + s.steps) * s.prompts_per_step
    return [data.examples[order.index(i)] for i in range(count)]


def side_ours(s: BenchSettings, workdir: Path) -> dict:
    from qlora_rft.config import load_config
    from qlora_rft.trainer import train

    overrides = [
        f"model.name_or_path={s.model_path}", "model.mode=qlora", f"model.device={s.device}",
        f"model.gradient_checkpointing={str(s.gradient_checkpointing).lower()}",
        f"lora.r={s.lora_r}", f"lora.alpha={s.lora_alpha}", f"lora.dropout={s.lora_dropout}",
        f"data.task={s.task}", f"data.train={s.data}", f"data.train_split={s.split}",
        f"data.min_pixels={s.min_pixels}", f"data.max_pixels={s.max_pixels}",
        f"data.max_prompt_length={s.max_prompt_length}",
        "rewards.weights={" + ", ".join(f"{k}: {v}" for k, v in REWARD_WEIGHTS.items()) + "}",
        f"grpo.num_generations={s.num_generations}", "grpo.generation_chunk=0", "grpo.backward_chunk=0",
        f"grpo.sampling_weights={s.sampling_weights}", f"grpo.decode={s.decode}",
        f"grpo.max_completion_length={s.max_completion_length}",
        f"grpo.min_completion_length={s.min_completion_length}",
        f"grpo.temperature={s.temperature}", f"grpo.top_p={s.top_p}", f"grpo.top_k={s.top_k}",
        f"grpo.beta={s.beta}", f"grpo.num_iterations={s.num_iterations}", f"grpo.epsilon={s.epsilon}",
        "grpo.loss_type=grpo", "warmup.steps=0",
        f"train.output_dir={workdir}", f"train.max_steps={s.warmup_steps + s.steps}",
        f"train.prompts_per_step={s.prompts_per_step}", f"train.learning_rate={s.learning_rate}",
        f"train.lr_scheduler={s.lr_scheduler}", "train.warmup_ratio=0.0", f"train.optimizer={s.optimizer}",
        f"train.max_grad_norm={s.max_grad_norm}", "train.save_steps=0", f"train.seed={s.seed}",
    ]
    result = train(load_config(None, overrides), log=False)
    lines = result.metrics[s.warmup_steps:]
    sampling = json.loads((workdir / "train_summary.json").read_text())["sampling"]
    return {
        "step_seconds": statistics.median(m["step_seconds"] for m in lines),
        "step_seconds_all": [m["step_seconds"] for m in result.metrics],
        "generation_tokens_per_second": statistics.median(m["tokens_per_second"] for m in lines),
        "completion_length": statistics.mean(m["completion_length"] for m in lines),
        "sampling": sampling,
        "decode_weight_bytes": sampling["decode_weight_bytes"],
        "rows_per_decode_step": s.num_generations,  # generation_chunk 0: one group per call
        "decode_counters": {k: lines[-1][k] for k in ("decode_builds", "decode_compiles") if k in lines[-1]},
    }


def side_trl(s: BenchSettings, workdir: Path) -> dict:
    """TRL's GRPOTrainer on the same model, rows, images and settings as ours, configured as a competent user would;
    its step seconds from a callback, its generation from a wrapper around the generate it calls."""
    import huggingface_hub.constants
    import torch
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOTrainer

    from qlora_rft.config import ModelConfig
    from qlora_rft.model import keep_training_layout, load_base
    from qlora_rft.pretrained import load_processor
    from qlora_rft.rewards import classification_reward, format_reward
    from qlora_rft.sampling.weights import decode_weight_bytes

    # The model as a TRL user would load it: from_pretrained with the same BitsAndBytesConfig (NF4, double quant).
    model = load_base(Path(s.model_path), ModelConfig(name_or_path=s.model_path, mode="qlora"),
                      torch.device(s.device), getattr(torch, s.dtype))
    keep_training_layout(model)  # on the CPU, bitsandbytes would otherwise repack weights in eval mode
    processor = load_processor(s.model_path, padding_side="left")
    peft_config = LoraConfig(r=s.lora_r, lora_alpha=s.lora_alpha, lora_dropout=s.lora_dropout,
                             target_modules=s.lora_target_regex, bias="none", task_type="CAUSAL_LM")

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.last, self.seconds = None, []

        def on_train_begin(self, *args, **kwargs):
            self.last = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            now = time.perf_counter()
            self.seconds.append(now - self.last)
            self.last = now

    timer = StepTimer()
    huggingface_hub.constants.HF_HUB_DISABLE_TELEMETRY = True  # TRL's trainer would report its use to the hub
    trainer = GRPOTrainer(model=model, reward_funcs=[format_reward, classification_reward], args=trl_args(s, workdir),
                          train_dataset=trl_dataset(s, processor), processing_class=processor,
                          peft_config=peft_config, callbacks=[timer])
    target = trainer.accelerator.unwrap_model(trainer.model)  # the model TRL generates with (the PeftModel here)
    generation = GenerationTimer(target, s.device == "cuda")
    trainer.train()

    steps = s.warmup_steps + s.steps
    if len(timer.seconds) != steps or len(generation.per_step) != steps:
        raise RuntimeError(f"TRL ran {len(timer.seconds)} steps and {len(generation.per_step)} generate calls; "
                           f"expected {steps} of each")
    lengths = [entry.get("completions/mean_length") for entry in trainer.state.log_history
               if "completions/mean_length" in entry]
    return {
        "step_seconds": statistics.median(timer.seconds[s.warmup_steps:]),
        "step_seconds_all": timer.seconds,
        "generation_tokens_per_second": statistics.median(generation.per_step[s.warmup_steps:]),
        "completion_length": statistics.mean(lengths[s.warmup_steps:]) if lengths else None,
        "decode_weight_bytes": decode_weight_bytes(target),  # 4-bit base + LoRA, as TRL samples
        "rows_per_decode_step": s.num_generations * s.prompts_per_step,
    }


def trl_dataset(s: BenchSettings, processor):
    """The measured rows as TRL's conversational image dataset: the image resized as ours, the task's prompt."""
    from datasets import Dataset

    from qlora_rft.data import open_image, resize_image
    from qlora_rft.models import family_of
    from qlora_rft.tasks import get_task

    task, rows, factor = get_task(s.task), measured_rows(s), family_of(processor).factor
    return Dataset.from_dict({
        "image": [resize_image(open_image(ex), s.min_pixels, s.max_pixels, factor) for ex in rows],
        "prompt": [[{"role": "user", "content": [{"type": "image"},
                                                 {"type": "text", "text": task.prompt(ex.problem)}]}]
                   for ex in rows],
        "solution": [ex.solution for ex in rows],
    })


def trl_args(s: BenchSettings, workdir: Path):
    """GRPOConfig with our side's settings: one prompt's group per step, EOS ignored, the same loss, optimizer,
    schedule and checkpointing, nothing logged or saved."""
    from trl import GRPOConfig

    cuda = s.device == "cuda"
    return GRPOConfig(
        output_dir=str(workdir),
        per_device_train_batch_size=s.num_generations * s.prompts_per_step,  # one prompt's group per step
        gradient_accumulation_steps=1,
        num_generations=s.num_generations,
        max_completion_length=s.max_completion_length,
        generation_kwargs={"min_new_tokens": s.min_completion_length},  # EOS ignored: fixed lengths
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k,
        beta=s.beta,
        num_iterations=s.num_iterations,
        epsilon=s.epsilon,
        loss_type="grpo",  # per-sequence mean, then over the group: ours' grpo.loss_type=grpo
        scale_rewards="group",
        learning_rate=s.learning_rate,
        lr_scheduler_type=s.lr_scheduler,
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=s.max_grad_norm,
        optim="paged_adamw_8bit" if s.optimizer == "paged_adamw_8bit" else "adamw_torch",
        max_steps=s.warmup_steps + s.steps,
        gradient_checkpointing=s.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        use_cpu=not cuda,
        bf16=cuda,
        seed=s.seed,
        shuffle_dataset=False,  # rows already in our trainer's order
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        log_completions=False,
        dataloader_num_workers=0,
    )


class GenerationTimer:
    """Wraps `target.generate`: each call's seconds (synchronised on CUDA) and generated tokens, and its
    tokens per second in `per_step` (one generate call per TRL step here)."""

    def __init__(self, target, cuda: bool):
        self.original, self.cuda = target.generate, cuda
        self.seconds, self.tokens, self.per_step = 0.0, 0, []
        target.generate = self

    def __call__(self, *args, **kwargs):
        import torch

        prompt_length = kwargs["input_ids"].shape[1] if "input_ids" in kwargs else args[0].shape[1]
        if self.cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        output = self.original(*args, **kwargs)
        if self.cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        tokens = output.shape[0] * (output.shape[1] - prompt_length)
        self.seconds += seconds
        self.tokens += tokens
        self.per_step.append(tokens / max(seconds, 1e-9))
        return output


def run_side(side: str, settings: BenchSettings, workdir: Path) -> dict:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    load_before = os.getloadavg()[0]
    result = (side_ours if side == "ours" else side_trl)(settings, workdir)
    result["peak_memory_bytes"], result["peak_memory_kind"] = peak_memory()
    # The CPU may be shared: the 1-minute load average around the run says how busy the machine was.
    result["load_average_1min"] = [load_before, os.getloadavg()[0]]
    result["torch_threads"] = torch.get_num_threads()
    return result


# ----------------------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> int:
    """`python -m qlora_rft.bench --preset P [--steps N --out FILE]`; with `--side` it is one side's subprocess."""
    parser = argparse.ArgumentParser(prog="python -m qlora_rft.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu-small")
    parser.add_argument("--compare", default="trl")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default=None)
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--max-completion-length", type=int, default=32)
    parser.add_argument("--sampling-weights", default="auto")
    parser.add_argument("--decode", default="auto")
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.side:
        raw = json.loads(Path(args.settings).read_text())
        raw["rewards"] = tuple(raw["rewards"])
        result = run_side(args.side, BenchSettings(**raw), Path(args.workdir))
        Path(args.result).write_text(json.dumps(result))
        return 0

    report = run_bench(args.preset, args.compare, args.steps, args.out, num_generations=args.num_generations,
                       max_completion_length=args.max_completion_length, sampling_weights=args.sampling_weights,
                       decode=args.decode)
    for side in SIDES:
        r = report[side]
        print(f"{side:>4}: {r['step_seconds']:.3f} s/step, {r['generation_tokens_per_second']:.1f} gen tok/s, "
              f"peak {r['peak_memory_bytes'] / 2**20:.0f} MiB ({r['peak_memory_kind']})")
    print(f"ratio ours/trl: {report['ratio']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
