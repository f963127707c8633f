"""The setup a training run shares, whatever its method (GRPO in trainer.py, the supervised baseline in sft.py):
data, the (warmed) base with adapters, optimizer and schedule prepared by accelerate, train.output_dir claimed and
locked, resume from the newest checkpoint (`prepare_run` -> `Run`), and checkpoints and the final save (`Run`).

A loss, gradient or weights that are not finite stop the run with a TrainingError naming the step and the likely
cause (`advice`); no checkpoint or adapter is ever written from weights that are not finite.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import re
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from qlora_rft import checkpoint
from qlora_rft.config import RUN_CONFIG_HEADER, Config, dump
from qlora_rft.data import load_split
from qlora_rft.distributed import (
    Launch,
    NonFiniteStep,
    Updates,
    all_finite,
    check_launch,
    everywhere,
    make_accelerator,
    register_head,
    whole_models,
)
from qlora_rft.errors import OutputError, TrainingError, UserError
from qlora_rft.files import atomic_folder, lock_folder, reporting_full_disk, unlock_folder
from qlora_rft.model import (
    Policy,
    check_model_folder,
    load_policy,
    load_reference,
    model_family,
    pick_device,
    reference_mode,
    resolve_model_path,
)
from qlora_rft.memory import check_training_fits
from qlora_rft.order import PromptOrder, epochs_done, training_steps
from qlora_rft.pretrained import save_adapter
from qlora_rft.prompts import without_long_prompts
from qlora_rft.rollout import CompletionScorer, Rollout
from qlora_rft.runlog import NullLogger, RunLogger
from qlora_rft.tasks import get_task
from qlora_rft.trackers import open_trackers, require
from qlora_rft.video import VideoRule


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
    launch: Launch
    out: Path
    task: object  # tasks.Task
    data: object  # data.Dataset
    base_path: str  # the (warmed) base the adapters sit on
    policy: Policy
    accelerator: object
    model: torch.nn.Module  # the CompletionScorer around the policy, as prepared by accelerate (DDP, DeepSpeed)
    unwrapped: torch.nn.Module  # the policy itself: the PeftModel, or the model itself in full mode
    optimizer: torch.optim.Optimizer
    scheduler: object
    updates: Updates
    reference_model: torch.nn.Module | None  # full mode: the frozen copy's scorer (prepared); else None
    start_step: int  # 0, or the step of the checkpoint resumed from
    seconds_before: float  # training seconds of the sessions before this one (0, or the checkpoint's)
    order: PromptOrder
    spares: PromptOrder  # dynamic sampling's fresh rows: an order of their own
    steps: int  # the run's optimizer steps: train.max_steps, or from train.epochs and the rows
    sampling: dict = field(default_factory=dict)  # which sampling weights and decoder ran, and why

    def examples(self, step: int) -> list:
        """This process's training rows of an optimizer step: decided by the step and the process alone, so a
        resumed run continues exactly and no two processes take the same row."""
        return self._rows(self.order, step, self.cfg.train.prompts_per_step)

    def spare_examples(self, step: int) -> list:
        """This process's fresh rows for dynamic sampling in a step (grpo.max_extra_groups), chosen the same way
        from an order of their own."""
        return self._rows(self.spares, step, self.cfg.grpo.max_extra_groups)

    def _rows(self, order: "PromptOrder", step: int, per_process: int) -> list:
        first = ((step - 1) * self.launch.world_size + self.launch.rank) * per_process
        return [self.data.examples[order.index(first + i)] for i in range(per_process)]

    def epoch(self, step: int) -> float:
        """Passes over the training rows done after `step` steps (every process's prompts counted)."""
        return epochs_done(step, len(self.data.examples), self.cfg.train.prompts_per_step * self.launch.world_size)

    @contextlib.contextmanager
    def reference(self):
        """The module that scores under the reference policy: the adapters-disabled policy, or full mode's copy."""
        if self.reference_model is not None:
            with torch.no_grad():
                yield self.reference_model
        else:
            with reference_mode(self.unwrapped):
                yield self.model

    def logger(self, console, log: bool, shown: tuple[str, ...] | None = None):
        if not (log and self.accelerator.is_main_process):
            return NullLogger()
        kwargs = {"shown": shown} if shown else {}
        trackers = open_trackers(self.cfg.train.report_to, self.out, self.cfg.to_dict(), self.start_step)
        return RunLogger(self.out / "metrics.jsonl", self.steps, self.start_step, console, trackers=trackers, **kwargs)

    def optimizer_step(self, step: int, loss: float) -> float:
        """The optimizer step (`Updates.step`, given this process's loss); returns the gradient norm. A loss or
        gradient norm that is not finite stops the run, before the step is applied or saved."""
        try:
            return self.updates.step(loss)
        except NonFiniteStep as e:
            raise TrainingError(non_finite_message(self.cfg, step, e)) from None

    def require_finite_logits(self, step: int, rollouts: list[Rollout]) -> None:
        """Stop, on every process alike, when a process sampled from logits that were not finite."""
        if not everywhere(self.accelerator, all(r.finite for r in rollouts)):
            raise TrainingError(f"step {step}: the policy's next-token logits were NaN or infinite while sampling, "
                                f"so training stopped before this step's update. {advice(self.cfg)}")

    def require_finite_weights(self, folder: Path) -> None:
        """Refuse, on every process alike, to write `folder` from trained weights that hold NaN or inf."""
        if not all_finite(self.accelerator, self.model):
            raise TrainingError(f"{folder} was not written: some trained weights are NaN or infinite. "
                                f"{advice(self.cfg)}")

    def checkpoint(self, step: int, seconds: float) -> None:
        """checkpoint-STEP/ every train.save_steps; `seconds`: the run's training time so far, every session's."""
        cfg = self.cfg.train
        if not (cfg.save_steps and step % cfg.save_steps == 0):
            return
        self.require_finite_weights(self.out / f"checkpoint-{step}")
        position = {"prompts_seen": step * cfg.prompts_per_step * self.launch.world_size,
                    "data_rows": len(self.data.examples), "data_skipped": len(self.data.skipped),
                    "world_size": self.launch.world_size,  # the order itself follows from the step and seed
                    "config": self.cfg.to_dict(),  # what --resume must keep (`check_resume_settings`)
                    "seconds": seconds}
        if self.updates.engine is not None:  # sharded states: every process writes its own part
            checkpoint.save_sharded(self.accelerator, self.out, step, position, keep=cfg.save_total_limit)
            return
        from accelerate.utils import gather_object

        rng_states = gather_object([checkpoint.rng_state()]) if self.launch.world_size > 1 else None  # rank order
        if self.accelerator.is_main_process:  # replicated weights and optimizer: one copy, every process's RNG
            checkpoint.save(self.out, step, self.unwrapped, self.optimizer, self.scheduler, position,
                            keep=cfg.save_total_limit, rng_states=rng_states)
        self.accelerator.wait_for_everyone()

    def finish(self, metrics: list[dict], seconds: float) -> TrainResult:
        """Save train_summary.json, then the adapter (peft format) or, in full mode, the model (from_pretrained
        folder), each with the processor, written whole or not at all: a folder with adapter/ (or model/) always
        has its summary. Then the output folder is unlocked."""
        full = self.cfg.model.mode == "full"
        folder = self.out / ("model" if full else "adapter")
        self.require_finite_weights(folder)
        state = self.accelerator.get_state_dict(self.model) if self.launch.deepspeed else None  # every process
        if self.accelerator.is_main_process:
            summary = {"method": self.cfg.train.method, "mode": self.cfg.model.mode,
                       "steps": self.steps, "epochs": self.epoch(self.steps), "base": self.base_path,
                       "processes": self.launch.world_size, "data_rows": len(self.data.examples),
                       "data_skipped": [vars(b) for b in self.data.skipped], "seconds": seconds,
                       "sampling": self.sampling}
            last = checkpoint.latest(self.out)
            kept = (f"{last.name} is kept: free some space and run again with --resume" if last is not None else
                    "no checkpoint was written (train.save_steps): free some space and run again with --overwrite")
            with reporting_full_disk(f"the final {folder.name}/ in {self.out}", kept):
                (self.out / "train_summary.json").write_text(json.dumps(summary, indent=2))
                with atomic_folder(folder) as tmp:
                    # Full mode writes the current names ("model.language_model.*"): a model loaded sharded under
                    # ZeRO-3 cannot be mapped back to the names it was loaded from.
                    if state is not None:  # gathered from the shards; the scorer's keys start with "policy."
                        state = {k.removeprefix("policy."): v for k, v in state.items()}
                    if full:
                        self.unwrapped.save_pretrained(tmp, state_dict=state, save_original_format=False)
                    else:
                        save_adapter(self.unwrapped, tmp, state)
                    self.policy.processor.save_pretrained(tmp)
            unlock_folder(self.out)
        self.accelerator.wait_for_everyone()
        return TrainResult(self.out, folder, self.steps, metrics, len(self.data.skipped))


def prepare_run(cfg: Config, resume: bool, console=None) -> Run:
    """Data, the (warmed) base with fresh LoRA adapters (or, in full mode, the base itself and a frozen reference
    copy), optimizer and schedule prepared by accelerate, and the state of the newest checkpoint when resuming."""
    from rich.console import Console
    from transformers import get_scheduler

    from qlora_rft.warmup import warmed_base

    launch = Launch.from_env()
    check_inputs(cfg, launch)  # before anything loads
    out = Path(cfg.train.output_dir)
    found = claim_output_dir(cfg, resume, launch, console)
    check_training_fits(cfg, resolve_model_path(cfg.model.name_or_path), pick_device(cfg.model.device))
    accelerator = make_accelerator(cfg, launch, pick_device(cfg.model.device))
    task = get_task(cfg.data.task)
    # Data, tiny models and warm-ups are built once by the main process, then read from the cache by the others.
    with accelerator.main_process_first(), whole_models(accelerator):
        data = load_split(cfg.data.train, cfg.data.train_split, task, cfg.data.on_bad_row, cfg.data.image_root,
                          min_pixels=cfg.data.min_pixels, max_pixels=cfg.data.max_pixels,
                          factor=model_family(cfg.model.name_or_path).factor, video=VideoRule.of(cfg.data),
                          console=console if accelerator.is_main_process else Console(quiet=True))
        base_path = str(resolve_model_path(warmed_base(cfg, console)))
    check_launch(cfg, launch, rows=len(data.examples))

    seed_everything(cfg.train.seed)  # after building and warm-up: the same start whether they ran or were cached
    model_cfg = replace(cfg.model, name_or_path=base_path)
    policy = load_policy(model_cfg, cfg.lora)
    data = without_long_prompts(data, policy.processor, task, cfg.data)  # so no prompt fails mid-run
    check_launch(cfg, launch, rows=len(data.examples))
    if accelerator.is_main_process:
        report_skipped(data, console)
    per_step = cfg.train.prompts_per_step * launch.world_size  # every process's prompts
    steps = training_steps(cfg.train.max_steps, cfg.train.epochs, len(data.examples), per_step)
    if cfg.train.epochs and accelerator.is_main_process:
        from rich.console import Console

        (console or Console()).print(f"training length: {cfg.train.epochs} epoch(s) of {len(data.examples)} rows "
                                     f"at {per_step} prompts per step = {steps} steps")
    optimizer = make_optimizer(policy, cfg)
    warmup_steps = math.ceil(cfg.train.warmup_ratio * steps)
    scheduler = get_scheduler(cfg.train.lr_scheduler, optimizer, warmup_steps, steps)
    scorer = CompletionScorer(policy.model)
    register_head(scorer, launch)
    # The schedule is stepped once per optimizer step by `Updates` (accelerate's wrapper would step it once per
    # process); under DeepSpeed the checkpoints still carry it.
    model, optimizer = accelerator.prepare(scorer, optimizer)
    if launch.deepspeed:
        accelerator.register_for_checkpointing(scheduler)
    reference_model = None
    if cfg.model.mode == "full" and cfg.grpo.beta != 0:
        reference_model = prepare_reference(accelerator, launch, model_cfg, policy)
    if launch.world_size > 1:
        torch.manual_seed(cfg.train.seed + 1000 * launch.rank)  # same initial weights, each its own samples
    updates = Updates(accelerator, model, optimizer, scheduler, cfg.train.max_grad_norm)

    state = {}
    if resume and updates.engine is not None:
        state = checkpoint.load_sharded(accelerator, found, launch.world_size)
    elif resume:
        state = checkpoint.load(found, policy.model, optimizer, scheduler, launch.rank, launch.world_size)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        dump(cfg, out / CONFIG_FILE)
    return Run(cfg, launch, out, task, data, base_path, policy, accelerator, model, policy.model, optimizer,
               scheduler, updates, reference_model, state.get("step", 0), float(state.get("seconds", 0.0)),
               PromptOrder(len(data.examples), cfg.train.seed, per_step),
               PromptOrder(len(data.examples), cfg.train.seed, stream=1), steps)


CONFIG_FILE = "config.yaml"  # the run's resolved config, rewritten at every start
# What a run writes into train.output_dir; any of them (or a checkpoint) means the folder holds a run.
RUN_FILES = ("adapter", "model", "train_summary.json", "metrics.jsonl", "completions.jsonl", "evals", "tensorboard",
             "wandb")


def run_files(out: Path) -> list[Path]:
    """The files and folders of an earlier run in `out`: its results, metrics and checkpoints (complete or not)."""
    if not out.is_dir():
        return []
    return sorted(p for p in out.iterdir() if p.name in RUN_FILES or re.fullmatch(r"checkpoint-\d+", p.name))


def claim_output_dir(cfg: Config, resume: bool, launch: Launch, console=None) -> Path | None:
    """Before anything loads: the main process locks train.output_dir (refused while another run holds it, or
    when it cannot be written) and refuses to write over an earlier run unless resuming. Returns the checkpoint to
    resume from: the newest that reads whole (the newer damaged ones named), trained with the same settings."""
    out = Path(cfg.train.output_dir)
    if launch.rank == 0:
        lock_folder(out, "train.output_dir")
    try:
        check_config_file(out)
        earlier = run_files(out)
        found = checkpoint.resumable(out, sharded=launch.deepspeed) if resume else None
        if resume and found is None:
            fresh = "start afresh with --overwrite" if earlier else "run without --resume to start afresh"
            raise UserError(f"--resume: no complete checkpoint in {out}; {fresh}")
        if found is not None:
            check_resume_settings(cfg, found.state.get("config") or _recorded_config(out), found.path)
        if earlier and not resume and launch.rank == 0:  # the others may see the files fit(overwrite) is removing
            names = ", ".join(p.name for p in earlier[:4]) + (", ..." if len(earlier) > 4 else "")
            raise OutputError(f"train.output_dir={out} holds a run ({names}): pass --resume to continue it, "
                              "--overwrite to replace it, or choose another train.output_dir")
    except UserError:
        unlock_folder(out)
        raise
    if found is not None and found.damaged and launch.rank == 0:
        from rich.console import Console
        from rich.markup import escape

        console = console or Console(stderr=True)
        for message in found.damaged:
            console.print(f"[yellow]passed over a damaged checkpoint[/yellow]: {escape(message)}")
        console.print(f"resuming from {found.path.name}, the newest checkpoint that reads whole")
    return found.path if found is not None else None


# What --resume may change: the length, and the settings that never touch the result (logging, saving, evaluation).
RESUMABLE_CHANGES = ("train.max_steps", "train.epochs", "train.output_dir", "train.save_steps",
                     "train.save_total_limit", "train.logging_steps", "train.report_to", "train.log_completions",
                     "train.eval_steps", "data.eval", "data.eval_split", "rewards.plugin_timeout", "eval.*")


def check_resume_settings(cfg: Config, recorded: dict | None, found: Path) -> None:
    """Refuse to resume with a setting that changes training (naming each) other than RESUMABLE_CHANGES: the run
    would go on as another run while its config.yaml claimed the new values for the whole of it. `recorded`: the
    config the checkpoint was trained with (None: unknown, nothing to compare)."""
    if not isinstance(recorded, dict):
        return
    was, now = _flat(recorded), _flat(json.loads(json.dumps(cfg.to_dict())))
    changed = [key for key in now if key in was and was[key] != now[key]
               and key not in RESUMABLE_CHANGES and f"{key.split('.')[0]}.*" not in RESUMABLE_CHANGES]
    if changed:
        shown = "; ".join(f"{key} {json.dumps(was[key])} -> {json.dumps(now[key])}" for key in changed)
        raise UserError(f"--resume: {found.name} was trained with other settings ({shown}): settings "
                        "that change training cannot change mid-run (only the length, train.max_steps or "
                        "train.epochs, and logging, saving and evaluation settings can): restore them, or start a "
                        "new run (--overwrite, or another train.output_dir)")


def _flat(config: dict) -> dict:
    return {f"{section}.{key}": value for section, values in config.items() if isinstance(values, dict)
            for key, value in values.items()}


def _recorded_config(out: Path) -> dict | None:
    """The config.yaml an older version's run left (its checkpoints did not record their config), if readable."""
    import yaml

    try:
        recorded = yaml.safe_load((out / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return recorded if isinstance(recorded, dict) else None


def check_inputs(cfg: Config, launch: Launch) -> None:
    """What can be refused before anything loads: the launch, and a model folder that is not a supported model."""
    check_launch(cfg, launch)
    require(cfg.train.report_to)  # a tracker's package
    if not cfg.model.name_or_path.startswith("tiny:"):
        check_model_folder(Path(cfg.model.name_or_path).expanduser())


def check_config_file(out: Path) -> None:
    """Refuse a train.output_dir whose config.yaml no run wrote (the user's own config, say), which starting,
    resuming or --overwrite would write over or delete: a run's is marked by its first line, or (written by an
    older version) lies beside the run's files; a link is never a run's."""
    file = out / CONFIG_FILE
    if not (file.exists() or file.is_symlink()):
        return
    if not file.is_symlink() and file.is_file():
        with file.open(encoding="utf-8", errors="replace") as f:
            if f.readline() == RUN_CONFIG_HEADER or run_files(out):
                return
    raise OutputError(f"train.output_dir={out} holds a {CONFIG_FILE} that no run wrote (a config of yours?), where a "
                      f"run writes its resolved config: move it, or choose another train.output_dir")


def start_afresh(out: Path) -> None:
    """Lock train.output_dir and remove an earlier run's files from it (other files are left alone)."""
    lock_folder(out, "train.output_dir")
    try:
        check_config_file(out)
    except UserError:
        unlock_folder(out)
        raise
    for path in [*run_files(out), out / CONFIG_FILE]:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def prepare_reference(accelerator, launch: Launch, model_cfg, policy: Policy) -> torch.nn.Module:
    """Full mode's reference: a frozen copy of the base in a scorer; under DeepSpeed an engine of its own (sharded
    like the policy under ZeRO-3, no optimizer), so there is never a second unsharded copy."""
    reference = CompletionScorer(load_reference(model_cfg, policy.device, policy.dtype))
    if not launch.deepspeed:
        return reference
    from trl.models.utils import prepare_deepspeed

    register_head(reference, launch)
    return prepare_deepspeed(reference, accelerator)


def make_optimizer(policy: Policy, cfg: Config) -> torch.optim.Optimizer:
    params = [p for p in policy.model.parameters() if p.requires_grad]
    name = cfg.train.optimizer
    if name == "auto":  # 8-bit paged state for the adapters on one GPU; full mode's state is DeepSpeed's to shard
        name = "paged_adamw_8bit" if policy.device.type == "cuda" and cfg.model.mode != "full" else "adamw"
    if name == "paged_adamw_8bit":
        if policy.device.type != "cuda":
            raise UserError("train.optimizer=paged_adamw_8bit needs CUDA: use train.optimizer=adamw on the CPU")
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(params, lr=cfg.train.learning_rate, weight_decay=cfg.train.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.train.learning_rate, weight_decay=cfg.train.weight_decay)


def non_finite_message(cfg: Config, step: int, e: NonFiniteStep) -> str:
    what = f"the loss is {e.loss}" if not math.isfinite(e.loss) else f"the gradient norm is {e.grad_norm}"
    applied = "the DeepSpeed engine applied it" if e.applied else "it was not applied"
    return f"step {step}: {what}, so training stopped ({applied}; no checkpoint of it was written). {advice(cfg)}"


def advice(cfg: Config) -> str:
    """The likely cause of values that are not finite, and what to do."""
    cause = f"train.learning_rate={cfg.train.learning_rate:g} is too high for this model in model.mode={cfg.model.mode}"
    if cfg.model.dtype == "float16":
        cause += ", or float16 overflowed (model.dtype=bfloat16 or float32 has the range)"
    return (f"Likely cause: {cause}. Lower train.learning_rate and train again into a new train.output_dir "
            "(--resume would keep the learning rate of the checkpoints)")


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
