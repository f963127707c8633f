"""The GRPO training loop on accelerate. `train(cfg)` reads top to bottom, one numbered step per block:

  1. sample G completions of a prompt (in generation chunks)      -> Rollout
  2. score them with the task's verifiable rewards                  -> rewards [G]
  3. advantages over the whole group                                 -> [G]
  4. fixed log-probs: reference (adapters off, or full mode's frozen copy) and old policy -> [G, T] each, no grad
  5. policy loss and backward, backward_chunk completions at a time (accumulated over chunks and prompts)
  6. optimizer step, metrics line, checkpoint

The same loop runs in one process or under `accelerate launch` (DDP, DeepSpeed ZeRO-3): see distributed.py. Its
setup (data, model, optimizer, output folder, resume, checkpoints) is run.py's, shared with the SFT baseline.
Logits, a loss or a gradient that are not finite stop the run with a TrainingError naming the step, before its
update; no checkpoint or adapter is ever written from weights that are not finite.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from qlora_rft import grpo
from qlora_rft.config import Config
from qlora_rft.data import encode_prompt
from qlora_rft.decode import choose_decoding
from qlora_rft.distributed import Launch, Updates, gather_mean, sampling_model
from qlora_rft.errors import UserError
from qlora_rft.files import unlock_folder
from qlora_rft.model import choose_sampling_weights, decode_weight_bytes, merged_weights
from qlora_rft.rewards import default_weights, score
from qlora_rft.rollout import Rollout, Sampling, sample_groups, share_vision
from qlora_rft.run import TrainResult, check_inputs, prepare_run, start_afresh
from qlora_rft.sft import train_sft


@dataclass
class Group:
    """One prompt's rollout with everything the update needs."""

    rollout: Rollout
    rewards: dict[str, list[float]]  # per reward function, [G] each
    total: torch.Tensor  # [G] weighted sum
    advantages: torch.Tensor  # [G]
    ref_logp: torch.Tensor | None = None  # [G, T]
    old_logp: torch.Tensor | None = None  # [G, T]; None when num_iterations == 1 (then old = current, detached)


@dataclass
class StepStats:
    """Sums over the chunks of one optimizer step, turned into a metrics line by `as_metrics`."""

    loss: float = 0.0
    kl: list[float] = field(default_factory=list)
    clip: list[float] = field(default_factory=list)
    skipped_groups: int = 0


def fit(cfg: Config, resume: bool = False, console=None, log: bool = True, overwrite: bool = False) -> TrainResult:
    """Train with the method the config names: GRPO (`train`) or the supervised baseline (`sft.train_sft`).

    `resume` continues the run in train.output_dir from its newest checkpoint; `overwrite` starts afresh there,
    removing an earlier run's files once the folder is locked. Without either, a folder holding a run is refused.
    """
    out = Path(cfg.train.output_dir)
    if resume and overwrite:
        raise UserError("--resume continues the run in train.output_dir and --overwrite replaces it: pass one")
    launch = Launch.from_env()
    if overwrite and launch.rank == 0:
        check_inputs(cfg, launch)  # a run that will be refused removes nothing
        start_afresh(out)
    try:
        if cfg.train.method == "sft":
            return train_sft(cfg, resume, console, log)
        return train(cfg, resume, console, log)
    finally:
        unlock_folder(out)  # also after a failure: the process may go on (a sweep, a notebook)


