"""The same trainer under `accelerate launch`: one process, DDP, DeepSpeed ZeRO-2/3, one machine or several.

Nothing here is a second trainer. `trainer.train` reads the launch (`Launch.from_env`), refuses bad ones before any
model loads (`check_launch`), and goes through three small seams that do nothing special in a single process:
`Updates` (backward passes and optimizer steps), `sampling_model` (the policy, gathered whole under ZeRO-3, for
generate) and `gather_mean` (metrics averaged over processes; `everywhere`, one decision taken by all). Each process
samples its own prompts and scores its own groups; a group never spans processes, and gradients are averaged by the
engine. A step with a loss or gradient that is not finite is stopped in every process alike (`NonFiniteStep`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from qlora_rft.config import Config
from qlora_rft.errors import ConfigError


@dataclass(frozen=True)
class Launch:
    """What `accelerate launch` put in the environment, read before anything is loaded."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    deepspeed: bool = False
    zero_stage: int = 0  # 0 without DeepSpeed
    deepspeed_config_file: str = ""  # a DeepSpeed JSON named by the launch config, if any

    @classmethod
    def from_env(cls, env: dict | None = None) -> "Launch":
        env = os.environ if env is None else env
        deepspeed = env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
        config_file = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "") if deepspeed else ""
        stage = int(env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "0") or 0) if deepspeed else 0
        if deepspeed and config_file and "ACCELERATE_DEEPSPEED_ZERO_STAGE" not in env:
            stage = int(_read_json(config_file).get("zero_optimization", {}).get("stage", 0))
        return cls(
            world_size=int(env.get("WORLD_SIZE", "1")),
            rank=int(env.get("RANK", "0")),
            local_rank=int(env.get("LOCAL_RANK", "0")),
            deepspeed=deepspeed,
            zero_stage=stage,
            deepspeed_config_file=config_file,
        )

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or self.deepspeed


def _read_json(path: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"DeepSpeed config file {path} could not be read: {e}") from None


def micro_batch(cfg: Config) -> int:
    """Completions per forward/backward: grpo.backward_chunk, or the whole group."""
    return cfg.grpo.backward_chunk or cfg.grpo.num_generations


def backwards_per_step(cfg: Config) -> int:
    """Forward/backward passes of one optimizer step in each process (every group, every chunk)."""
    return cfg.train.prompts_per_step * cfg.grpo.num_generations // micro_batch(cfg)


def check_launch(cfg: Config, launch: Launch, rows: int | None = None) -> None:
    """Name a launch this trainer cannot run, before any model loads, saying what to change.

    `rows` (the training rows, once the data is read) adds the check that one step's prompts are distinct rows.
    Any other row count works: the prompt order is one seeded permutation per epoch, walked by all processes
    together, so an epoch may end inside a step and every row is still seen once per epoch.
    """
    problems = []
    mode = cfg.model.mode
    if launch.deepspeed and mode == "qlora":
        problems.append(
            f"model.mode=qlora under DeepSpeed ZeRO-{launch.zero_stage}: DeepSpeed cannot shard 4-bit NF4 weights; "
            "use model.mode=full (the paper's setup) or model.mode=lora with a DeepSpeed config, or keep qlora "
            "with configs/accelerate/ddp.yaml or single_gpu.yaml"
        )
    if launch.world_size > 1 and cfg.train.method == "sft":
        problems.append("train.method=sft runs in one process: launch it without accelerate (qlora-rft sft CONFIG)")
    if launch.deepspeed and launch.deepspeed_config_file:
        ds = _read_json(launch.deepspeed_config_file)
        wanted = {"train_micro_batch_size_per_gpu": micro_batch(cfg),
                  "gradient_accumulation_steps": backwards_per_step(cfg)}
        for key, value in wanted.items():
            given = ds.get(key, "auto")
            if given != "auto" and given != value:
                problems.append(
                    f"{launch.deepspeed_config_file}: {key}={given} does not fit the groups: each process runs "
                    f"{backwards_per_step(cfg)} forward/backward passes of {micro_batch(cfg)} completions per step "
                    f"(train.prompts_per_step={cfg.train.prompts_per_step}, grpo.num_generations="
                    f"{cfg.grpo.num_generations}, grpo.backward_chunk={cfg.grpo.backward_chunk}); set {key} to "
                    f"\"auto\" (the trainer fills it in) or {value}"
                )
    per_step = launch.world_size * cfg.train.prompts_per_step
    if rows is not None and rows < per_step:
        problems.append(
            f"{rows} training rows cannot be divided among {launch.world_size} processes x "
            f"train.prompts_per_step={cfg.train.prompts_per_step}: a step would give the same prompt to two of "
            f"them; launch at most {max(rows // cfg.train.prompts_per_step, 1)} processes or lower "
            "train.prompts_per_step"
        )
    if rows is not None and cfg.grpo.dynamic_sampling and cfg.grpo.max_extra_groups > rows:
        problems.append(f"grpo.max_extra_groups={cfg.grpo.max_extra_groups} fresh prompts per step is more than the "
                        f"{rows} training rows: set it to {rows} or fewer")
    if problems:
        raise ConfigError("this launch cannot run:\n  - " + "\n  - ".join(problems))


