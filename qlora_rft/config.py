"""Run configuration: one typed dataclass per section, loaded from YAML plus `section.key=value` overrides.

Every field is documented once, in its `help`, next to its default (`qlora-rft config` prints them all).
`config_checks.validate` checks each field and the rules between fields before any model loads, and says what to
change.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from qlora_rft.config_checks import finite_number, suggest, validate
from qlora_rft.errors import ConfigError


def _f(default: Any, help: str, choices: tuple | Callable[[], tuple] | None = None,
       aliases: dict | None = None) -> Any:
    """A dataclass field with its documentation (and allowed values, or a function returning them) attached;
    `aliases` maps the values an older version took (e.g. True/False) to their current names."""
    meta = {"help": help, "choices": choices, "aliases": aliases or {}}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


CISPO_CAP = 5.0  # loss_type=cispo's default cap of the importance weight (ScaleRL's recommendation)
LANGUAGE_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class ModelConfig:
    name_or_path: str = _f(
        "tiny:cpu-small",
        "A from_pretrained folder of a supported model (Qwen2-VL, Qwen2.5-VL, Qwen3-VL: the family is read from "
        "config.json's model_type), or `tiny:PRESET` for a locally built random one (presets: tiny, cpu-small, "
        "qwen2.5-vl-tiny, qwen3-vl-tiny at CPU sizes; qwen2-vl-2b/7b, qwen2.5-vl-3b/7b, qwen3-vl-2b/4b/8b real "
        "shapes).",
    )
    mode: str = _f(
        "qlora",
        "qlora: 4-bit NF4 base + LoRA; lora: full-precision base + LoRA; full: every weight trained (the paper's "
        "multi-GPU setup, the reference a frozen copy of the base; lora.* unused except lora.train_vision).",
        ("qlora", "lora", "full"),
    )
    dtype: str = _f(
        "auto",
        "Compute dtype. auto: bfloat16 on CUDA, float32 on the CPU.",
        ("auto", "bfloat16", "float16", "float32"),
    )
    attn_implementation: str = _f(
        "sdpa",
        "Attention kernel; flash_attention_2 needs the optional `flash` extra.",
        ("sdpa", "eager", "flash_attention_2"),
    )
    quantize_skip_modules: list = _f(
        ["model.visual", "lm_head"],
        "Modules kept in full precision in qlora mode, as full names or prefixes (default: the frozen vision "
        "tower and the LM head).",
    )
    gradient_checkpointing: bool = _f(True, "Recompute activations in the backward (peft-compatible).")
    device: str = _f("auto", "auto: CUDA when available, else the CPU.", ("auto", "cpu", "cuda"))
    hub_kernels: bool = _f(
        False,
        "Let transformers replace layers with kernels from the model hub (its `kernels` integration, on by default "
        "in transformers 5.25): at every model load it DOWNLOADS AND RUNS code from the hub, and needs the network. "
        "Off: every load uses transformers' own code, and no load reaches the network.",
    )


@dataclass
class LoraSettings:
    r: int = _f(16, "LoRA rank.")
    alpha: int = _f(32, "LoRA scaling numerator (scale = alpha / r).")
    dropout: float = _f(0.05, "Dropout on the LoRA input.")
    target_modules: list = _f(LANGUAGE_LINEAR, "Linear layers of the language model that get adapters.")
    train_vision: bool = _f(
        False,
        "Also train the vision tower (frozen otherwise): adapters on its linear layers, or in model.mode=full all "
        "its weights, as the paper does.",
    )


def _task_names() -> tuple[str, ...]:
    from qlora_rft.tasks import TASKS  # read when checked: a task registered later is a choice too

    return tuple(TASKS)


@dataclass
class DataConfig:
    task: str = _f(
        "classification",
        "Task family: sets the prompt template, the answer parser, the default rewards and the metric (the tasks "
        "registered in qlora_rft.tasks.TASKS). generic: any rows with a prompt (problem; image or images) and the "
        "columns your rewards read, trained and evaluated by the rewards that rewards.weights names.",
        _task_names,
    )
    train: str = _f(
        "synthetic:shapes",
        "Training data: a parquet file or folder, a JSON-lines file (or a folder of SPLIT.jsonl; image paths "
        "relative to it), a local folder `datasets.load_dataset` reads, a hub dataset named hub:ORG/NAME (only "
        "such a name is ever fetched), a LISA JSON (ours, or the "
        "original Visual-RFT's box annotations), LISA's ReasonSeg folder (train/, val/, test/: each image beside "
        "its JSON), or `synthetic:NAME` (generated on demand into the cache).",
    )
    train_split: str = _f("train", "Split of `train` to train on (for ReasonSeg: the folder).")
    eval: str = _f("", "Held-out data, same forms as `train`; empty: same source as `train`.")
    eval_split: str = _f("test", "Split of `eval` to evaluate on.")
    image_root: str = _f("", "Folder that relative image paths of a LISA-style JSON are under; empty: the JSON's.")
    min_pixels: int = _f(3136, "Smallest image area after resizing (qwen-vl-utils rule, sides multiples of the "
                         "family's image token side: 28 for Qwen2/2.5-VL, 32 for Qwen3-VL), in pixels.")
    max_pixels: int = _f(401408, "Largest image area after resizing; 401408 = 512 visual tokens (at most 16777216, "
                         "the largest a supported processor takes).")
    max_prompt_length: int = _f(1024, "Prompts longer than this many tokens are refused (never cut).")
    video_fps: float = _f(
        2.0,
        "Frames sampled per second of a clip, by qwen-vl-utils' rule: at least 4, at most data.video_max_frames "
        "and the clip's own, an even count, spread from the first frame to the last; chosen when the data loads, "
        "the same in training and evaluation. A `video` given as a list of frame images is taken as shot at this "
        "rate.",
    )
    video_max_frames: int = _f(32, "Most frames sampled from one clip (an even number is kept: two frames make "
                               "one temporal patch of the vision tower).")
    video_max_pixels: int = _f(
        401408,
        "Pixel budget of all the sampled frames of a clip (qwen-vl-utils' total_pixels): each frame gets at most "
        "budget / frames x 2 pixels, within 1.05 x data.min_pixels and data.max_pixels; 401408 = about 512 video "
        "tokens a clip at 28-pixel tokens.",
    )
    on_bad_row: str = _f(
        "skip",
        "A row whose image or video does not decode or whose solution does not parse: skip it (counted) or stop.",
        ("skip", "error"),
    )


@dataclass
class RewardConfig:
    weights: dict = _f(
        {},
        "Reward functions by name and their weights, summed into the reward; empty: the task's defaults. Built-in "
        "names, or those of rewards.plugins functions.",
    )
    plugins: list = _f(
        [],
        "Python files of your own rewards: each public module-level function `fn(completions, **columns) -> "
        "list[float]` (completions: the completions' text; columns: every column of the row, one value per "
        "completion) is a reward by its name. Loaded when the config is; kept as absolute paths.",
    )
    plugin_sha256: dict = _f(
        {},
        "Set when the config is loaded: each rewards.plugins file's sha256, so a run's config.yaml records the version "
        "it ran with; a value given (a run's config.yaml) must match the file.",
    )
    plugin_timeout: float = _f(
        60.0,
        "Seconds a rewards.plugins file's import, or one call of one of its functions (one row's completions), may "
        "take; past it the run stops naming the function and the row. 0 (or over 1e9): no limit.",
    )


@dataclass
class GRPOConfig:
    num_generations: int = _f(8, "G: completions sampled per prompt; the advantage is taken over them.")
    generation_chunk: int = _f(
        0,
        "Completions generated at once: a divisor of G (a group in several calls: less memory), or a multiple "
        "of G dividing G * train.prompts_per_step (several prompts per call: faster small models); 0: G.",
    )
    backward_chunk: int = _f(0, "Completions per forward/backward (must divide G); 0: all G at once.")
    max_completion_length: int = _f(256, "Tokens sampled per completion at most.")
    min_completion_length: int = _f(
        0, "EOS is suppressed until this many tokens (benchmarks set it to max_completion_length: fixed lengths)."
    )
    temperature: float = _f(1.0, "Sampling temperature (set explicitly; a checkpoint's own is ignored).")
    top_p: float = _f(1.0, "Nucleus sampling mass (1.0: off).")
    top_k: int = _f(0, "Top-k sampling (0: off; the original Visual-RFT sampled with transformers' default, 50).")
    beta: float = _f(0.04, "KL coefficient to the reference (adapters off); 0 skips the reference pass.")
    loss_type: str = _f(
        "grpo",
        "The loss, as TRL's GRPOTrainer defines it. grpo: PPO-clipped term, mean over each completion's tokens, "
        "then over completions (the paper's); bnpo: the same term, mean over each group's tokens, then over groups; "
        "dr_grpo: summed over tokens / (completions x max_completion_length) (Dr. GRPO); dapo: summed over tokens / "
        "the step's tokens, all processes' (DAPO); cispo: -min(ratio, epsilon_high) * A * logp, the capped weight "
        "detached, normalised as dapo (MiniMax-M1); sapo: -sigmoid(tau * (ratio - 1)) * 4 / tau * A, a soft gate "
        "instead of the clip, normalised as grpo (SAPO).",
        ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo"),
    )
    epsilon: float = _f(0.2, "PPO clip range of the probability ratio (acts when num_iterations > 1): it is kept "
                        "above 1 - epsilon, and below 1 + epsilon unless grpo.epsilon_high says otherwise.")
    epsilon_high: float = _f(
        0.0,
        "Upper clip range (DAPO's clip-higher, 0.28 in its paper): the ratio is kept below 1 + epsilon_high; "
        "0: grpo.epsilon. With loss_type=cispo the cap of the importance weight itself, >= 1 (0: 5.0, ScaleRL's).",
    )
    importance_sampling_level: str = _f(
        "token",
        "token: one probability ratio per token; sequence: one per completion, the exp of its mean log-ratio "
        "(GSPO, meant for loss_type=grpo: the token-summed types weigh each completion by its length).",
        ("token", "sequence"),
    )
    sapo_temperature_pos: float = _f(1.0, "loss_type=sapo: the gate's temperature for a positive advantage.")
    sapo_temperature_neg: float = _f(1.05, "loss_type=sapo: the gate's temperature for the other advantages.")
    num_iterations: int = _f(1, "Optimizer updates per batch of rollouts (mu); 1 is the paper's setting.")
    scale_rewards: str = _f(
        "group",
        "What the centred reward is divided by: group: its group's std (the paper's); batch: the std of every "
        "reward of the step, all processes' (PPO Lite); none: nothing (Dr. GRPO). true/false mean group/none.",
        ("group", "batch", "none"),
        aliases={True: "group", False: "none"},
    )
    advantage_eps: float = _f(1e-4, "Added to the std before dividing.")
    mask_truncated_completions: bool = _f(
        False,
        "Leave completions that hit max_completion_length without an EOS out of the loss (DAPO's overlong "
        "filtering); their rewards still count in the advantages.",
    )
    dynamic_sampling: bool = _f(
        False,
        "DAPO's dynamic sampling: a group whose rewards are all equal (no advantage) is replaced by the group of a "
        "fresh prompt, at most grpo.max_extra_groups per step and process (metrics.jsonl: extra_groups).",
    )
    max_extra_groups: int = _f(
        8, "grpo.dynamic_sampling: fresh prompts sampled (G completions each) per step and process at most."
    )
    skip_uniform_groups: bool = _f(
        True,
        "Skip the backward of a group whose advantages are all 0 when beta = 0 (no gradient). Without a launcher "
        "only: under DDP or DeepSpeed every process runs every backward, to stay in step with the others.",
    )
    logprob_chunk: int = _f(1024, "Completion positions per LM-head chunk when computing log-probs.")
    share_prefill: bool = _f(
        True,
        "Run each prompt through the model once and continue the group's completions from its KV cache: when "
        "sampling, and in the no-grad log-prob passes (reference, old policy).",
    )
    sampling_weights: str = _f(
        "auto",
        "What sampling runs on. adapters: the base (4-bit in qlora mode) plus the LoRA adapters, as trained; "
        "merged: each adapted layer dequantized with its LoRA delta merged in, once per step (one matmul per layer "
        "and token instead of a 4-bit kernel plus two adapter matmuls, for a full-precision copy of those weights "
        "while sampling); int8 / fp8: that merged copy stored per output channel in int8 / fp8 (weight-only, half "
        "the copy's memory; fp8 needs a CUDA GPU of compute capability 8.9+); auto: merged on the CPU; on CUDA "
        "merged when its copy fits the free GPU memory leaving a quarter of the device's memory spare, else "
        "adapters. The log and train_summary.json say which ran and why.",
        ("auto", "adapters", "merged", "int8", "fp8"),
    )
    decode: str = _f(
        "auto",
        "How rollouts are decoded. generate: transformers' generate (dynamic KV cache); static: this project's "
        "decoder (a static KV cache sized prompt + max_completion_length, sampling on the device; on CUDA with "
        "merged/int8/fp8 weights its one-token step is compiled once per run with CUDA graphs, a copy of the "
        "sampling weights then kept between steps); auto: static on the CPU (tested: the same tokens as generate, "
        "a little faster), generate on CUDA (the compiled decoder is not yet measured on a GPU).",
        ("auto", "generate", "static"),
    )

    importance_correction: str = _f(
        "auto",
        "Correction for sampling on weights other than those trained (a merged, int8 or fp8 copy: a slightly "
        "different policy), as TRL's vLLM importance sampling: each token's policy term times "
        "r = pi_policy / pi_sampler. tis: min(r, grpo.importance_cap); mis: r, or 0 (the token left out) where r > "
        "grpo.importance_cap; sequence_tis, sequence_mis: the same with one r per completion (the product of its "
        "tokens' ratios; TRL's default is sequence_mis, its sequence_mask); none: no weight; auto: tis when "
        "grpo.sampling_weights resolves to a copy, none for adapters. metrics.jsonl logs sampling/kl and "
        "sampling/ratio_max (per token) whatever this says.",
        ("auto", "none", "tis", "mis", "sequence_tis", "sequence_mis"),
    )
    importance_cap: float = _f(3.0, "The cap of grpo.importance_correction's ratio (TRL's "
                               "vllm_importance_sampling_clip_max default).")

    @property
    def clip_high(self) -> float:
        """The upper clip range (or cispo's cap): grpo.epsilon_high; when it is 0, grpo.epsilon (cispo: 5.0)."""
        return self.epsilon_high or (CISPO_CAP if self.loss_type == "cispo" else self.epsilon)


@dataclass
class WarmupConfig:
    steps: int = _f(
        0,
        "Supervised steps on the training solutions before GRPO (full fine-tune of a tiny base, cached); "
        "0: none. Used by the demo so that a random tiny base writes the answer format.",
    )
    learning_rate: float = _f(3e-3, "Warm-up learning rate.")
    batch_size: int = _f(16, "Warm-up examples per step.")
    data: str = _f("", "Data the warm-up learns from (same forms as data.train); empty: data.train.")


@dataclass
class EvalConfig:
    adapter: str = _f("", "A peft adapter folder to evaluate on top of the base; empty: the base alone.")
    output_dir: str = _f("runs/eval", "Where predictions.jsonl, metrics.json and eval_info.json are written.")
    label: str = _f("", "Name of this evaluation in reports; empty: 'adapter' with an adapter, else 'base'.")
    batch_size: int = _f(16, "Prompts per generate call (left-padded, greedy).")
    max_new_tokens: int = _f(256, "Tokens generated per answer at most.")
    decode: str = _f(
        "auto",
        "How answers are decoded (greedy), as grpo.decode: generate, static, or auto (static on the CPU, generate "
        "on CUDA). Both apply eval.protocol=paper's repetition penalty.",
        ("auto", "generate", "static"),
    )
    sampling_weights: str = _f(
        "auto",
        "What answers are decoded on, as grpo.sampling_weights: adapters, merged, int8, fp8 or auto (merged on the "
        "CPU; on CUDA merged when the copy fits). A base evaluated without eval.adapter decodes on its own weights.",
        ("auto", "adapters", "merged", "int8", "fp8"),
    )
    limit: int = _f(0, "Evaluate at most this many prompts (0: all).")
    annotations: str = _f(
        "",
        "Detection: a COCO- or LVIS-format JSON; the evaluation set is its images x the evaluated classes. "
        "Empty: prompts come from data.eval like the other tasks.",
    )
    images: str = _f(
        "",
        "Detection: the folder the annotation file's image file_names are relative to; for LVIS v1 (images with a "
        "coco_url, no file_name) the folder holding COCO's train2017/ and val2017/ (or the images themselves). "
        "Empty: the annotation file's folder.",
    )
    classes: str = _f(
        "all",
        "Detection classes evaluated: a named set (coco_fewshot8, coco_ov15, lvis_fewshot6, lvis_ov13), 'all' "
        "the annotation file's categories, or comma-separated names.",
    )
    protocol: str = _f(
        "ours",
        "ours: greedy, eval.max_new_tokens, the data.* image bounds and prompt-length limit, our prompts and parsers, "
        "detection asking per eval.ask. paper: the original Visual-RFT evaluation (the paper's tables): detection asks "
        "each image only its classes in eval.exist_map, with the released training data's prompt; max_new_tokens "
        "1024 (detection, classification) or 128 (grounding); images within the processor's own pixel bounds and "
        "no prompt-length limit; greedy with the model folder's repetition_penalty; grounding asks the original's "
        "prompt (with its system prompt), the first instruction of each image only, and reads the first "
        "(x1,y1),(x2,y2) anywhere in the completion.",
        ("ours", "paper"),
    )
    ask: str = _f(
        "all",
        "Detection under eval.protocol=ours: which evaluated classes each image is asked about: all (every one; "
        "the honest default, false positives count) or present (only those in its ground truth).",
        ("all", "present"),
    )
    exist_map: str = _f(
        "",
        "Detection under eval.protocol=paper (required there): the original's class-existence map "
        "{\"<image id>\": [\"class name\", ...]} (its released "
        "coco_evaluation/exist_map_coco_Qwen2_vl_2B_baseline.json, lvis_evaluation/exist_map_lvis_Qwen2_vl_7B_baseline"
        ".json, ...); each image is asked its listed classes that eval.classes evaluates.",
    )


@dataclass
class TrainConfig:
    method: str = _f(
        "grpo",
        "grpo: Visual-RFT (GRPO with the rewards); sft: the supervised baseline on the same data's solutions, "
        "same base, adapters and schedule (what `qlora-rft sft` runs).",
        ("grpo", "sft"),
    )
    output_dir: str = _f("runs/train", "Where metrics.jsonl, checkpoint-STEP/ and adapter/ are written.")
    max_steps: int = _f(
        200,
        "Training length in optimizer steps; 0 when train.epochs sets it instead (exactly one of the two is set).",
    )
    epochs: int = _f(
        0,
        "Training length in passes over the training prompts (rows left after bad rows are skipped), as the "
        "original Visual-RFT trains: ceil(epochs x rows / prompts per step over all processes) steps, the last one "
        "filled from the next pass's start. 0: train.max_steps sets the length. Every row comes once per pass, in "
        "a fresh seeded order; metrics.jsonl's `epoch` is the passes done.",
    )
    prompts_per_step: int = _f(
        1,
        "Prompts (groups) per optimizer step and process: gradient accumulation over prompts (sft: examples per "
        "step). Under a launch of N processes a step sees N times as many.",
    )
    learning_rate: float = _f(1e-5, "Peak learning rate of the adapters.")
    lr_scheduler: str = _f("linear", "Decay after warm-up.", ("linear", "cosine", "constant"))
    warmup_ratio: float = _f(0.05, "Fraction of the training steps spent warming the learning rate up from 0.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0: off).")
    optimizer: str = _f(
        "auto",
        "auto: paged 8-bit AdamW on CUDA in qlora/lora mode, AdamW otherwise (on the CPU, and in full mode, "
        "where DeepSpeed shards it).",
        ("auto", "adamw", "paged_adamw_8bit"),
    )
    save_steps: int = _f(50, "Write checkpoint-STEP/ every this many steps (0: only the final adapter).")
    save_total_limit: int = _f(2, "Keep the newest this many checkpoints (0: keep all).")
    logging_steps: int = _f(1, "Write a metrics.jsonl line every this many steps.")
    eval_steps: int = _f(
        0,
        "Every this many steps and at the end, evaluate the current adapters as `qlora-rft eval` does (greedy, "
        "eval.limit prompts of data.eval): metrics into that step's metrics.jsonl line as eval/<metric>, "
        "predictions and metrics.json under evals/step-STEP/. 0: off.",
    )
    report_to: list = _f(
        ["none"],
        "Trackers that also get every metrics.jsonl value (a scalar under the same name), the config (as "
        "hyperparameters) and the completion samples: none, tensorboard (events in tensorboard/), wandb (runs in "
        "wandb/; WANDB_MODE=offline needs no account); several allowed. Each needs its extra: pip install "
        "'qlora-rft[tensorboard]' or '[wandb]'.",
    )
    log_completions: int = _f(
        0,
        "GRPO: every this many steps, the first prompt's completions with their rewards and advantages go to "
        "completions.jsonl and, as text, to the trackers. 0: off.",
    )
    seed: int = _f(0, "Seed of data order, sampling and adapter initialisation (0 to 2**32 - 1).")


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "lora": LoraSettings,
    "data": DataConfig,
    "rewards": RewardConfig,
    "grpo": GRPOConfig,
    "warmup": WarmupConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
}


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataConfig = field(default_factory=DataConfig)
    rewards: RewardConfig = field(default_factory=RewardConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- loading


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML file (or start from the defaults), apply `section.key=value` overrides, validate."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found: pass the path of a YAML file (see configs/)")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"config file {path} is not UTF-8 text: pass a YAML file (see configs/)") from None
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
        raw = parse_yaml(text, str(path)) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must hold a mapping of sections (model:, grpo:, train: ...)")
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. train.max_steps=10)")
        section, name = key.split(".", 1)
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"section {section!r} must be a mapping")
        raw[section][name] = parse_yaml(value, f"override {item!r}") if value else ""
    cfg = from_dict(raw)
    record_plugins(cfg.rewards)
    validate(cfg)
    return cfg


