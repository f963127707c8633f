"""The GRPO training loop on accelerate. `train(cfg)` reads top to bottom, one numbered step per block:

  1. sample G completions of a prompt (the run's Sampler)          -> Rollout (+ the sampler's log-probs)
  2. score them with the task's verifiable rewards                  -> rewards [G]
     (dynamic sampling: a group whose rewards are all equal gives way to a fresh prompt's)
  3. advantages of all the step's groups at once                    -> [G] each
  4. fixed log-probs: reference (adapters off, or full mode's frozen copy) and old policy -> [G, T] each, no grad
  5. policy loss and backward, backward_chunk completions at a time (accumulated over chunks and prompts),
     each token weighted for the sampler's weights when they are not the trained ones (grpo.importance_correction)
  6. optimizer step, metrics line (with eval/<metric> every train.eval_steps: evaluation/validation.py), checkpoint

The same loop runs in one process or under `accelerate launch` (DDP, DeepSpeed ZeRO-3): see distributed.py.
Logits, a loss or a gradient that are not finite stop the run with a TrainingError naming the step, before its
update; no checkpoint or adapter is ever written from weights that are not finite.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch

from qlora_rft import grpo
from qlora_rft.config import Config
from qlora_rft.data import Example
from qlora_rft.distributed import Launch, Updates, gather_all, gather_mean
from qlora_rft.errors import UserError
from qlora_rft.evaluation.validation import Validation
from qlora_rft.files import unlock_folder
from qlora_rft.prompts import encode_prompt
from qlora_rft.rewards import RewardSet, reward_set
from qlora_rft.rollout import Rollout
from qlora_rft.run import Run, TrainResult, check_inputs, prepare_run, start_afresh
from qlora_rft.sampling import Sampler, Settings, make_sampler
from qlora_rft.sft import train_sft


@dataclass
class Group:
    """One prompt's rollout with everything the update needs."""

    rollout: Rollout
    rewards: dict[str, list[float]]  # per reward function, [G] each
    total: torch.Tensor  # [G] weighted sum
    loss_mask: torch.Tensor  # [G, T]: rollout.mask, less truncated completions with grpo.mask_truncated_completions
    advantages: torch.Tensor | None = None  # [G]; set once every group of the step is scored
    ref_logp: torch.Tensor | None = None  # [G, T]
    old_logp: torch.Tensor | None = None  # [G, T]; None when num_iterations == 1 (then old = current, detached)
    example: Example | None = None  # the training row (its question and solution, for train.log_completions)

    @property
    def uniform(self) -> bool:
        """All G rewards equal: every advantage is 0, whatever the scaling."""
        return bool((self.total == self.total[0]).all())


