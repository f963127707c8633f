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