def train(cfg: Config, resume: bool = False, console=None, log: bool = True) -> TrainResult:
    """GRPO with verifiable rewards (Visual-RFT)."""
    run = prepare_run(cfg, resume, console)
    policy, accelerator, model, task = run.policy, run.accelerator, run.model, run.task
    g = cfg.grpo
    G = g.num_generations
    weights = cfg.rewards.weights or default_weights(task.name)
    sampling = Sampling(g.max_completion_length, g.temperature, g.top_p, g.top_k,
                        min_new_tokens=g.min_completion_length)
    sample_with = choose_sampling_weights(g.sampling_weights, policy.model, policy.device, policy.dtype)
    decoding = choose_decoding(g.decode, policy.device, sample_with.mode)
    decoder = decoding.decoder
    kept_copy = {} if decoder is not None and decoder.compile else None  # CUDA graphs need the same addresses
    run.sampling = {"weights": sample_with.mode, "weights_reason": sample_with.reason, "decode": decoding.name,
                    "decode_reason": decoding.reason}
    if log and accelerator.is_main_process:
        from rich.console import Console

        (console or Console()).print(f"sampling: {sample_with.mode} weights ({sample_with.reason}); "
                                                f"decoding: {decoding.name} ({decoding.reason})")
    skip_uniform = g.skip_uniform_groups and g.beta == 0 and not run.launch.distributed  # engines step in lockstep
    logger = run.logger(console, log)
    metrics = []
    started = time.perf_counter()
    with logger:
        for step in range(run.start_step + 1, cfg.train.max_steps + 1):
            step_start = time.perf_counter()
            examples = run.examples(step)  # this process's prompts
            prompts = [encode_prompt(policy.processor, task, ex, cfg.data, policy.device) for ex in examples]

            # 1. Sample G completions per prompt, generation_chunk completions per generate call.
            t0 = time.perf_counter()
            with sampling_model(accelerator, model) as scorer:  # under ZeRO-3: the weights gathered whole
                sampler = scorer.policy
                if not cfg.lora.train_vision:  # a frozen vision tower: encode each image once for all passes
                    prompts = [share_vision(sampler, p) for p in prompts]
                with merged_weights(sampler, sample_with.merges, sample_with.mode, kept_copy):
                    if step == run.start_step + 1:  # what each decode step reads (the bench's bandwidth figure)
                        run.sampling["decode_weight_bytes"] = decode_weight_bytes(sampler)
                    rollouts = sample_groups(sampler, policy.processor, prompts, G, g.generation_chunk, sampling,
                                             policy.tokens, g.share_prefill, decoder)
            gen_seconds = time.perf_counter() - t0
            run.require_finite_logits(step, rollouts)
            gen_tokens = int(sum(r.mask.sum() for r in rollouts))

            # 2. Score with the verifiable rewards; 3. advantages over each whole group (never across processes).
            groups = []
            for example, rollout in zip(examples, rollouts):
                rewards = score(rollout.texts, example.solution, weights, rollout.prompt.frame)
                total = torch.tensor([sum(weights[n] * rewards[n][k] for n in weights) for k in range(G)])
                advantages = grpo.group_advantages(total, g.scale_rewards, g.advantage_eps).to(policy.device)
                groups.append(Group(rollout, rewards, total, advantages))

            # 4. Fixed log-probs, no grad: the reference (adapters off, or full mode's frozen copy) and, for
            #    mu > 1, the old policy.
            for group in groups:
                if g.beta != 0:
                    with run.reference() as reference:
                        group.ref_logp = chunked_logprobs(reference, group.rollout, g)
                if g.num_iterations > 1:
                    group.old_logp = chunked_logprobs(model, group.rollout, g)

            # 5-6. Policy loss and backward in chunks, then the optimizer step (mu times per batch of rollouts).
            stats = StepStats()
            for _ in range(g.num_iterations):
                todo = [grp for grp in groups if not (skip_uniform and bool((grp.total == grp.total[0]).all()))]
                stats.skipped_groups += len(groups) - len(todo)  # all advantages 0: no gradient at all
                for i, group in enumerate(todo):
                    backward_group(model, run.updates, group, g, cfg.train.prompts_per_step, stats,
                                   last_group=i == len(todo) - 1)
                grad_norm = run.optimizer_step(step, stats.loss)  # stops at a non-finite loss or gradient

            line = step_metrics(step, groups, stats, weights, cfg, run.scheduler, grad_norm, gen_tokens, gen_seconds,
                                time.perf_counter() - step_start, time.perf_counter() - started)
            line.update(gather_mean(accelerator, {k: line[k] for k in line if k in AVERAGED}))
            line.update(decoder.counters() if decoder is not None else {})  # shapes built, graphs compiled
            metrics.append(line)
            logger.log(line, write=step % cfg.train.logging_steps == 0 or step == cfg.train.max_steps)
            run.checkpoint(step)

    return run.finish(metrics, time.perf_counter() - started)



