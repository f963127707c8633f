"""The rules a config must keep, checked once it is read (`config.load_config` calls `validate`): each field's range
and the rules between fields, section by section, every problem listed with what to change, before any model loads.
"""

from __future__ import annotations

import difflib
import math
from typing import TYPE_CHECKING, Any, Callable

from qlora_rft.errors import ConfigError

if TYPE_CHECKING:
    from qlora_rft.config import Config
    from qlora_rft.tasks import Task


TRACKERS = ("none", "tensorboard", "wandb")  # train.report_to's choices
FLOAT32_MAX = 3.4028234663852886e38  # an optimizer's learning rate must fit in float32
MAX_SEED = 2**32 - 1  # numpy's seeds are 32-bit
Need = Callable[[bool, str], None]  # need(condition, what to change when it fails)


def suggest(name: str, options) -> str:
    """The closest known name, for an error message ("did you mean ...?"), or the known names."""
    close = difflib.get_close_matches(name, list(options), n=1)
    return f": did you mean {close[0]!r}?" if close else f": known are {', '.join(sorted(options))}"


def validate(cfg: Config) -> None:
    """Check fields and the rules between them, section by section; raise ConfigError listing every problem, each
    saying what to change."""
    from qlora_rft.tasks import TASKS

    task = TASKS[cfg.data.task]  # a known name: checked as the field was read
    problems: list[str] = []

    def need(cond: bool, message: str) -> None:
        if not cond:
            problems.append(message)

    for check in (_check_grpo, _check_train, _check_lora, _check_data, _check_eval, _check_warmup, _check_rewards,
                  _check_model):
        check(cfg, task, need)
    problems += [f"{key} holds a NUL character, which no path or name can: remove it"
                 for key, value in _strings(cfg) if "\x00" in value]
    if len(problems) == 1:
        raise ConfigError(f"invalid config: {problems[0]}")
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))


def _check_grpo(cfg: Config, task: Task, need: Need) -> None:
    """grpo.*: group sizes and chunks, sampling, the loss's clipping, the sampling weights."""
    g = cfg.grpo
    need(g.num_generations >= 2, f"grpo.num_generations must be >= 2 (got {g.num_generations}): "
         "the advantage compares samples of one group; set grpo.num_generations=2 or more")
    G, per_step = g.num_generations, cfg.train.prompts_per_step
    chunk = g.backward_chunk
    need(chunk >= 0 and (chunk == 0 or G % chunk == 0),
         f"grpo.backward_chunk={chunk} must divide grpo.num_generations={G} "
         f"(try one of {_divisors(G)}, or 0 for all at once)")
    chunk = g.generation_chunk
    packs = [G * k for k in _divisors(per_step)]
    need(chunk >= 0 and (chunk == 0 or G % chunk == 0 or chunk in packs),
         f"grpo.generation_chunk={chunk} must divide grpo.num_generations={G} (one of {_divisors(G)}) or be a "
         f"multiple of it dividing G * train.prompts_per_step (one of {packs}); 0 means G")
    need(g.max_completion_length >= 1, "grpo.max_completion_length must be >= 1")
    need(0 <= g.min_completion_length <= g.max_completion_length,
         "grpo.min_completion_length must be in [0, grpo.max_completion_length]")
    need(g.temperature > 0, "grpo.temperature must be > 0 (sampling; greedy groups have no variance)")
    need(0 < g.top_p <= 1, "grpo.top_p must be in (0, 1]")
    need(g.top_k >= 0, "grpo.top_k must be >= 0 (0: off)")
    need(g.beta >= 0, "grpo.beta must be >= 0")
    need(g.epsilon > 0, "grpo.epsilon must be > 0")
    need(g.epsilon_high >= 0, "grpo.epsilon_high must be >= 0 (0: grpo.epsilon)")
    if g.loss_type == "cispo":
        need(g.clip_high >= 1, f"grpo.loss_type=cispo caps the importance weight at grpo.epsilon_high itself (not 1 + "
             f"it), so {g.clip_high:g} would scale every update down: set grpo.epsilon_high >= 1, or 0 for 5.0")
    else:
        need(g.clip_high >= g.epsilon, f"grpo.epsilon_high={g.epsilon_high:g} is below grpo.epsilon={g.epsilon:g}: "
             "clip-higher only widens the upper range; set it >= grpo.epsilon, or 0 for the same")
    need(g.sapo_temperature_pos > 0 and g.sapo_temperature_neg > 0,
         "grpo.sapo_temperature_pos and grpo.sapo_temperature_neg must be > 0")
    need(g.max_extra_groups >= 0, "grpo.max_extra_groups must be >= 0")
    need(not g.dynamic_sampling or g.max_extra_groups >= 1,
         "grpo.dynamic_sampling needs grpo.max_extra_groups >= 1 (fresh prompts per step at most)")
    need(g.num_iterations >= 1, "grpo.num_iterations must be >= 1")
    need(g.advantage_eps > 0, "grpo.advantage_eps must be > 0")
    need(g.logprob_chunk >= 1, "grpo.logprob_chunk must be >= 1")
    need(not (g.sampling_weights == "fp8" and cfg.model.device == "cpu"),
         "grpo.sampling_weights=fp8 needs a CUDA GPU (compute capability 8.9+): use int8 or merged on the CPU")
    need(g.importance_cap >= 1, f"grpo.importance_cap={g.importance_cap:g} must be >= 1: below 1 it would weigh down "
         "(tis) or drop (mis) tokens on which sampler and policy agree; TRL's default is 3")


