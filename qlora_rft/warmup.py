"""Supervised warm-up of a base on the training solutions, so that a random tiny base writes the answer format.

The tiny base then plays the part of an Instruct model. Each step is the SFT baseline's (supervised.py), on the
whole base in full precision, in this process alone (under a launch of several, the main process builds it while the
others wait). The warmed folder is cached under a hash of everything that decides it (base, the data's content,
warm-up settings, seed, and WARMUP_RECIPE), so `train` and `demo` build it once and reuse it, and a data file replaced
under the same name warms a new base.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import replace
from pathlib import Path

import torch

from qlora_rft.config import Config
from qlora_rft.data import Dataset, content_hash, load_split
from qlora_rft.distributed import NonFiniteStep, OneProcess, Updates
from qlora_rft.errors import TrainingError
from qlora_rft.files import atomic_folder
from qlora_rft.model import load_for_inference, model_family
from qlora_rft.pretrained import save_adapter
from qlora_rft.supervised import supervised_step
from qlora_rft.tasks import get_task
from qlora_rft.video import VideoRule

# Changes whenever the warm-up trains differently, so that a base warmed the old way is not reused from the cache.
# 2: each step is the SFT baseline's (chunked LM-head cross-entropy, distributed.Updates).
# 3: the tiny models' chat template and processors take video (a warmed folder keeps the processor it was made with).
WARMUP_RECIPE = 3


def warmup_key(cfg: Config, data: Dataset) -> str:
    decided_by = {
        "model": cfg.model.name_or_path,
        "warmup": vars(cfg.warmup),
        "data": [cfg.data.task, content_hash(data), cfg.data.min_pixels, cfg.data.max_pixels,
                 cfg.data.video_fps, cfg.data.video_max_frames, cfg.data.video_max_pixels],
        "seed": cfg.train.seed,
        "recipe": WARMUP_RECIPE,
    }
    return hashlib.sha256(json.dumps(decided_by, sort_keys=True).encode()).hexdigest()[:16]


def warmup_data(cfg: Config, console=None) -> Dataset:
    """The rows the warm-up learns from: warmup.data (empty: data.train) at data.train_split."""
    return load_split(cfg.warmup.data or cfg.data.train, cfg.data.train_split, get_task(cfg.data.task),
                      cfg.data.on_bad_row, cfg.data.image_root, min_pixels=cfg.data.min_pixels,
                      max_pixels=cfg.data.max_pixels, factor=model_family(cfg.model.name_or_path).factor,
                      video=VideoRule.of(cfg.data), console=console)


def warmed_base(cfg: Config, console=None) -> str:
    """The folder GRPO starts from: model.name_or_path itself, or its warmed-up copy (built once, cached)."""
    if cfg.warmup.steps == 0:
        return cfg.model.name_or_path
    from qlora_rft.files import cache_dir

    data = warmup_data(cfg, console)
    folder = cache_dir() / "warm" / warmup_key(cfg, data)
    if not (folder / "config.json").is_file():
        run_warmup(cfg, data, folder, console)
    return str(folder)


def run_warmup(cfg: Config, data: Dataset, out: Path, console=None) -> Path:
    """Full fine-tune of the base (full precision) on the training solutions for warmup.steps steps."""
    from qlora_rft.runlog import RunLogger

    task = get_task(cfg.data.task)
    policy = load_for_inference(replace(cfg.model, mode="full"))  # the model loader's checks, full precision
    torch.manual_seed(cfg.train.seed)
    rng = random.Random(cfg.train.seed)
    optimizer = torch.optim.AdamW(policy.model.parameters(), lr=cfg.warmup.learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - s / cfg.warmup.steps)
    updates = Updates(OneProcess(), policy.model, optimizer, scheduler, max_grad_norm=1.0)
    with atomic_folder(out) as tmp:
        logger = RunLogger(tmp / "warmup.jsonl", cfg.warmup.steps, console=console, description="warm-up",
                           shown=("loss",))
        with logger as log:
            for step in range(1, cfg.warmup.steps + 1):
                examples = rng.sample(data.examples, min(cfg.warmup.batch_size, len(data.examples)))
                try:
                    done = supervised_step(policy, task, examples, cfg.data, cfg.grpo.logprob_chunk, updates)
                except NonFiniteStep as e:
                    raise TrainingError(f"warm-up step {step}: loss {e.loss}, gradient norm {e.grad_norm}, so the "
                                        f"warm-up stopped and nothing was cached. Lower warmup.learning_rate="
                                        f"{cfg.warmup.learning_rate:g}") from None
                log.log({"step": step, "loss": done.loss, "grad_norm": done.grad_norm})
        save_adapter(policy.model, tmp)
        policy.processor.save_pretrained(tmp)
    return out
