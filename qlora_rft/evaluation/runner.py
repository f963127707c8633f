"""Greedy evaluation of a model (optionally with adapters) on a held-out split, scored by the task's own parser.

Batched generation with left padding and explicit settings; the same image resizing as in training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qlora_rft.data import Dataset, encode_prompts
from qlora_rft.rollout import Sampling, SpecialTokens
from qlora_rft.tasks import Task


@dataclass
class Prediction:
    index: int
    completion: str
    parsed: object
    score: float


@dataclass
class EvalResult:
    metric: str  # e.g. "accuracy"
    value: float  # mean score in [0, 1]
    predictions: list[Prediction]


@torch.no_grad()
def evaluate(
    model, processor, task: Task, dataset: Dataset, data_cfg, device: torch.device, tokens: SpecialTokens,
    max_new_tokens: int = 64, batch_size: int = 16, limit: int = 0,
) -> EvalResult:
    examples = dataset.examples[:limit] if limit else dataset.examples
    config = Sampling(max_new_tokens=max_new_tokens, do_sample=False).generation_config(tokens)
    was_training = model.training
    model.eval()
    predictions = []
    try:
        for start in range(0, len(examples), batch_size):
            batch_examples = examples[start : start + batch_size]
            batch = encode_prompts(
                processor, task, batch_examples, data_cfg.min_pixels, data_cfg.max_pixels,
                data_cfg.max_prompt_length, device,
            )
            out = model.generate(**batch, generation_config=config)  # [b, P + t]
            texts = processor.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
            for ex, text in zip(batch_examples, texts):
                predictions.append(Prediction(ex.index, text, task.parse(text), task.score(text, ex.solution)))
    finally:
        model.train(was_training)
    value = sum(p.score for p in predictions) / max(len(predictions), 1)
    return EvalResult(metric=task.metric, value=value, predictions=predictions)