def _check_train(cfg: Config, task: Task, need: Need) -> None:
    """train.*: length, optimisation, saving, logging, the evaluation during training."""
    t = cfg.train
    need(0 <= t.seed <= MAX_SEED, f"train.seed={t.seed} must be in [0, {MAX_SEED}] (the seeds numpy takes)")
    need(t.max_steps >= 0, f"train.max_steps={t.max_steps} must be >= 1 (or 0 when train.epochs sets the length)")
    need(t.epochs >= 0, f"train.epochs={t.epochs} must be >= 1 (or 0 when train.max_steps sets the length)")
    need(not (t.max_steps > 0 and t.epochs > 0),
         f"train.max_steps={t.max_steps} and train.epochs={t.epochs} both set the training length: set one and the "
         f"other to 0 (train.max_steps=0 train.epochs={t.epochs}, or train.epochs=0 train.max_steps={t.max_steps})")
    need(t.max_steps != 0 or t.epochs != 0,
         "no training length: set train.max_steps (steps) or train.epochs (passes over the training prompts)")
    need(t.prompts_per_step >= 1, "train.prompts_per_step must be >= 1")
    need(0 < t.learning_rate < FLOAT32_MAX, "train.learning_rate must be > 0 and < 3.4e38 (float32's range)")
    need(0 <= t.warmup_ratio < 1, "train.warmup_ratio must be in [0, 1)")
    need(t.save_steps >= 0, "train.save_steps must be >= 0 (0: only the final adapter)")
    need(t.save_total_limit >= 0, "train.save_total_limit must be >= 0")
    need(t.logging_steps >= 1, "train.logging_steps must be >= 1")
    need(t.eval_steps >= 0, "train.eval_steps must be >= 0 (0: off)")
    if t.eval_steps > 0 and task.needs_annotations:
        need(bool(cfg.eval.annotations), f"train.eval_steps={t.eval_steps}: {task.name} is evaluated against an "
             "annotation file: set eval.annotations (and eval.images), or train.eval_steps=0")
    elif t.eval_steps > 0:
        need(bool(cfg.data.eval), f"train.eval_steps={t.eval_steps} evaluates held-out data: set data.eval (and "
             "data.eval_split), or train.eval_steps=0")
    need(t.log_completions >= 0, "train.log_completions must be >= 0 (0: off)")
    need(all(name in TRACKERS for name in t.report_to),
         f"train.report_to={','.join(map(str, t.report_to))}: choose among {', '.join(TRACKERS)}")
    need("none" not in t.report_to or len(t.report_to) == 1,
         "train.report_to: none cannot be combined with a tracker; name only the trackers")
    need(t.max_grad_norm >= 0, "train.max_grad_norm must be >= 0")
    need(bool(t.output_dir), "train.output_dir must not be empty")


def _check_lora(cfg: Config, task: Task, need: Need) -> None:
    """lora.*"""
    need(cfg.lora.r >= 1, "lora.r must be >= 1")
    need(cfg.lora.alpha >= 1, "lora.alpha must be >= 1")
    need(0 <= cfg.lora.dropout < 1, "lora.dropout must be in [0, 1)")
    need(bool(cfg.lora.target_modules), "lora.target_modules must name at least one linear layer")


def _check_data(cfg: Config, task: Task, need: Need) -> None:
    """data.*: sources, image and video bounds, prompt length."""
    d = cfg.data
    need(bool(d.train.strip()), "data.train is empty: name the training data (a file or folder, hub:ORG/NAME, or "
         "synthetic:NAME)")
    need(d.min_pixels >= 28 * 28, "data.min_pixels must be >= 784 (one image token of the smallest side, 28x28)")
    need(d.max_pixels <= _max_pixels(), f"data.max_pixels={d.max_pixels} is over {_max_pixels()}, the largest image "
         "area any supported model's processor takes: lower it (401408 = 512 visual tokens is the default)")
    need(d.max_pixels >= d.min_pixels, f"data.max_pixels={d.max_pixels} must be >= data.min_pixels={d.min_pixels}")
    need(d.max_prompt_length >= 16, "data.max_prompt_length must be >= 16")
    need(d.video_fps > 0, f"data.video_fps={d.video_fps:g} must be > 0 (frames sampled per second of a clip)")
    need(d.video_max_frames >= 2, f"data.video_max_frames={d.video_max_frames} must be >= 2 (two frames make one "
         "temporal patch)")
    need(d.video_max_pixels >= d.min_pixels, f"data.video_max_pixels={d.video_max_pixels} must be >= "
         f"data.min_pixels={d.min_pixels} (it is the budget of all a clip's frames)")


