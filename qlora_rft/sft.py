"""The supervised baseline of the paper's comparison: the same 4-bit base and LoRA adapters, trained on the data's
solutions with cross-entropy (prompt tokens masked), on the run setup of run.py (schedule, checkpoints, resume).

The loss uses the same chunked LM-head log-probs as GRPO, so the [batch, sequence, vocabulary] logits never exist.
"""

from __future__ import annotations

import time

import torch

from qlora_rft import grpo
from qlora_rft.config import Config
from qlora_rft.rollout import base_model
from qlora_rft.run import TrainResult, prepare_run
from qlora_rft.warmup import supervised_batch


def sft_loss(model, batch: dict, logprob_chunk: int) -> tuple[torch.Tensor, int]:
    """Mean negative log-likelihood of the target tokens (labels != -100) and their count."""
    base = base_model(model)
    hidden = base.model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        mm_token_type_ids=batch["mm_token_type_ids"],
        pixel_values=batch["pixel_values"],
        image_grid_thw=batch["image_grid_thw"],
        use_cache=False,
    ).last_hidden_state  # [B, L, H]
    targets = batch["labels"][:, 1:]  # [B, L-1]: token t is predicted by the state at t-1
    keep = targets != -100
    states = hidden[:, :-1][keep]  # [N, H]
    logp = grpo.token_logprobs(states[None], base.lm_head.weight, targets[keep][None], logprob_chunk)  # [1, N]
    return -logp.mean(), int(keep.sum())


def train_sft(cfg: Config, resume: bool = False, console=None, log: bool = True) -> TrainResult:
    """Supervised fine-tuning: each step, `train.prompts_per_step` examples, target = think + the solution."""
    run = prepare_run(cfg, resume, console)
    policy, model = run.policy, run.unwrapped
    logger = run.logger(console, log, shown=("loss", "tokens_per_second"))
    metrics = []
    started = time.perf_counter()
    with logger:
        for step in range(run.start_step + 1, cfg.train.max_steps + 1):
            step_start = time.perf_counter()
            batch = supervised_batch(policy.processor, run.task, run.examples(step), cfg.data, policy.device)
            model.train()
            loss, tokens = sft_loss(model, batch, cfg.grpo.logprob_chunk)
            run.updates.backward(loss)
            grad_norm = run.optimizer_step(step, loss.item())  # stops at a non-finite loss or gradient
            seconds = time.perf_counter() - step_start
            line = {"step": step, "loss": loss.item(), "grad_norm": grad_norm,
                    "learning_rate": run.scheduler.get_last_lr()[0], "target_tokens": tokens,
                    "tokens_per_second": int(batch["attention_mask"].sum()) / max(seconds, 1e-9),
                    "step_seconds": seconds, "elapsed_seconds": time.perf_counter() - started}
            metrics.append(line)
            logger.log(line, write=step % cfg.train.logging_steps == 0 or step == cfg.train.max_steps)
            run.checkpoint(step)
    return run.finish(metrics, time.perf_counter() - started)
