"""What a sampler backend is (`Backend`: left-padded prompt rows, each decoded `repeat` times, into ids and, when it
can, each drawn token's log-prob), and what the backends (generate.py, static.py) share: the explicit `Settings`,
the guard against logits that are not finite, and the prefill a decode continues from.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Protocol

import torch

from qlora_rft.model import SpecialTokens, base_model
from qlora_rft.rollout import text_deltas


@dataclass(frozen=True)
class Settings:
    """How completions are drawn: the rule (always passed explicitly: a checkpoint's generation_config never decides
    it) and, for training's groups, how calls are batched."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    do_sample: bool = True  # False: greedy (evaluation)
    min_new_tokens: int = 0
    repetition_penalty: float = 1.0  # greedy evaluation under eval.protocol=paper (the model folder's)
    chunk: int = 0  # grpo.generation_chunk: completions per call (0: G)
    share_prefill: bool = True  # grpo.share_prefill: one prefill per prompt, its cache repeated

    @classmethod
    def for_training(cls, g) -> "Settings":
        """The grpo config section's sampling rule and batching."""
        return cls(g.max_completion_length, g.temperature, g.top_p, g.top_k, min_new_tokens=g.min_completion_length,
                   chunk=g.generation_chunk, share_prefill=g.share_prefill)


@dataclass
class Decoded:
    """What a backend returns for rows of prompts: the completion ids and the log-prob of each drawn token under the
    sampler's own weights (temperature applied, before top-k/top-p: the trainer's definition), None when the
    backend does not report them (the sampler then scores the completions itself)."""

    ids: torch.Tensor  # [rows, t] (pad after a row's EOS)
    logp: torch.Tensor | None = None  # [rows, t] fp32

    def rows(self, start: int, stop: int) -> "Decoded":
        return Decoded(self.ids[start:stop], self.logp[start:stop] if self.logp is not None else None)


class Backend(Protocol):
    name: str  # what the log and train_summary.json call it
    reason: str  # why it was chosen
    keeps_weights: bool  # it needs the sampling copy in the same tensors every step (CUDA graphs)

    def decode(self, model, batch: dict, repeat: int, settings: Settings, tokens: SpecialTokens,
               finite: "FiniteLogits | None", generator: torch.Generator | None,
               prefix: "Prefix | None" = None) -> Decoded:
        """`batch`: model kwargs of k left-padded prompt rows; each row is decoded `repeat` times. -> k * repeat
        rows, each prompt's together. `prefix`: the rows already prefilled (`prefill`, when a group takes several
        calls), to continue from and leave as it is; a backend may ignore it."""

    def counters(self) -> dict:
        """Numbers for metrics.jsonl (shapes built, graphs compiled); {} when there is nothing to count."""


class FiniteLogits:
    """A logits processor: a row of next-token logits holding NaN or +inf (-inf marks suppressed tokens) ends its
    completion with EOS instead of failing the sampler, and `ok` turns False."""

    def __init__(self, eos: int):
        self.eos = eos
        self.seen: torch.Tensor | None = None  # any bad row so far; a tensor, so no device sync per token

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        bad = (scores.isnan() | scores.isposinf()).any(dim=-1, keepdim=True)  # [B, 1]
        self.seen = bad.any() if self.seen is None else self.seen | bad.any()
        ended = torch.full_like(scores, -torch.inf)  # [B, V]
        ended[:, self.eos] = 0.0
        return torch.where(bad, ended, scores)

    @property
    def ok(self) -> bool:
        return self.seen is None or not bool(self.seen)


@dataclass
class Prefix:
    """A prompt batch run once: its KV cache and the M-RoPE offsets, one row per prompt."""

    cache: object  # transformers Cache
    rope_deltas: torch.Tensor  # [rows, 1]


def prefill(model, batch: dict) -> Prefix:
    """Every prompt token but the last through the model, once (the last one starts decoding)."""
    prefix = {k: v[:, :-1] if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v
              for k, v in batch.items()}
    cache = model(**prefix, use_cache=True, logits_to_keep=1).past_key_values
    return Prefix(cache, text_deltas(base_model(model), prefix))


def core(model):
    """The ...Model inside (where M-RoPE offsets live between calls)."""
    return base_model(model).model


@contextlib.contextmanager
def evaluating(model):
    """The model in eval mode for the duration (dropout off, checkpointing idle), then back to its mode."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