@dataclass
class StepStats:
    """Sums over the chunks of one optimizer step, turned into a metrics line by `as_metrics`."""

    loss: float = 0.0
    kl: list[float] = field(default_factory=list)
    clip: list[float] = field(default_factory=list)
    skipped_groups: int = 0
    extra_groups: int = 0  # dynamic sampling: fresh groups sampled in place of uniform ones
    entropy: float = 0.0  # the policy's entropy summed over the completion tokens of the step's backward passes
    tokens: float = 0.0  # those tokens
    gaps: list[grpo.SamplerGap] = field(default_factory=list)  # the sampler against the policy, per chunk


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
    rewarder = reward_set(cfg.rewards, task)  # built-in and plugin rewards, by name
    weights = rewarder.weights
    sampler = make_sampler(g, policy, accelerator, model)  # grpo.sampling_weights, grpo.decode, the correction
    settings = Settings.for_training(g)
    if log and accelerator.is_main_process:
        from rich.console import Console

        (console or Console()).print(f"{sampler.summary()}; importance correction: {sampler.correction.mode} "
                                     f"({sampler.correction.reason})")
    skip_uniform = g.skip_uniform_groups and g.beta == 0 and not run.launch.distributed  # engines step in lockstep
    logger = run.logger(console, log)
    validation = Validation.of(run)  # train.eval_steps
    metrics = []
    started = time.perf_counter() - run.seconds_before  # the run's clock, across resumed sessions
    with logger:
        for step in range(run.start_step + 1, run.steps + 1):
            step_start = time.perf_counter()

            # 1. Sample G completions per prompt (the sampler: its weights made ready once per step, its backend
            #    decoding grpo.generation_chunk completions per call), and 2. score them with the verifiable rewards.
            #    Dynamic sampling: groups whose rewards are all equal give way to the groups of fresh prompts,
            #    grpo.max_extra_groups at most.
            t0 = time.perf_counter()
            with sampler.synced():  # under ZeRO-3 the weights gathered whole; merged/int8/fp8: the copy made
                sample = partial(sample_scored, run, sampler, settings, rewarder)
                groups = sample(run.examples(step))  # this process's prompts
                dropped = []  # the groups that gave way
                if g.dynamic_sampling:
                    dropped = replace_uniform_groups(groups, sample, run.spare_examples(step))
            gen_seconds = time.perf_counter() - t0
            rollouts = [grp.rollout for grp in groups + dropped]
            run.require_finite_logits(step, rollouts)
            gen_tokens = int(sum(r.mask.sum() for r in rollouts))

            # 3. Advantages of all the step's groups at once: reward minus its group's mean, divided by the group's
            #    std, the whole batch's (every process's rewards) or nothing (grpo.scale_rewards).
            totals = torch.stack([grp.total for grp in groups])  # [N, G]
            batch = gather_all(accelerator, totals) if g.scale_rewards == "batch" else None
            for group, advantages in zip(groups, grpo.advantages(totals, g.scale_rewards, g.advantage_eps, batch)):
                group.advantages = advantages.to(policy.device)

            # 4. Fixed log-probs, no grad: the reference (adapters off, or full mode's frozen copy) and, for
            #    mu > 1, the old policy.
            for group in groups:
                if g.beta != 0:
                    with run.reference() as reference:
                        group.ref_logp = chunked_logprobs(reference, group.rollout, g)
                if g.num_iterations > 1:
                    group.old_logp = chunked_logprobs(model, group.rollout, g)

            # 5-6. Policy loss and backward in chunks, then the optimizer step (mu times per batch of rollouts). The
            #      loss types divide by counts of the whole step (every process's tokens for dapo and cispo).
            tokens = gather_mean(accelerator, {"tokens": sum(float(grp.loss_mask.sum()) for grp in groups)})["tokens"]
            size = grpo.StepSize(len(groups), G, g.max_completion_length, tokens)
            stats = StepStats(extra_groups=len(dropped))
            for _ in range(g.num_iterations):
                todo = [grp for grp in groups if not (skip_uniform and not grp.advantages.any())]
                stats.skipped_groups += len(groups) - len(todo)  # all advantages 0 and beta = 0: no gradient at all
                for i, group in enumerate(todo):
                    backward_group(model, run.updates, group, g, size, stats, sampler.correction.mode,
                                   last_group=i == len(todo) - 1)
                grad_norm = run.optimizer_step(step, stats.loss)  # stops at a non-finite loss or gradient

            line = step_metrics(step, groups, stats, weights, cfg, run.scheduler, grad_norm, gen_tokens, gen_seconds,
                                time.perf_counter() - step_start, time.perf_counter() - started)
            line.update(gather_mean(accelerator, {k: line[k] for k in line if k in AVERAGED}))
            line.update({k: gather_all(accelerator, torch.tensor([line[k]])).max().item() for k in line if k in MAXED})
            line.update(sampler.counters())  # the static decoder: shapes built, graphs compiled
            line["epoch"] = run.epoch(step)
            line.update(validation.metrics(run, step))  # eval/<metric> at an evaluation step
            metrics.append(line)
            logger.log(line, write=step % cfg.train.logging_steps == 0 or step == run.steps or validation.due(step))
            if cfg.train.log_completions and step % cfg.train.log_completions == 0:
                logger.samples(step, completion_samples(groups[0], weights))
            run.checkpoint(step, time.perf_counter() - started)

    run.sampling = sampler.describe()  # which weights, decoder and correction ran, and why
    return run.finish(metrics, time.perf_counter() - started)


# Metrics of each process's own groups, averaged over the processes of a launch.
AVERAGED = ("loss", "reward", "reward_std", "kl", "clip_ratio", "completion_length", "skipped_groups",
            "extra_groups", "tokens_per_second", "entropy", "sampling/kl")
MAXED = ("sampling/ratio_max",)  # ... and the largest over the processes


def sample_scored(run: Run, sampler: Sampler, settings: Settings, rewarder: RewardSet,
                  examples: list) -> list[Group]:
    """Steps 1-2 for some rows: sample G completions of each row's prompt, score them, sum the weighted rewards."""
    cfg, policy, G = run.cfg, run.policy, run.cfg.grpo.num_generations
    prompts = [encode_prompt(policy.processor, run.task, ex, cfg.data, policy.device) for ex in examples]
    if not cfg.lora.train_vision:  # a frozen vision tower: encode each image once for all passes
        prompts = [sampler.share_vision(p) for p in prompts]
    rollouts = sampler.sample(prompts, G, settings)
    groups = []
    for example, rollout in zip(examples, rollouts):
        rewards = rewarder.score(rollout.texts, example.reward_columns(), rollout.prompt.frame, example.index)
        total = torch.tensor(rewarder.weighted(rewards, example.index))
        loss_mask = rollout.mask  # [G, T]
        if cfg.grpo.mask_truncated_completions:  # no EOS within max_completion_length: out of the loss
            loss_mask = loss_mask * ~grpo.truncated(rollout.completion_ids, policy.tokens.eos)[:, None]
        groups.append(Group(rollout, rewards, total, loss_mask, example=example))
    return groups