# Metrics of each process's own groups, averaged over the processes of a launch.
AVERAGED = ("loss", "reward", "reward_std", "kl", "clip_ratio", "completion_length", "skipped_groups",
            "tokens_per_second")


def backward_group(model, updates: Updates, group: Group, g, prompts_per_step: int, stats: StepStats,
                   last_group: bool = True) -> None:
    """Loss of one group, backward_chunk completions per forward/backward; shares add up to the group loss."""
    rollout = group.rollout
    G = rollout.size
    chunk = g.backward_chunk or G
    num_tokens = float(rollout.mask.sum())
    for start in range(0, G, chunk):
        ids, mask = rollout.chunk(start, start + chunk)  # [c, T] each
        with updates.accumulating(last=last_group and start + chunk >= G):
            logp = model(rollout.prompt, ids, mask, g.logprob_chunk, g.temperature)  # [c, T]
            old = group.old_logp[start : start + chunk] if group.old_logp is not None else logp.detach()
            ref = group.ref_logp[start : start + chunk] if group.ref_logp is not None else None
            terms = grpo.token_loss(logp, old, ref, group.advantages[start : start + chunk], g.beta, g.epsilon)
            loss = grpo.aggregate(terms.loss, mask, g.loss_aggregation, G, num_tokens) / prompts_per_step
            updates.backward(loss)
        stats.loss += loss.item()
        if terms.kl is not None:
            stats.kl.append(grpo.masked_mean(terms.kl.detach(), mask).item())
        stats.clip.append(grpo.masked_mean(terms.clipped.float(), mask).item())


@torch.no_grad()
def chunked_logprobs(model, rollout: Rollout, g) -> torch.Tensor:
    """Log-probs of all G completions from a CompletionScorer, backward_chunk at a time, without grad. -> [G, T]"""
    chunk = g.backward_chunk or rollout.size
    pieces = [model(rollout.prompt, *rollout.chunk(s, s + chunk), g.logprob_chunk, g.temperature,
                    share_prompt=g.share_prefill)
              for s in range(0, rollout.size, chunk)]
    return torch.cat(pieces)


def step_metrics(step, groups, stats, weights, cfg, scheduler, grad_norm, gen_tokens, gen_seconds, step_seconds,
                 elapsed) -> dict:
    totals = torch.cat([grp.total for grp in groups])
    line = {
        "step": step,
        "loss": stats.loss / cfg.grpo.num_iterations,
        "reward": totals.mean().item(),
        "reward_std": float(np.mean([grp.total.std().item() for grp in groups])),
        "kl": float(np.mean(stats.kl)) if stats.kl else 0.0,
        "clip_ratio": float(np.mean(stats.clip)) if stats.clip else 0.0,
        "completion_length": float(np.mean([grp.rollout.mask.sum(-1).mean().item() for grp in groups])),
        "skipped_groups": stats.skipped_groups / (len(groups) * cfg.grpo.num_iterations),
        "grad_norm": grad_norm,
        "learning_rate": scheduler.get_last_lr()[0],
        "tokens_per_second": gen_tokens / max(gen_seconds, 1e-9),
        "step_seconds": step_seconds,
        "elapsed_seconds": elapsed,
    }
    for name in weights:
        line[f"rewards/{name}"] = float(np.mean([np.mean(grp.rewards[name]) for grp in groups]))
    return line