def record_plugins(rewards: RewardConfig) -> None:
    """rewards.plugins as absolute paths and rewards.plugin_sha256 as their files' hashes; a hash already recorded
    for a path must still match (a run's config.yaml names the plugin version it ran with)."""
    from qlora_rft.rewards import file_sha256  # local: rewards import no config

    rewards.plugins = [str(Path(p).expanduser().absolute()) for p in rewards.plugins]
    found = {}
    for path in rewards.plugins:
        found[path] = file_sha256(path)
        recorded = rewards.plugin_sha256.get(path)
        if recorded is not None and recorded != found[path]:
            raise ConfigError(f"rewards.plugins: {path} has changed since rewards.plugin_sha256 recorded it "
                              f"({recorded[:12]}... -> {found[path][:12]}...): restore that version, or drop "
                              "rewards.plugin_sha256 to use this one")
    rewards.plugin_sha256 = found


MAX_YAML_NODES = 10_000  # a config has a few hundred; more only comes from nested aliases ("billion laughs")


def parse_yaml(text: str, what: str) -> Any:
    """`yaml.safe_load` of `text`, refusing a document whose aliases expand past MAX_YAML_NODES nodes (or into
    themselves); errors are one-line ConfigErrors naming `what` (the file or the override)."""
    loader = None
    try:
        loader = yaml.SafeLoader(text)  # reading starts here: a control character fails at once
        node = loader.get_single_node()  # the node graph: an alias is the anchored node itself, not a copy
        if node is not None and _expanded_size(node, {}) > MAX_YAML_NODES:
            raise ConfigError(f"{what} expands through its aliases (*name) to more than {MAX_YAML_NODES} values, or "
                              "into itself: write the values out, or use fewer nested anchors")
        return None if node is None else loader.construct_document(node)
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} is not valid YAML: {_yaml_problem(e)}") from None
    except RecursionError:
        raise ConfigError(f"{what} is nested too deeply to be a config") from None
    finally:
        if loader is not None:
            loader.dispose()


