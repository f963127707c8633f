"""The `generate` backend: transformers' generate with every setting explicit. Rows decoded several times continue
from one prefill of their prompt, its KV cache repeated; it does not report log-probs (the sampler scores the
completions under the same weights).
"""

from __future__ import annotations

import copy

import torch

from qlora_rft.model import SpecialTokens
from qlora_rft.sampling.backend import Decoded, FiniteLogits, Prefix, Settings, core, prefill


def generation_config(settings: Settings, tokens: SpecialTokens):
    """Every setting explicit. Vision placeholder tokens are suppressed: one in a completion would be taken for an
    image slot in the next forward ("image features and image tokens do not match")."""
    from transformers import GenerationConfig

    common = dict(max_new_tokens=settings.max_new_tokens, min_new_tokens=settings.min_new_tokens,
                  eos_token_id=tokens.eos, pad_token_id=tokens.pad, suppress_tokens=tokens.vision)
    if not settings.do_sample:
        return GenerationConfig(do_sample=False, repetition_penalty=settings.repetition_penalty, **common)
    return GenerationConfig(do_sample=True, temperature=settings.temperature, top_p=settings.top_p,
                            top_k=settings.top_k, **common)


class GenerateBackend:
    name = "generate"
    keeps_weights = False

    def __init__(self, reason: str = ""):
        self.reason = reason

    @torch.no_grad()
    def decode(self, model, batch: dict, repeat: int, settings: Settings, tokens: SpecialTokens,
               finite: FiniteLogits | None, generator: torch.Generator | None = None,
               prefix: Prefix | None = None) -> Decoded:
        """generate on the rows (`repeat` 1), or on each row `repeat` times after one prefill of the rows (a copy of
        `prefix` when given). Draws from the default generator (train.seed seeds it, checkpoints keep it);
        `generator` is not used."""
        width = batch["input_ids"].shape[1]
        if repeat > 1:
            prefix = copy.deepcopy(prefix) if prefix is not None else prefill(model, batch)
            batch = continue_from(model, batch, prefix, repeat)
        out = model.generate(**batch, generation_config=generation_config(settings, tokens),
                             logits_processor=[finite] if finite is not None else [])  # [rows, width + t]
        return Decoded(out[:, width:])

    def counters(self) -> dict:
        return {}


def continue_from(model, batch: dict, prefix, repeat: int) -> dict:
    """generate kwargs that continue from a prefill of the rows of `batch`, each row `repeat` times: the images
    already in the cache (only the last prompt token and the completion are computed)."""
    prefix.cache.batch_repeat_interleave(repeat)
    core(model).rope_deltas = prefix.rope_deltas.repeat_interleave(repeat, dim=0)
    text = {k: batch[k].repeat_interleave(repeat, dim=0) for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    return {**text, "past_key_values": prefix.cache}
