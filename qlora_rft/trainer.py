"""The GRPO training loop on accelerate. `train(cfg)` reads top to bottom, one numbered step per block:

  1. sample G completions of a prompt (in generation chunks)      -> Rollout
  2. score them with the task's verifiable rewards                  -> rewards [G]
  3. advantages over the whole group                                 -> [G]
  4. fixed log-probs: reference (adapters off) and old policy       -> [G, T] each, no grad
  5. policy loss and backward, backward_chunk completions at a time (accumulated over chunks and prompts)
  6. optimizer step, metrics line, checkpoint
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from qlora_rft import checkpoint, grpo
from qlora_rft.config import Config, dump
from qlora_rft.data import encode_prompt, load_split
from qlora_rft.errors import UserError
from qlora_rft.model import Policy, load_policy, merge_for_sampling, merged_weights, reference_mode, resolve_model_path
from qlora_rft.rewards import default_weights, score
from qlora_rft.rollout import Rollout, Sampling, completion_logprobs, sample_groups, share_vision
from qlora_rft.runlog import NullLogger, RunLogger
from qlora_rft.tasks import get_task


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


@dataclass
class TrainResult:
    output_dir: Path
    adapter_dir: Path
    steps: int
    metrics: list[dict]
    skipped_rows: int


@dataclass
class Run:
    """Everything a training loop needs, set up the same way for GRPO and for the supervised baseline."""

    cfg: Config
    out: Path
    task: object  # tasks.Task
    data: object  # data.Dataset
    base_path: str  # the (warmed) base the adapters sit on
    policy: Policy
    accelerator: object
    model: torch.nn.Module  # as prepared by accelerate
    unwrapped: torch.nn.Module  # the PeftModel
    optimizer: torch.optim.Optimizer
    scheduler: object
    start_step: int  # 0, or the step of the checkpoint resumed from
    order: "PromptOrder"

    def examples(self, step: int) -> list:
        """The training rows of an optimizer step: decided by the step alone, so a resumed run continues exactly."""
        first = (step - 1) * self.cfg.train.prompts_per_step
        return [self.data.examples[self.order.index(first + i)] for i in range(self.cfg.train.prompts_per_step)]

    def logger(self, console, log: bool, shown: tuple[str, ...] | None = None):
        if not (log and self.accelerator.is_main_process):
            return NullLogger()
        kwargs = {"shown": shown} if shown else {}
        return RunLogger(self.out / "metrics.jsonl", self.cfg.train.max_steps, self.start_step, console, **kwargs)

    def checkpoint(self, step: int) -> None:
        cfg = self.cfg.train
        if cfg.save_steps and step % cfg.save_steps == 0 and self.accelerator.is_main_process:
            position = {"prompts_seen": step * cfg.prompts_per_step, "data_rows": len(self.data.examples),
                        "data_skipped": len(self.data.skipped)}  # the order itself follows from the step and seed
            checkpoint.save(self.out, step, self.unwrapped, self.optimizer, self.scheduler, position,
                            keep=cfg.save_total_limit)

    def finish(self, metrics: list[dict], seconds: float) -> TrainResult:
        """Save the adapter (peft format, with the processor) and train_summary.json."""
        adapter_dir = self.out / "adapter"
        if self.accelerator.is_main_process:
            self.unwrapped.save_pretrained(adapter_dir)
            self.policy.processor.save_pretrained(adapter_dir)
            summary = {"method": self.cfg.train.method, "steps": self.cfg.train.max_steps, "base": self.base_path,
                       "data_rows": len(self.data.examples), "data_skipped": [vars(b) for b in self.data.skipped],
                       "seconds": seconds}
            (self.out / "train_summary.json").write_text(json.dumps(summary, indent=2))
        return TrainResult(self.out, adapter_dir, self.cfg.train.max_steps, metrics, len(self.data.skipped))


def prepare_run(cfg: Config, resume: bool, console=None) -> Run:
    """Data, the (warmed) base in 4-bit with fresh LoRA adapters, optimizer and schedule on accelerate, and the
    state of the newest checkpoint when resuming."""
    from accelerate import Accelerator
    from transformers import get_scheduler

    from qlora_rft.warmup import warmed_base

    out = Path(cfg.train.output_dir)
    task = get_task(cfg.data.task)
    data = load_split(cfg.data.train, cfg.data.train_split, task, cfg.data.on_bad_row, cfg.data.image_root)
    report_skipped(data, console)

    base_path = str(resolve_model_path(warmed_base(cfg, console)))  # builds a tiny: model if not cached yet
    seed_everything(cfg.train.seed)  # after building and warm-up: the same start whether they ran or were cached
    policy = load_policy(replace(cfg.model, name_or_path=base_path), cfg.lora)
    accelerator = Accelerator(cpu=policy.device.type == "cpu")
    optimizer = make_optimizer(policy, cfg)
    warmup_steps = math.ceil(cfg.train.warmup_ratio * cfg.train.max_steps)
    scheduler = get_scheduler(cfg.train.lr_scheduler, optimizer, warmup_steps, cfg.train.max_steps)
    model, optimizer, scheduler = accelerator.prepare(policy.model, optimizer, scheduler)
    unwrapped = accelerator.unwrap_model(model)

    start_step = 0
    if resume:
        found = checkpoint.latest(out)
        if found is None:
            raise UserError(f"--resume: no complete checkpoint in {out}; run without --resume to start afresh")
        start_step = checkpoint.load(found, unwrapped, optimizer, scheduler)["step"]
    elif checkpoint.latest(out) is not None:
        raise UserError(f"{out} already holds checkpoints: pass --resume to continue, or choose another "
                        "train.output_dir")
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        dump(cfg, out / "config.yaml")
    return Run(cfg, out, task, data, base_path, policy, accelerator, model, unwrapped, optimizer, scheduler,
               start_step, PromptOrder(len(data.examples), cfg.train.seed))


def fit(cfg: Config, resume: bool = False, console=None, log: bool = True) -> TrainResult:
    """Train with the method the config names: GRPO (`train`) or the supervised baseline (`sft.train_sft`)."""
    if cfg.train.method == "sft":
        from qlora_rft.sft import train_sft

        return train_sft(cfg, resume, console, log)
    return train(cfg, resume, console, log)


def train(cfg: Config, resume: bool = False, console=None, log: bool = True) -> TrainResult:
    """GRPO with verifiable rewards (Visual-RFT)."""
    run = prepare_run(cfg, resume, console)
    policy, accelerator, model, unwrapped = run.policy, run.accelerator, run.model, run.unwrapped
    optimizer, scheduler, task = run.optimizer, run.scheduler, run.task
    g = cfg.grpo
    G = g.num_generations
    weights = cfg.rewards.weights or default_weights(task.name)
    sampling = Sampling(g.max_completion_length, g.temperature, g.top_p, g.top_k,
                        min_new_tokens=g.min_completion_length)
    logger = run.logger(console, log)
    metrics = []
    started = time.perf_counter()
    with logger:
        for step in range(run.start_step + 1, cfg.train.max_steps + 1):
            step_start = time.perf_counter()
            examples = run.examples(step)
            prompts = [encode_prompt(policy.processor, task, ex, cfg.data, policy.device) for ex in examples]
            if not cfg.lora.train_vision:  # a frozen vision tower: encode each image once for all passes
                prompts = [share_vision(unwrapped, p) for p in prompts]

            # 1. Sample G completions per prompt, generation_chunk completions per generate call.
            t0 = time.perf_counter()
            with merged_weights(unwrapped, merge_for_sampling(g.sampling_weights, policy.device)):
                rollouts = sample_groups(unwrapped, policy.processor, prompts, G, g.generation_chunk, sampling,
                                         policy.tokens, g.share_prefill)
            gen_seconds = time.perf_counter() - t0
            gen_tokens = int(sum(r.mask.sum() for r in rollouts))

            # 2. Score with the verifiable rewards; 3. advantages over each whole group.
            groups = []
            for example, rollout in zip(examples, rollouts):
                rewards = score(rollout.texts, example.solution, weights)
                total = torch.tensor([sum(weights[n] * rewards[n][k] for n in weights) for k in range(G)])
                advantages = grpo.group_advantages(total, g.scale_rewards, g.advantage_eps).to(policy.device)
                groups.append(Group(rollout, rewards, total, advantages))

            # 4. Fixed log-probs, no grad: the reference (adapters off) and, for mu > 1, the old policy.
            for group in groups:
                if g.beta != 0:
                    with reference_mode(unwrapped):
                        group.ref_logp = chunked_logprobs(unwrapped, group.rollout, g)
                if g.num_iterations > 1:
                    with torch.no_grad():
                        group.old_logp = chunked_logprobs(unwrapped, group.rollout, g)

            # 5-6. Policy loss and backward in chunks, then the optimizer step (mu times per batch of rollouts).
            stats = StepStats()
            for _ in range(g.num_iterations):
                for group in groups:
                    if g.beta == 0 and g.skip_uniform_groups and bool((group.total == group.total[0]).all()):
                        stats.skipped_groups += 1  # all advantages are 0: no gradient at all
                        continue
                    backward_group(unwrapped, accelerator, group, g, cfg.train.prompts_per_step, stats)
                grad_norm = clip_gradients(accelerator, model, cfg.train.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)

            line = step_metrics(step, groups, stats, weights, cfg, scheduler, grad_norm, gen_tokens, gen_seconds,
                                time.perf_counter() - step_start, time.perf_counter() - started)
            metrics.append(line)
            logger.log(line, write=step % cfg.train.logging_steps == 0 or step == cfg.train.max_steps)
            run.checkpoint(step)

    return run.finish(metrics, time.perf_counter() - started)


def backward_group(model, accelerator, group: Group, g, prompts_per_step: int, stats: StepStats) -> None:
    """Loss of one group, backward_chunk completions per forward/backward; shares add up to the group loss."""
    rollout = group.rollout
    G = rollout.size
    chunk = g.backward_chunk or G
    num_tokens = float(rollout.mask.sum())
    for start in range(0, G, chunk):
        ids, mask = rollout.chunk(start, start + chunk)  # [c, T] each
        logp = completion_logprobs(model, rollout.prompt, ids, mask, g.logprob_chunk, g.temperature)  # [c, T]
        old = group.old_logp[start : start + chunk] if group.old_logp is not None else logp.detach()
        ref = group.ref_logp[start : start + chunk] if group.ref_logp is not None else None
        terms = grpo.token_loss(logp, old, ref, group.advantages[start : start + chunk], g.beta, g.epsilon)
        loss = grpo.aggregate(terms.loss, mask, g.loss_aggregation, G, num_tokens) / prompts_per_step
        accelerator.backward(loss)
        stats.loss += loss.item()
        if terms.kl is not None:
            stats.kl.append(grpo.masked_mean(terms.kl.detach(), mask).item())
        stats.clip.append(grpo.masked_mean(terms.clipped.float(), mask).item())


@torch.no_grad()
def chunked_logprobs(model, rollout: Rollout, g) -> torch.Tensor:
    """Log-probs of all G completions, backward_chunk at a time, without grad.  -> [G, T]"""
    chunk = g.backward_chunk or rollout.size
    pieces = [
        completion_logprobs(model, rollout.prompt, *rollout.chunk(s, s + chunk), g.logprob_chunk, g.temperature)
        for s in range(0, rollout.size, chunk)
    ]
    return torch.cat(pieces)


def clip_gradients(accelerator, model, max_norm: float) -> float:
    params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
    if not params:
        return 0.0
    if max_norm > 0:
        return float(accelerator.clip_grad_norm_(params, max_norm))
    return float(torch.norm(torch.stack([p.grad.norm() for p in params])))


def make_optimizer(policy: Policy, cfg: Config) -> torch.optim.Optimizer:
    params = [p for p in policy.model.parameters() if p.requires_grad]
    name = cfg.train.optimizer
    if name == "auto":
        name = "paged_adamw_8bit" if policy.device.type == "cuda" else "adamw"
    if name == "paged_adamw_8bit":
        if policy.device.type != "cuda":
            raise UserError("train.optimizer=paged_adamw_8bit needs CUDA: use train.optimizer=adamw on the CPU")
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(params, lr=cfg.train.learning_rate, weight_decay=cfg.train.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.train.learning_rate, weight_decay=cfg.train.weight_decay)


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


class PromptOrder:
    """Which training row the n-th prompt is: a fresh seeded permutation per epoch, so position n alone
    (not any hidden iterator state) decides it, and a resumed run continues exactly."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed = size, seed
        self._epoch, self._perm = -1, []

    def index(self, n: int) -> int:
        epoch, pos = divmod(n, self.size)
        if epoch != self._epoch:
            self._perm = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
            self._epoch = epoch
        return self._perm[pos]


def report_skipped(data, console=None) -> None:
    """One line per run about rows left out (data.on_bad_row=skip), the first few with their reasons."""
    if not data.skipped:
        return
    from rich.console import Console

    shown = "; ".join(f"row {b.index}: {b.reason}" for b in data.skipped[:3])
    more = f" (+{len(data.skipped) - 3} more, listed in train_summary.json)" if len(data.skipped) > 3 else ""
    (console or Console(stderr=True)).print(
        f"[yellow]skipped {len(data.skipped)} of {len(data.skipped) + len(data.examples)} rows of {data.source} "
        f"split {data.split!r}[/yellow]: {shown}{more}"
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