def _expanded_size(node: yaml.Node, sizes: dict) -> int:
    """Nodes of the document once every alias is expanded, counted once per distinct node (memoised in `sizes`);
    capped just past MAX_YAML_NODES, which a node that contains itself reaches at once."""
    if id(node) in sizes:
        return sizes[id(node)]
    sizes[id(node)] = MAX_YAML_NODES + 1  # while its children are counted: meeting it again is a cycle
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [child for pair in node.value for child in pair]
    else:
        children = []
    sizes[id(node)] = min(MAX_YAML_NODES + 1, 1 + sum(_expanded_size(child, sizes) for child in children))
    return sizes[id(node)]


def _yaml_problem(e: yaml.YAMLError) -> str:
    """PyYAML's error on one line: what is wrong and where."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None)
    if problem is None:  # a ReaderError (a control character): its first line says which
        return str(e).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


# Keys an older version took, and what replaced them.
RENAMED = {
    "grpo.loss_aggregation": "use grpo.loss_type (loss_aggregation=sequence is loss_type=grpo, token is bnpo)",
}


def from_dict(raw: dict) -> Config:
    sections = {}
    for section, values in raw.items():
        if not isinstance(section, str):
            raise ConfigError(f"config section {section!r} is not a name: known are {', '.join(SECTIONS)}")
        if section not in SECTIONS:
            raise ConfigError(f"unknown config section {section!r}{suggest(section, SECTIONS)}")
        if not isinstance(values, dict):
            raise ConfigError(f"section {section!r} must be a mapping of key: value")
        cls = SECTIONS[section]
        known = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {}
        for name, value in values.items():
            if not isinstance(name, str):
                raise ConfigError(f"key {name!r} of section {section!r} is not a name: known are {', '.join(known)}")
            if f"{section}.{name}" in RENAMED:
                raise ConfigError(f"{section}.{name} is gone: {RENAMED[f'{section}.{name}']}")
            if name not in known:
                raise ConfigError(f"unknown key {section}.{name}{suggest(name, known)}")
            kwargs[name] = _coerce(f"{section}.{name}", value, known[name])
        sections[section] = cls(**kwargs)
    return Config(**sections)


def _coerce(key: str, value: Any, f: dataclasses.Field) -> Any:
    kind = {"str": str, "int": int, "float": float, "bool": bool, "list": list, "dict": dict}[f.type]
    aliases = f.metadata.get("aliases") or {}
    if isinstance(value, bool) and value in aliases:
        value = aliases[value]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value) if finite_number(value) else math.inf if value > 0 else -math.inf
    if kind is float and isinstance(value, str):  # YAML 1.1 reads 1e-05 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if kind is list and isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if not ok:
        raise ConfigError(f"{key} must be a {kind.__name__}, got {value!r}")
    if kind is float and not math.isfinite(value):  # YAML's .inf and .nan, an override's inf, nan or 1e400
        raise ConfigError(f"{key} must be a finite number, got {value!r}")
    choices = _choices(f)
    if choices and value not in choices:
        moved = MOVED_VALUES.get((key, value))
        hint = f" ({key}={value} is now {moved})" if moved else ""
        raise ConfigError(f"{key} must be one of {', '.join(choices)}; got {value!r}{hint}")
    return value


# Values a field no longer takes, and the setting that replaced each (named in the error).
MOVED_VALUES = {
    ("eval.protocol", "all_classes"): "eval.ask=all",
    ("eval.protocol", "present_classes"): "eval.ask=present",
}


# --------------------------------------------------------------------------- validation


def _choices(f: dataclasses.Field) -> tuple | None:
    choices = f.metadata.get("choices")
    return choices() if callable(choices) else choices


def describe() -> str:
    """Every field with its default and documentation, as a YAML-like reference."""
    lines = []
    for section, cls in SECTIONS.items():
        lines.append(f"{section}:")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            choices = _choices(f)
            extra = f" [{' | '.join(choices)}]" if choices else ""
            lines.append(f"  {f.name}: {default!r}  # {f.metadata['help']}{extra}")
    return "\n".join(lines)


RUN_CONFIG_HEADER = "# qlora-rft: the resolved config of the run in this folder (loadable as a config)\n"


def dump(cfg: Config, path: Path) -> None:
    """A run's resolved config, marked as such by its first line (RUN_CONFIG_HEADER), written whole: a link in its
    place is replaced, never followed."""
    from qlora_rft.files import atomic_file

    with atomic_file(path) as tmp:
        tmp.write_text(RUN_CONFIG_HEADER + yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")