def _check_eval(cfg: Config, task: Task, need: Need) -> None:
    """eval.* and the protocol's rules."""
    e = cfg.eval
    need(e.batch_size >= 1, "eval.batch_size must be >= 1")
    need(e.max_new_tokens >= 1, "eval.max_new_tokens must be >= 1")
    need(e.limit >= 0, "eval.limit must be >= 0 (0: all)")
    need(not (e.sampling_weights == "fp8" and cfg.model.device == "cpu"),
         "eval.sampling_weights=fp8 needs a CUDA GPU (compute capability 8.9+): use int8 or merged on the CPU")
    if e.protocol == "paper":
        need(task.paper_max_new_tokens is not None, f"eval.protocol=paper is the original Visual-RFT evaluation, "
             f"which data.task={task.name} does not have: use eval.protocol=ours")
        need(e.ask == "all", "eval.ask is for eval.protocol=ours: under paper eval.exist_map picks each image's "
             "classes (remove eval.ask)")
        need(bool(e.exist_map) or not task.needs_annotations or not e.annotations,
             "eval.protocol=paper asks each image the classes of a class-existence map: set eval.exist_map=FILE "
             "(the original's coco_evaluation/ or lvis_evaluation/ exist_map_*.json), or use eval.protocol=ours")
    else:
        need(not e.exist_map, "eval.exist_map is read only under eval.protocol=paper: set eval.protocol=paper, or "
             "remove eval.exist_map")
    need(not e.exist_map or bool(e.annotations), "eval.exist_map needs eval.annotations (the COCO/LVIS file whose "
         "images it maps)")


def _check_warmup(cfg: Config, task: Task, need: Need) -> None:
    """warmup.*"""
    w = cfg.warmup
    need(w.steps >= 0, "warmup.steps must be >= 0")
    need(0 < w.learning_rate < FLOAT32_MAX, "warmup.learning_rate must be > 0 and < 3.4e38 (float32's range)")
    need(w.batch_size >= 1, "warmup.batch_size must be >= 1")


def _check_rewards(cfg: Config, task: Task, need: Need) -> None:
    """rewards.*: known names, finite weights, at least one non-zero; plugins imported here."""
    from qlora_rft.rewards import builtin_rewards, default_weights, plugin_rewards  # local: rewards import no config

    need(cfg.rewards.plugin_timeout >= 0, "rewards.plugin_timeout must be >= 0 (seconds; 0: no limit)")
    timeout = max(cfg.rewards.plugin_timeout, 0.0)
    known = {**builtin_rewards(), **plugin_rewards(cfg.rewards.plugins, timeout)}  # a bad plugin: a one-line error
    for name, weight in cfg.rewards.weights.items():
        need(name in known, f"rewards.weights names unknown reward {name!r}{suggest(name, known)}")
        need(finite_number(weight),
             f"rewards.weights.{name} must be a finite number, got {weight!r}")
    weights = cfg.rewards.weights or default_weights(cfg.data.task)
    need(any(w != 0 for w in weights.values()), "rewards.weights: at least one reward needs a non-zero weight"
         + ("" if default_weights(cfg.data.task) else f" (data.task={cfg.data.task} has no default rewards: name yours, built-in "
                                                "or from rewards.plugins)"))


def _check_model(cfg: Config, task: Task, need: Need) -> None:
    """model.* against the rest: the optimizer of full mode, flash-attention's package."""
    if cfg.model.mode == "full":
        need(cfg.train.optimizer != "paged_adamw_8bit", "train.optimizer=paged_adamw_8bit is for the adapters of qlora/lora "
             "mode: use train.optimizer=adamw (or auto) with model.mode=full")
    if cfg.model.attn_implementation == "flash_attention_2":
        import importlib.util

        need(importlib.util.find_spec("flash_attn") is not None or cfg.model.hub_kernels,
             "model.attn_implementation=flash_attention_2 needs flash-attn: `pip install -e .[flash]` "
             "on a CUDA machine, or use model.attn_implementation=sdpa (or model.hub_kernels=true to let "
             "transformers download a flash-attention kernel from the hub)")


def _strings(cfg: Config):
    """(section.key, text) of every string in the config, inside lists and mappings too."""
    def walk(key, value):
        if isinstance(value, str):
            yield key, value
        elif isinstance(value, (list, tuple)):
            for item in value:
                yield from walk(key, item)
        elif isinstance(value, dict):
            for name, item in value.items():
                yield from walk(key, name)
                yield from walk(key, item)

    for section, values in cfg.to_dict().items():
        for name, value in values.items():
            yield from walk(f"{section}.{name}", value)


def _max_pixels() -> int:
    """The largest image area a supported family's processor takes (data.max_pixels' bound)."""
    from qlora_rft.models import families

    return max(family.max_pixels for family in families())


def finite_number(value: Any) -> bool:
    """An int or float that is a finite float (not bool, NaN, +-inf, or an int past float's range)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]
