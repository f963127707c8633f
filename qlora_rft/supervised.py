"""The supervised step, one path for the SFT baseline (sft.py) and the tiny base's warm-up (warmup.py): prompt +
target batches with the prompt and padding masked, the mean cross-entropy of the target tokens, backward and the
optimizer step through `distributed.Updates`.

The loss uses the same chunked LM-head log-probs as GRPO, so the [batch, sequence, vocabulary] logits never exist.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qlora_rft import grpo
from qlora_rft.config import DataConfig
from qlora_rft.data import Example
from qlora_rft.distributed import Updates
from qlora_rft.model import Policy, base_model
from qlora_rft.prompts import model_inputs, process, prompt_text
from qlora_rft.tasks import Task


@dataclass
class SupervisedStep:
    """What one supervised step did."""

    loss: float  # mean negative log-likelihood of the target tokens
    grad_norm: float
    target_tokens: int  # tokens the loss is taken over
    tokens: int  # prompt + target tokens of the batch, padding excluded


def supervised_step(policy: Policy, task: Task, examples: list[Example], data_cfg: DataConfig, logprob_chunk: int,
                    updates: Updates) -> SupervisedStep:
    """One optimizer step on `examples`, target = think + the solution. Raises distributed.NonFiniteStep, before
    the update is applied, when the loss or the gradient norm is not finite."""
    batch = supervised_batch(policy.processor, task, examples, data_cfg, policy.device)
    policy.model.train()
    loss, target_tokens = sft_loss(policy.model, batch, logprob_chunk)
    updates.backward(loss)
    grad_norm = updates.step(loss.item())
    return SupervisedStep(loss.item(), grad_norm, target_tokens, int(batch["attention_mask"].sum()))


def supervised_batch(processor, task: Task, examples: list[Example], data_cfg, device: torch.device) -> dict:
    """Prompt + target completion for each example; labels are -100 on the prompt and on padding."""
    tok = processor.tokenizer
    visuals = model_inputs(processor, examples, data_cfg.min_pixels, data_cfg.max_pixels)
    frames = visuals.frames
    prompts = [prompt_text(processor, task, ex.problem, frame, ex.layout) for ex, frame in zip(examples, frames)]
    targets = [task.warmup_target(ex.solution, frame) + tok.eos_token for ex, frame in zip(examples, frames)]
    side = tok.padding_side
    tok.padding_side = "right"
    try:
        full = process(processor, [p + t for p, t in zip(prompts, targets)], visuals, padding=True)
        prompt_only = process(processor, prompts, visuals, padding=True)
    finally:
        tok.padding_side = side
    labels = full["input_ids"].clone()  # [B, L]
    prompt_lengths = prompt_only["attention_mask"].sum(-1)  # [B]
    positions = torch.arange(labels.shape[1])[None, :]  # [1, L]
    labels[(positions < prompt_lengths[:, None]) | (full["attention_mask"] == 0)] = -100
    full["labels"] = labels
    return {k: v.to(device) for k, v in full.items()}


def sft_loss(model, batch: dict, logprob_chunk: int) -> tuple[torch.Tensor, int]:
    """Mean negative log-likelihood of the target tokens (labels != -100) and their count."""
    base = base_model(model)
    hidden = base.model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False
                        ).last_hidden_state  # [B, L, H]: text, images, videos and their time inputs
    targets = batch["labels"][:, 1:]  # [B, L-1]: token t is predicted by the state at t-1
    keep = targets != -100
    states = hidden[:, :-1][keep]  # [N, H]
    logp = grpo.token_logprobs(states[None], base.lm_head.weight, targets[keep][None], logprob_chunk)  # [1, N]
    return -logp.mean(), int(keep.sum())
