"""Each synthetic task trains end to end: data in the released schema, warm-up, QLoRA GRPO with its own rewards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qlora_rft.config import load_config
from qlora_rft.trainer import train

CONFIGS = Path(__file__).parents[1] / "configs"


@pytest.mark.parametrize(
    "name,rewards",
    [
        ("synthetic_classification", ["format", "classification"]),
        ("synthetic_detection", ["format", "iou", "confidence"]),
        ("synthetic_grounding", ["format", "grounding"]),
    ],
)
def test_grpo_runs_on_each_synthetic_task(name, rewards, tmp_path):
    cfg = load_config(
        CONFIGS / f"{name}.yaml",
        [
            "model.name_or_path=tiny:tiny",
            "warmup.steps=3",
            "warmup.batch_size=4",
            "grpo.num_generations=4",
            "grpo.generation_chunk=8",
            "grpo.max_completion_length=16",
            "train.max_steps=2",
            "train.prompts_per_step=2",
            "train.save_steps=0",
            f"train.output_dir={tmp_path}",
        ],
    )
    result = train(cfg)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2]
    for reward in rewards:
        assert f"rewards/{reward}" in lines[-1]
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert summary["data_skipped"] == [] and summary["data_rows"] > 0
