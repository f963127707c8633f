"""Sampling a group of G completions for one prompt, in chunks, and the log-probs of completion tokens.

Sampling settings are passed explicitly on every call (a checkpoint's generation_config never decides them).
Completions come from transformers' generate, or from the static-cache decoder (decode.py) continuing the same
shared prefill.
Log-probs come from the last hidden states of completion positions through the LM head in chunks: the full
[B, L, V] logits are never built.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from qlora_rft import grpo
from qlora_rft.data import PromptInputs, shared_features
from qlora_rft.models import family_of

if TYPE_CHECKING:
    from qlora_rft.decode import Decoder


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    do_sample: bool = True
    min_new_tokens: int = 0

    def generation_config(self, tokens: "SpecialTokens"):
        """Every setting explicit. Vision placeholder tokens are suppressed: one in a completion would be taken
        for an image slot in the next forward ("image features and image tokens do not match")."""
        from transformers import GenerationConfig

        common = dict(
            max_new_tokens=self.max_new_tokens,
            min_new_tokens=self.min_new_tokens,
            eos_token_id=tokens.eos,
            pad_token_id=tokens.pad,
            suppress_tokens=tokens.vision,
        )
        if not self.do_sample:
            return GenerationConfig(do_sample=False, **common)
        return GenerationConfig(
            do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, **common
        )


@dataclass(frozen=True)
class SpecialTokens:
    eos: list[int]  # any of these ends a completion
    pad: int
    vision: list[int]  # image/video placeholders and vision start/end: never sampled

    @classmethod
    def of(cls, model, tokenizer) -> "SpecialTokens":
        config = model.config
        eos = model.generation_config.eos_token_id
        eos_ids = sorted({*([eos] if isinstance(eos, int) else (eos or [])), tokenizer.eos_token_id} - {None})
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
        vision = [getattr(config, name, None) for name in family_of(model).suppressed_tokens]
        return cls(eos=eos_ids, pad=pad, vision=[v for v in vision if v is not None])


@dataclass
class Rollout:
    """G sampled completions of one prompt."""

    prompt: PromptInputs
    completion_ids: torch.Tensor  # [G, T] (pad after the first EOS)
    mask: torch.Tensor  # [G, T] float: 1 up to and including the first EOS
    texts: list[str]  # decoded completions, special tokens removed
    finite: bool = True  # False: some next-token logits of the sampling were NaN or inf (see FiniteLogits)

    @property
    def size(self) -> int:
        return self.completion_ids.shape[0]

    def chunk(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.completion_ids[start:stop], self.mask[start:stop]


@torch.no_grad()
def sample_groups(
    model, processor, prompts: list[PromptInputs], group_size: int, chunk: int, sampling: Sampling,
    tokens: SpecialTokens, share_prefill: bool = True, decoder: "Decoder | None" = None,
    generator: torch.Generator | None = None,
) -> list[Rollout]:
    """G completions for each prompt, `chunk` completions per generate call.

    chunk < G: each group is sampled in G / chunk calls (peak memory follows the chunk);
    chunk = k * G: k prompts share a call (left-padded), which is how a small model keeps the device busy.
    share_prefill: the prompt is run through the model once and its KV cache repeated for the completions,
    instead of being prefilled again for each of them.
    decoder: decode on its static cache (decode.Decoder) instead of HF generate, drawing from `generator`
    (None: the device's default generator, which train.seed seeds and checkpoints keep).
    """
    if decoder is not None:
        return _sample_static(model, processor, prompts, group_size, chunk, sampling, tokens, share_prefill,
                              decoder, generator)
    config = sampling.generation_config(tokens)
    finite = FiniteLogits(tokens.eos[0])
    chunk = chunk or group_size
    was_training = model.training
    model.eval()
    pieces: list[list[torch.Tensor]] = [[] for _ in prompts]  # per prompt: [n, t] completion pieces
    try:
        if chunk <= group_size:
            for i, prompt in enumerate(prompts):
                prefix = prefill(model, prompt.repeated(1)) if share_prefill else None
                for _ in range(group_size // chunk):
                    kwargs = prompt.repeated(chunk)
                    if prefix is not None:
                        kwargs = _from_prefix(model, kwargs, copy.deepcopy(prefix), chunk)
                    out = model.generate(**kwargs, generation_config=config, logits_processor=[finite])  # [chunk, P+t]
                    pieces[i].append(out[:, prompt.length :])
        else:
            per_call = chunk // group_size
            for first in range(0, len(prompts), per_call):
                group = prompts[first : first + per_call]
                batch, width = left_pad(group, tokens.pad, group_size)
                if share_prefill:
                    batch = _from_prefix(model, batch, prefill(model, left_pad(group, tokens.pad, 1)[0]), group_size)
                out = model.generate(**batch, generation_config=config, logits_processor=[finite])  # [k*G, width+t]
                for j in range(out.shape[0] // group_size):
                    pieces[first + j].append(out[j * group_size : (j + 1) * group_size, width:])
    finally:
        model.train(was_training)
    return [_rollout(prompt, p, processor, tokens, finite.ok) for prompt, p in zip(prompts, pieces)]


class FiniteLogits:
    """A logits processor for generate: a row of next-token logits holding NaN or +inf (-inf marks suppressed
    tokens) ends its completion with EOS instead of failing the sampler, and `ok` turns False."""

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


@torch.no_grad()
def _sample_static(model, processor, prompts: list[PromptInputs], group_size: int, chunk: int, sampling: Sampling,
                   tokens: SpecialTokens, share_prefill: bool, decoder: "Decoder",
                   generator: torch.Generator | None) -> list[Rollout]:
    """`sample_groups` on the decoder's static cache: the same calls, each continuing from a prefill."""
    chunk = chunk or group_size
    was_training = model.training
    model.eval()
    pieces: list[list[torch.Tensor]] = [[] for _ in prompts]
    finite = FiniteLogits(tokens.eos[0])

    def decode(batch: dict, repeat: int) -> torch.Tensor:  # batch rows, each `repeat` times -> [rows, t]
        return decoder.generate(model, prefill(model, batch), batch["attention_mask"], batch["input_ids"][:, -1],
                                repeat, sampling, tokens, generator, finite)

    try:
        if chunk <= group_size:
            for i, prompt in enumerate(prompts):
                for _ in range(group_size // chunk):
                    pieces[i].append(decode(prompt.repeated(1), chunk) if share_prefill
                                     else decode(prompt.repeated(chunk), 1))
        else:
            per_call = chunk // group_size
            for first in range(0, len(prompts), per_call):
                group = prompts[first : first + per_call]
                out = (decode(left_pad(group, tokens.pad, 1)[0], group_size) if share_prefill
                       else decode(left_pad(group, tokens.pad, group_size)[0], 1))  # [k * G, t]
                for j in range(out.shape[0] // group_size):
                    pieces[first + j].append(out[j * group_size : (j + 1) * group_size])
    finally:
        model.train(was_training)
    return [_rollout(prompt, p, processor, tokens, finite.ok) for prompt, p in zip(prompts, pieces)]


@dataclass
class Prefix:
    """A prompt batch run once: its KV cache and the M-RoPE offsets, one row per prompt."""

    cache: object  # transformers Cache
    rope_deltas: torch.Tensor  # [rows, 1]


def prefill(model, kwargs: dict) -> Prefix:
    """Every prompt token but the last through the model, once (the last one starts generation)."""
    prefix = {k: v[:, :-1] if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v
              for k, v in kwargs.items()}
    cache = model(**prefix, use_cache=True, logits_to_keep=1).past_key_values
    return Prefix(cache, _core(model).rope_deltas)


def _from_prefix(model, kwargs: dict, prefix: Prefix, repeat: int) -> dict:
    """Generate kwargs that continue from a prefill: each row repeated `repeat` times, the image already in the
    cache (only the last prompt token and the completion are computed)."""
    prefix.cache.batch_repeat_interleave(repeat)
    _core(model).rope_deltas = prefix.rope_deltas.repeat_interleave(repeat, dim=0)
    kwargs = {k: v for k, v in kwargs.items() if k not in ("pixel_values", "mm_encoder_outputs")}
    return {**kwargs, "past_key_values": prefix.cache}


def base_model(model):
    """The ...ForConditionalGeneration inside a peft wrapper (adapters still live in its layers), or the model."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _core(model):
    """The ...Model inside (where M-RoPE offsets live between calls)."""
    return base_model(model).model


def sample_group(model, processor, prompt: PromptInputs, group_size: int, chunk: int, sampling: Sampling,
                 tokens: SpecialTokens, share_prefill: bool = True) -> Rollout:
    """G completions of one prompt (see `sample_groups`)."""
    return sample_groups(model, processor, [prompt], group_size, min(chunk or group_size, group_size), sampling,
                         tokens, share_prefill)[0]


@torch.no_grad()
def share_vision(model, prompt: PromptInputs) -> PromptInputs:
    """Run the (frozen) vision tower once for this prompt; generation and every log-prob pass reuse the result
    (every level the family's language model takes, deepstack included) instead of running it again for each of
    the G completions and each pass."""
    base = base_model(model)
    prompt.vision = family_of(base).encode_images(base, prompt.pixel_values, prompt.image_grid_thw)
    return prompt


def left_pad(prompts: list[PromptInputs], pad_id: int, repeat: int) -> tuple[dict, int]:
    """Model kwargs for several prompts, each repeated `repeat` times, left-padded to one width."""
    width = max(p.length for p in prompts)
    rows = {"input_ids": [], "attention_mask": [], "mm_token_type_ids": []}
    for p in prompts:
        gap = width - p.length
        rows["input_ids"].append(torch.nn.functional.pad(p.input_ids, (gap, 0), value=pad_id))
        rows["attention_mask"].append(torch.nn.functional.pad(p.attention_mask, (gap, 0), value=0))
        rows["mm_token_type_ids"].append(torch.nn.functional.pad(p.mm_token_type_ids, (gap, 0), value=0))
    batch = {k: torch.cat(v).repeat_interleave(repeat, dim=0) for k, v in rows.items()}  # [k * repeat, width]
    batch["image_grid_thw"] = torch.cat([p.image_grid_thw.repeat(repeat, 1) for p in prompts])
    if all(p.vision is not None for p in prompts):
        batch["mm_encoder_outputs"] = shared_features(tuple(f for p in prompts for f in p.vision * repeat))
    else:
        batch["pixel_values"] = torch.cat([p.pixel_values.repeat(repeat, 1) for p in prompts])
    return batch, width


def _rollout(prompt: PromptInputs, pieces: list[torch.Tensor], processor, tokens: SpecialTokens,
             finite: bool = True) -> Rollout:
    width = max(p.shape[1] for p in pieces)
    ids = torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1]), value=tokens.pad) for p in pieces])
    mask = grpo.completion_mask(ids, tokens.eos)  # [G, T]
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, tokens.pad))
    texts = processor.batch_decode(ids, skip_special_tokens=True)
    return Rollout(prompt=prompt, completion_ids=ids, mask=mask, texts=texts, finite=finite)


def completion_logprobs(
    model, prompt: PromptInputs, completion_ids: torch.Tensor, mask: torch.Tensor, logprob_chunk: int,
    temperature: float = 1.0, share_prompt: bool = False,
) -> torch.Tensor:
    """log pi(token) for each completion token, under the sampling temperature.  [B, T] -> [B, T] fp32.

    Gradients flow when called with grad enabled (the policy pass); wrap in `reference_mode` for the reference.
    share_prompt (no-grad passes only): the prompt runs once and the B completions continue from its KV cache,
    instead of the prompt being computed again in each of the B rows.
    """
    base = base_model(model)
    if share_prompt:
        return _logprobs_after_prefill(base, prompt, completion_ids, mask, logprob_chunk, temperature)
    B, T = completion_ids.shape
    inputs = prompt.repeated(B)
    input_ids = torch.cat([inputs.pop("input_ids"), completion_ids], dim=1)  # [B, P+T]
    attention_mask = torch.cat([inputs.pop("attention_mask"), mask.to(prompt.attention_mask.dtype)], dim=1)
    mm_types = torch.cat([inputs.pop("mm_token_type_ids"), torch.zeros_like(completion_ids)], dim=1)
    hidden = base.model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        mm_token_type_ids=mm_types.to(prompt.mm_token_type_ids.dtype),
        use_cache=False,
        **inputs,  # image_grid_thw, and pixel_values or the shared vision features
    ).last_hidden_state  # [B, P+T, H]
    P = prompt.length
    predicting = hidden[:, P - 1 : P + T - 1]  # [B, T, H]: the state before each completion token
    return grpo.token_logprobs(predicting, base.lm_head.weight, completion_ids, logprob_chunk, temperature)


@torch.no_grad()
def _logprobs_after_prefill(base, prompt: PromptInputs, completion_ids: torch.Tensor, mask: torch.Tensor,
                            logprob_chunk: int, temperature: float) -> torch.Tensor:
    """`completion_logprobs` with the prompt computed once: P + B*T tokens through the model instead of B*(P+T)."""
    B, T = completion_ids.shape
    P = prompt.length
    was_training = base.training
    base.eval()  # a checkpointed layer in training mode would drop the cache
    try:
        first = base.model(**prompt.repeated(1), use_cache=True)  # the prompt; its last state predicts token 1
        cache = first.past_key_values
        cache.batch_repeat_interleave(B)
        predicting = first.last_hidden_state[:, -1:].expand(B, -1, -1)  # [B, 1, H]
        if T > 1:  # the completion's own tokens but the last, after the prompt in the cache
            delta = base.model.rope_deltas  # M-RoPE: text after the image continues from the image's positions
            positions = (torch.arange(P, P + T - 1, device=completion_ids.device) + delta).view(1, -1, T - 1)
            attention = torch.cat([prompt.attention_mask.expand(B, -1), mask[:, :-1].to(prompt.attention_mask.dtype)],
                                  dim=1)  # [B, P + T - 1]
            rest = base.model(input_ids=completion_ids[:, :-1], attention_mask=attention,
                              position_ids=positions.expand(3, B, -1), past_key_values=cache,
                              use_cache=True).last_hidden_state  # [B, T-1, H]
            predicting = torch.cat([predicting, rest], dim=1)  # [B, T, H]
    finally:
        base.train(was_training)
    return grpo.token_logprobs(predicting, base.lm_head.weight, completion_ids, logprob_chunk, temperature)


class CompletionScorer(torch.nn.Module):
    """The policy as one module whose forward gives completion log-probs (`completion_logprobs`).

    This is what accelerate prepares: every log-prob pass then runs through the engine's own forward (DDP's
    gradient hooks, DeepSpeed's gathering of sharded weights), not around it. `policy` is the PeftModel, or the
    plain model in full mode.
    """

    def __init__(self, policy: torch.nn.Module):
        super().__init__()
        self.policy = policy

    def forward(self, prompt: PromptInputs, completion_ids: torch.Tensor, mask: torch.Tensor, logprob_chunk: int,
                temperature: float = 1.0, share_prompt: bool = False) -> torch.Tensor:
        return completion_logprobs(self.policy, prompt, completion_ids, mask, logprob_chunk, temperature,
                                   share_prompt)

    @property
    def config(self):
        """The model's config (DeepSpeed helpers size their buffers from it)."""
        return self.policy.config

    def head_weight(self) -> torch.nn.Parameter:
        return base_model(self.policy).lm_head.weight
