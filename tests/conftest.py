"""Shared fixtures: a private cache (models and synthetic data built once per session) and a fast tiny config."""

from __future__ import annotations

import os
import warnings

import pytest

warnings.filterwarnings("ignore")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Tests never touch the user's cache: tiny models and synthetic data go to a session folder."""
    old = os.environ.get("QLORA_RFT_CACHE")
    path = tmp_path_factory.mktemp("cache")
    os.environ["QLORA_RFT_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("QLORA_RFT_CACHE", None)
    else:
        os.environ["QLORA_RFT_CACHE"] = old


TINY_RUN = [
    "model.name_or_path=tiny:tiny",
    "model.gradient_checkpointing=true",
    "data.train=synthetic:shapes",
    "data.max_pixels=3136",
    "data.max_prompt_length=128",
    "grpo.num_generations=4",
    "grpo.max_completion_length=8",
    "grpo.beta=0.04",
    "train.max_steps=2",
    "train.prompts_per_step=1",
    "train.learning_rate=0.01",
    "train.warmup_ratio=0.0",
    "train.save_steps=1",
    "lora.dropout=0.0",
]


@pytest.fixture
def tiny_overrides(tmp_path):
    """Overrides for a 2-step QLoRA GRPO run on the tiny preset, writing into tmp_path."""
    return [*TINY_RUN, f"train.output_dir={tmp_path / 'run'}"]


def first_shapes_rows(folder, count: int):
    """A parquet folder holding the first `count` rows of the synthetic shapes set (a training set of known size)."""
    from pathlib import Path

    import pyarrow.parquet as pq

    from qlora_rft.data import resolve_source

    folder = Path(folder)
    folder.mkdir(parents=True)
    table = pq.read_table(Path(resolve_source("synthetic:shapes")) / "train.parquet").slice(0, count)
    pq.write_table(table, folder / "train.parquet")
    return folder


def policy_with_adapters(overrides: list[str], seed: int | None = None):
    """The config and a tiny policy whose LoRA B matrices are N(0, 0.2), so the adapters change its outputs;
    with `seed`, the global RNG is seeded before the adapters are made (the same model whatever ran before)."""
    import torch

    from qlora_rft.config import load_config
    from qlora_rft.model import load_policy

    cfg = load_config(None, overrides)
    if seed is not None:
        torch.manual_seed(seed)
    policy = load_policy(cfg.model, cfg.lora)
    for name, p in policy.model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    return cfg, policy


def training_examples(cfg, policy, count: int = 1) -> list:
    """The first `count` rows of the config's classification training data, at the policy's image factor."""
    from qlora_rft.data import load_split
    from qlora_rft.tasks import get_task

    return load_split(cfg.data.train, "train", get_task("classification"), min_pixels=cfg.data.min_pixels,
                      max_pixels=cfg.data.max_pixels, factor=policy.family.factor).examples[:count]


def sample(policy, prompts: list, group_size: int, chunk: int, rule, share_prefill: bool = True, backend=None,
           generator=None) -> list:
    """G completions of each prompt from a Sampler on the policy's weights as they stand (a test that wants a
    sampling copy applies `merged_weights` around the call), decoded by `backend` (default: generate)."""
    from dataclasses import replace

    from qlora_rft.sampling import GenerateBackend, Sampler, SamplingWeights

    sampler = Sampler(policy, SamplingWeights("adapters", "as the test holds them"), backend or GenerateBackend())
    with sampler.synced():
        return sampler.sample(prompts, group_size, replace(rule, chunk=chunk, share_prefill=share_prefill), generator)
