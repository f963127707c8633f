"""Supervised warm-up of a base on the training solutions, so that a random tiny base writes the answer format.

The tiny base then plays the part of an Instruct model. The warmed folder is cached under a hash of everything that
decides it (base, data, warm-up settings, seed), so `train` and `demo` build it once and reuse it.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import replace
from pathlib import Path

import torch

from qlora_rft.config import Config
from qlora_rft.data import Example, load_split, model_inputs, prompt_text
from qlora_rft.files import atomic_folder
from qlora_rft.model import load_for_inference, model_family
from qlora_rft.tasks import Task, get_task


def supervised_batch(processor, task: Task, examples: list[Example], data_cfg, device: torch.device) -> dict:
    """Prompt + target completion for each example; labels are -100 on the prompt and on padding."""
    tok = processor.tokenizer
    images, frames = model_inputs(processor, examples, data_cfg.min_pixels, data_cfg.max_pixels)
    prompts = [prompt_text(processor, task, ex.problem, frame, len(ex.images)) for ex, frame in zip(examples, frames)]
    targets = [task.warmup_target(ex.solution, frame) + tok.eos_token for ex, frame in zip(examples, frames)]
    side = tok.padding_side
    tok.padding_side = "right"
    try:
        full = processor(text=[p + t for p, t in zip(prompts, targets)], images=images, return_tensors="pt",
                         padding=True)
        prompt_only = processor(text=prompts, images=images, return_tensors="pt", padding=True)
    finally:
        tok.padding_side = side
    labels = full["input_ids"].clone()  # [B, L]
    prompt_lengths = prompt_only["attention_mask"].sum(-1)  # [B]
    positions = torch.arange(labels.shape[1])[None, :]  # [1, L]
    labels[(positions < prompt_lengths[:, None]) | (full["attention_mask"] == 0)] = -100
    full["labels"] = labels
    return {k: v.to(device) for k, v in full.items()}


def warmup_key(cfg: Config) -> str:
    decided_by = {
        "model": cfg.model.name_or_path,
        "warmup": vars(cfg.warmup),
        "data": [cfg.data.task, cfg.warmup.data or cfg.data.train, cfg.data.train_split, cfg.data.min_pixels,
                 cfg.data.max_pixels],
        "seed": cfg.train.seed,
    }
    return hashlib.sha256(json.dumps(decided_by, sort_keys=True).encode()).hexdigest()[:16]


def warmed_base(cfg: Config, console=None) -> str:
    """The folder GRPO starts from: model.name_or_path itself, or its warmed-up copy (built once, cached)."""
    if cfg.warmup.steps == 0:
        return cfg.model.name_or_path
    from qlora_rft.files import cache_dir

    folder = cache_dir() / "warm" / warmup_key(cfg)
    if not (folder / "config.json").is_file():
        run_warmup(cfg, folder, console)
    return str(folder)


def run_warmup(cfg: Config, out: Path, console=None) -> Path:
    """Full fine-tune of the base (full precision) on the training solutions for warmup.steps steps."""
    from qlora_rft.runlog import RunLogger

    task = get_task(cfg.data.task)
    source = cfg.warmup.data or cfg.data.train
    data = load_split(source, cfg.data.train_split, task, cfg.data.on_bad_row, cfg.data.image_root,
                      min_pixels=cfg.data.min_pixels, max_pixels=cfg.data.max_pixels,
                      factor=model_family(cfg.model.name_or_path).factor, console=console)
    policy = load_for_inference(replace(cfg.model, mode="full"))  # the model loader's checks, full precision
    model, processor, device = policy.model, policy.processor, policy.device
    torch.manual_seed(cfg.train.seed)
    rng = random.Random(cfg.train.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.warmup.learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - s / cfg.warmup.steps)
    model.train()
    with atomic_folder(out) as tmp:
        logger = RunLogger(tmp / "warmup.jsonl", cfg.warmup.steps, console=console, description="warm-up",
                           shown=("loss",))
        with logger as log:
            for step in range(1, cfg.warmup.steps + 1):
                examples = rng.sample(data.examples, min(cfg.warmup.batch_size, len(data.examples)))
                loss = model(**supervised_batch(processor, task, examples, cfg.data, device)).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                log.log({"step": step, "loss": loss.item()})
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return out