def make_accelerator(cfg: Config, launch: Launch, device: torch.device):
    """The Accelerator of a run; under DeepSpeed its config gets the batch sizes, accumulation and clipping that
    follow from the run config (nothing is prepared yet, so every "auto" is resolved here)."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    handlers = []
    if launch.world_size > 1 and device.type == "cpu":
        handlers.append(InitProcessGroupKwargs(backend="gloo"))  # accelerate picks no CPU backend under DeepSpeed
    accelerator = Accelerator(cpu=device.type == "cpu" and not launch.deepspeed, kwargs_handlers=handlers)
    if launch.deepspeed:
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = micro_batch(cfg)
        ds["gradient_accumulation_steps"] = backwards_per_step(cfg)
        ds["train_batch_size"] = micro_batch(cfg) * backwards_per_step(cfg) * accelerator.num_processes
        ds["gradient_clipping"] = cfg.train.max_grad_norm
    return accelerator


@contextlib.contextmanager
def whole_models(accelerator):
    """Inside, from_pretrained and model construction make plain whole models even under a ZeRO-3 launch: for
    what the main process builds alone (a tiny random model, a warm-up), where sharding at construction would wait
    forever for the other processes."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled, unset_hf_deepspeed_config

    if not is_deepspeed_zero3_enabled():
        yield
        return
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        accelerator.state.deepspeed_plugin.set_deepspeed_weakref()


def deepspeed_engine(accelerator):
    """The DeepSpeed engine the model was prepared into, or None."""
    wrapped = getattr(accelerator, "deepspeed_engine_wrapped", None)
    return wrapped.engine if wrapped is not None else None


class Updates:
    """Backward passes and optimizer steps: the same three calls in one process, under DDP and under DeepSpeed.

    with updates.accumulating(last):  # around each chunk's forward and backward
        updates.backward(loss)        # the loss's share of the step, never rescaled here
    grad_norm = updates.step(total)   # total: the step's loss; clip, step the optimizer and the schedule, zero grads
    """

    def __init__(self, accelerator, model, optimizer, scheduler, max_grad_norm: float):
        self.accelerator, self.model = accelerator, model
        self.optimizer, self.scheduler, self.max_grad_norm = optimizer, scheduler, max_grad_norm
        self.engine = deepspeed_engine(accelerator)

    @contextlib.contextmanager
    def accumulating(self, last: bool):
        """Gradients are averaged over processes at the last backward of a step only."""
        if self.engine is not None:
            self.engine.set_gradient_accumulation_boundary(last)
            yield
        elif last or self.accelerator.num_processes == 1:
            yield
        else:
            with self.accelerator.no_sync(self.model):
                yield

    def backward(self, loss: torch.Tensor) -> None:
        if self.engine is not None:
            self.engine.backward(loss, scale_wrt_gas=False)  # our shares already add up to the step's loss
        else:
            self.accelerator.backward(loss)

    def step(self, loss: float) -> float:
        """The optimizer step; returns the gradient norm. `loss` is this process's loss of the step.

        Raises NonFiniteStep, on every process alike, when the loss of any process or the gradient norm is not
        finite: before the optimizer applies anything, except that a DeepSpeed engine clips and steps in one call,
        so there a non-finite gradient norm (with a finite loss) is seen only after its step (which the engine
        skips in some setups, and always under fp16 loss scaling, where such a step is no fault).
        """
        loss = gather_mean(self.accelerator, {"loss": loss})["loss"]  # non-finite if any process's is
        if self.engine is not None:  # clipping (gradient_clipping), optimizer, schedule and zeroing in one call
            if not math.isfinite(loss):
                raise NonFiniteStep(loss, None, applied=False)
            self.engine.step()
            norm = self.engine.get_global_grad_norm()
            norm = float(norm) if norm is not None else 0.0
            applied = self.engine.was_step_applied()
            if not math.isfinite(norm) and (applied or not self.engine.fp16_enabled()):  # fp16: a skipped step
                raise NonFiniteStep(loss, norm, applied)                                # only lowers the loss scale
            self.scheduler.step()  # ours, not the engine's
            return norm
        norm = clip_gradients(self.accelerator, self.model, self.max_grad_norm)  # global: gradients are averaged
        if not (math.isfinite(loss) and math.isfinite(norm)):
            raise NonFiniteStep(loss, norm, applied=False)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm


class OneProcess:
    """What `Updates` asks of an Accelerator, for a loop this process runs alone whatever the launch (the warm-up,
    which the main process builds while the others wait): a plain backward and gradient clipping."""

    num_processes = 1

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_grad_norm_(self, params, max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)


class NonFiniteStep(Exception):
    """A step whose loss or gradient norm is NaN or infinite; `applied`: whether the optimizer applied it anyway
    (only a DeepSpeed engine can have: it steps before its gradient norm is known)."""

    def __init__(self, loss: float, grad_norm: float | None, applied: bool):
        super().__init__(f"loss {loss}, gradient norm {grad_norm}")
        self.loss, self.grad_norm, self.applied = loss, grad_norm, applied


def all_finite(accelerator, model) -> bool:
    """Whether every trained weight is finite, on every process (each checks its own; ZeRO-3: its shards)."""
    local = (getattr(p, "ds_tensor", p) for p in model.parameters() if p.requires_grad)
    return everywhere(accelerator, all(bool(torch.isfinite(t).all()) for t in local))


def everywhere(accelerator, flag: bool) -> bool:
    """Whether `flag` holds on every process (every process calls this), so that all take the same decision."""
    return gather_mean(accelerator, {"flag": float(flag)})["flag"] == 1.0


def clip_gradients(accelerator, model, max_norm: float) -> float:
    params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
    if not params:
        return 0.0
    if max_norm > 0:
        return float(accelerator.clip_grad_norm_(params, max_norm))
    return float(torch.norm(torch.stack([p.grad.norm() for p in params])))


@contextlib.contextmanager
def sampling_model(accelerator, model):
    """The policy for generate: unwrapped, and under ZeRO-3 with its shards gathered whole (and the engine's hooks
    lifted) for the duration, so that each process can sample its own prompts to its own lengths."""
    if deepspeed_engine(accelerator) is not None and accelerator.state.deepspeed_plugin.zero_stage == 3:
        import deepspeed
        from trl.models.utils import add_hooks, remove_hooks

        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            remove_hooks(model)  # no per-layer gathering (a collective) at each decoded token
            try:
                yield accelerator.unwrap_model(model)
            finally:
                add_hooks(model)
    else:
        yield accelerator.unwrap_model(model)


def gather_mean(accelerator, values: dict[str, float]) -> dict[str, float]:
    """Per-process metrics averaged over the processes (every process calls this, with the same keys)."""
    if accelerator.num_processes == 1:
        return values
    keys = sorted(values)
    local = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=accelerator.device)
    total = accelerator.reduce(local, reduction="mean")
    return dict(zip(keys, total.tolist()))


def gather_all(accelerator, values: torch.Tensor) -> torch.Tensor:
    """Every process's `values` (the same shape on each) concatenated along dim 0 in rank order, on the CPU
    (every process calls this)."""
    if accelerator.num_processes == 1:
        return values
    return accelerator.gather(values.to(accelerator.device)).cpu()


def register_head(scorer, launch: Launch) -> None:
    """ZeRO-3 gathers a layer's weights when that layer runs; the scorer reads the LM head's weight directly (its
    chunked log-probs), so tell DeepSpeed to gather it for the scorer's forward and backward too. Other launches:
    nothing to do."""
    if launch.zero_stage != 3:
        return
    import deepspeed

    deepspeed.zero.register_external_parameter(scorer, scorer.head_weight())
