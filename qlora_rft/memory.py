"""What the model and the device can hold, checked before any weights load: prompt + completion within the model's
context, a LoRA rank no wider than its layers, and a lower bound of what one step holds at once (KV caches, kept
layer inputs, a log-prob chunk, the adapters; weights and transients come on top) against the device's memory.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from qlora_rft.config import Config
from qlora_rft.errors import ConfigError


@dataclass(frozen=True)
class Shape:
    """The language model's sizes, from a model folder's config.json."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    context: int  # max_position_embeddings: tokens of prompt + completion at most

    @classmethod
    def of(cls, folder: Path) -> "Shape":
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
        text = config.get("text_config") or config
        hidden, heads = int(text["hidden_size"]), int(text["num_attention_heads"])
        return cls(hidden, int(text["intermediate_size"]), int(text["num_hidden_layers"]), heads,
                   int(text.get("num_key_value_heads") or heads), int(text.get("head_dim") or hidden // heads),
                   int(text.get("vocab_size") or config.get("vocab_size") or 0),
                   int(text.get("max_position_embeddings") or 0))

    def widths(self) -> dict[str, tuple[int, int]]:
        """(inputs, outputs) of each linear layer lora.target_modules can name."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {"q_proj": (self.hidden, q), "k_proj": (self.hidden, kv), "v_proj": (self.hidden, kv),
                "o_proj": (q, self.hidden), "gate_proj": (self.hidden, self.intermediate),
                "up_proj": (self.hidden, self.intermediate), "down_proj": (self.intermediate, self.hidden)}


@dataclass(frozen=True)
class Need:
    """Memory one phase of a step holds at once (a lower bound), and the settings it grows with."""

    what: str
    settings: str
    bytes: int


def device_memory(device: torch.device) -> int:
    """The device's memory in bytes: the GPU's, or the machine's RAM."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_training_fits(cfg: Config, folder: Path, device: torch.device) -> None:
    """Refuse training settings the model (its context, its layer widths) or the device cannot hold, naming what
    to change; the evaluation during training (train.eval_steps) included. GRPO's groups are counted; the
    supervised baseline's batches are not (one example per backward chunk)."""
    shape = Shape.of(folder)
    value = _value_bytes(cfg, device)
    g, prompt = cfg.grpo, cfg.data.max_prompt_length
    problems, needs = _rank(cfg, shape), []
    if cfg.train.method == "grpo":
        problems += _context(shape, prompt, g.max_completion_length, "grpo.max_completion_length")
        tokens = _within(shape, prompt + g.max_completion_length)  # one completion, at the longest prompt allowed
        sampled = g.generation_chunk or g.num_generations
        backward = g.backward_chunk or g.num_generations
        needs += [Need("the KV cache of one generate call", "grpo.num_generations / grpo.generation_chunk, "
                       "grpo.max_completion_length, data.max_prompt_length",
                       sampled * tokens * _kv_bytes(shape, value)),
                  Need("the layer inputs one backward keeps, and a log-prob chunk", "grpo.num_generations / "
                       "grpo.backward_chunk, grpo.max_completion_length, data.max_prompt_length",
                       backward * tokens * shape.layers * shape.hidden * value + _logprob_need(cfg, shape, backward))]
    if cfg.train.eval_steps:
        problems += _context(shape, prompt, cfg.eval.max_new_tokens, "eval.max_new_tokens")
        needs.append(_evaluation_need(cfg, shape, value, cfg.eval.max_new_tokens, prompt))
    _refuse(problems, needs, _lora_need(cfg, shape, value), device, cfg)


def check_evaluation_fits(cfg: Config, folder: Path, device: torch.device, max_new_tokens: int,
                          max_prompt_length: int | None) -> None:
    """Refuse evaluation settings the model or the device cannot hold (None: no prompt-length limit, so only the
    tokens generated are counted)."""
    shape = Shape.of(folder)
    prompt = max_prompt_length or 0
    problems = _context(shape, prompt, max_new_tokens, "eval.max_new_tokens")
    need = _evaluation_need(cfg, shape, _value_bytes(cfg, device), max_new_tokens, prompt)
    _refuse(problems, [need], 0, device, cfg)


def _within(shape: Shape, tokens: int) -> int:
    """Tokens of one sequence, at most the model's context (a longer setting is refused for that already)."""
    return min(tokens, shape.context) if shape.context else tokens


def _context(shape: Shape, prompt: int, completion: int, setting: str) -> list[str]:
    if not shape.context or prompt + completion <= shape.context:
        return []
    return [f"data.max_prompt_length={prompt} + {setting}={completion} tokens exceed the model's context of "
            f"{shape.context} (config.json's max_position_embeddings): lower them to {shape.context} in all"]


def _rank(cfg: Config, shape: Shape) -> list[str]:
    """A LoRA rank above the narrowest adapted layer's width adds parameters and nothing it can learn."""
    if cfg.model.mode == "full":
        return []
    widths = shape.widths()
    targets = [name for name in cfg.lora.target_modules if name in widths] or list(widths)
    narrowest = min(min(widths[name]) for name in targets)
    if cfg.lora.r <= narrowest:
        return []
    return [f"lora.r={cfg.lora.r} is wider than the narrowest adapted layer ({narrowest}): a rank above a layer's "
            f"width adds memory and nothing it can learn; set lora.r <= {narrowest}"]


def _kv_bytes(shape: Shape, value: int) -> int:
    """Keys and values of one token, every layer."""
    return 2 * shape.layers * shape.kv_heads * shape.head_dim * value


def _logprob_need(cfg: Config, shape: Shape, backward: int) -> int:
    """The fp32 logits of one log-prob chunk: grpo.logprob_chunk positions (at most those of a backward chunk)."""
    return min(cfg.grpo.logprob_chunk, backward * cfg.grpo.max_completion_length) * shape.vocab * 4


def _evaluation_need(cfg: Config, shape: Shape, value: int, max_new_tokens: int, prompt: int) -> Need:
    return Need("the KV cache of one evaluation batch", "eval.batch_size, eval.max_new_tokens, data.max_prompt_length",
                cfg.eval.batch_size * _within(shape, prompt + max_new_tokens) * _kv_bytes(shape, value))


def _lora_need(cfg: Config, shape: Shape, value: int) -> int:
    """The adapters' weights and gradients (lora.r x (inputs + outputs) per adapted layer; a rank wider than a
    layer, refused for that, counted at the layer's width)."""
    if cfg.model.mode == "full":
        return 0
    widths = shape.widths()
    return sum(min(cfg.lora.r, *widths[name]) * sum(widths[name]) for name in cfg.lora.target_modules
               if name in widths) * shape.layers * 2 * value


def _value_bytes(cfg: Config, device: torch.device) -> int:
    """Bytes of one activation value at the compute dtype (model.dtype; auto: bf16 on CUDA, fp32 on the CPU)."""
    dtype = cfg.model.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    return 4 if dtype == "float32" else 2


def _gib(size: int) -> str:
    """A size in GiB, or in MiB below a tenth of one."""
    return f"{size / 2**30:.3g} GiB" if size >= 2**30 / 10 else f"{size / 2**20:.3g} MiB"


def _refuse(problems: list[str], needs: list[Need], always: int, device: torch.device, cfg: Config) -> None:
    """Add the memory problem (the largest phase, plus what every phase holds) and raise when there is any."""
    largest = max(needs, key=lambda need: need.bytes, default=Need("", "", 0))
    total, available = always + largest.bytes, device_memory(device)
    if total > available:
        lora = f"{_gib(always)} of LoRA weights and gradients (lora.r={cfg.lora.r})" if always else ""
        parts = [f"{largest.what}: {_gib(largest.bytes)}" if largest.bytes else "", lora]
        settings = largest.settings if largest.bytes > always else "lora.r or lora.target_modules"
        problems.append(f"these settings need at least {_gib(total)} at once ({' plus '.join(p for p in parts if p)}) "
                        f"and the {device.type} has {_gib(available)}: lower {settings}")
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError("the model or the device cannot hold these settings:\n  - " + "\n  - ".join(problems))