def replace_uniform_groups(groups: list[Group], sample, spares: list) -> list[Group]:
    """DAPO's dynamic sampling, in place: each group whose rewards are all equal (no advantage, no gradient) gives
    way to the group of a fresh row from `spares`, sampled as many at a time as there are such groups, until none
    is left or the spares run out. Returns the groups given up (as many as fresh groups were sampled)."""
    dropped = []
    while spares:
        uniform = [i for i, group in enumerate(groups) if group.uniform]
        if not uniform:
            break
        fresh, spares = sample(spares[: len(uniform)]), spares[len(uniform) :]
        for i, group in zip(uniform, fresh):
            dropped.append(groups[i])
            groups[i] = group
    return dropped


def objective(g) -> grpo.Objective:
    """The loss settings of the grpo config section."""
    return grpo.Objective(g.loss_type, g.beta, g.epsilon, g.clip_high, g.importance_sampling_level,
                          g.sapo_temperature_pos, g.sapo_temperature_neg)


def backward_group(model, updates: Updates, group: Group, g, size: grpo.StepSize, stats: StepStats,
                   correction: str = "none", last_group: bool = True) -> None:
    """Loss of one group, backward_chunk completions per forward/backward: each chunk's share of the step's loss
    (`grpo.aggregate` divides by counts of the whole step, so the shares never depend on the chunking). Where the
    rollout carries the sampler's log-probs, each token's policy term is weighted by `correction` (none, tis, mis:
    `grpo.importance_weights`) and the gap between sampler and policy is measured."""
    rollout = group.rollout
    G = rollout.size
    chunk = g.backward_chunk or G
    group_tokens = float(group.loss_mask.sum())
    for start in range(0, G, chunk):
        ids, mask = rollout.chunk(start, start + chunk)  # [c, T] each
        loss_mask = group.loss_mask[start : start + chunk]  # [c, T]
        sampled = rollout.sampler_logp[start : start + chunk] if rollout.sampler_logp is not None else None
        with updates.accumulating(last=last_group and start + chunk >= G):
            scores = model(rollout.prompt, ids, mask, g.logprob_chunk, g.temperature, entropy=True)  # [c, T] each
            logp = scores.logp
            old = group.old_logp[start : start + chunk] if group.old_logp is not None else logp.detach()
            ref = group.ref_logp[start : start + chunk] if group.ref_logp is not None else None
            weight = None  # old is the policy the completions were sampled for: the correction's numerator
            if sampled is not None and correction != "none":
                weight = grpo.importance_weights(old, sampled, mask, correction, g.importance_cap)
            terms = grpo.token_loss(logp, old, ref, group.advantages[start : start + chunk], objective(g), loss_mask,
                                    weight)
            loss = grpo.aggregate(terms.loss, loss_mask, g.loss_type, size, group_tokens)
            updates.backward(loss)
        stats.loss += loss.item()
        if terms.kl is not None:
            stats.kl.append(grpo.masked_mean(terms.kl.detach(), loss_mask).item())
        stats.clip.append(grpo.masked_mean(terms.clipped.float(), loss_mask).item())
        stats.entropy += float((scores.entropy * mask).sum())
        stats.tokens += float(mask.sum())
        if sampled is not None:
            stats.gaps.append(grpo.sampler_gap(old, sampled, mask))


@torch.no_grad()
def chunked_logprobs(model, rollout: Rollout, g) -> torch.Tensor:
    """Log-probs of all G completions from a CompletionScorer, backward_chunk at a time, without grad. -> [G, T]"""
    chunk = g.backward_chunk or rollout.size
    pieces = [model(rollout.prompt, *rollout.chunk(s, s + chunk), g.logprob_chunk, g.temperature,
                    share_prompt=g.share_prefill).logp
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
        "extra_groups": stats.extra_groups,
        "grad_norm": grad_norm,
        "learning_rate": scheduler.get_last_lr()[0],
        "tokens_per_second": gen_tokens / max(gen_seconds, 1e-9),
        "step_seconds": step_seconds,
        "elapsed_seconds": elapsed,
    }
    for name in weights:
        line[f"rewards/{name}"] = float(np.mean([np.mean(grp.rewards[name]) for grp in groups]))
    line["entropy"] = stats.entropy / stats.tokens if stats.tokens else float("nan")  # nan: every backward skipped
    if stats.gaps:  # completions drawn by the sampler (not teacher-forced): how far its weights are from the policy
        line["sampling/kl"] = sum(gap.kl for gap in stats.gaps) / max(sum(gap.tokens for gap in stats.gaps), 1.0)
        line["sampling/ratio_max"] = max(gap.ratio_max for gap in stats.gaps)
    return line


def completion_samples(group: Group, weights: dict) -> list[dict]:
    """One row per completion of a group: the prompt's question and solution, the completion, its rewards and
    advantage (train.log_completions)."""
    example = group.example
    return [{"prompt": example.problem, "solution": example.solution, "completion": text,
             "reward": group.total[k].item(), **{f"rewards/{n}": group.rewards[n][k] for n in weights},
             "advantage": group.advantages[k].item()} for k, text in enumerate(group.rollout.texts)]


