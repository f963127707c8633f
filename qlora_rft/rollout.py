"""A group's `Rollout` (what the sampler returns), and the log-probs (and entropies) of completion tokens under the
policy being trained (`CompletionScorer`, what accelerate prepares): from the last hidden states of completion
positions through the LM head in chunks, so the full [B, L, V] logits are never built.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qlora_rft import grpo
from qlora_rft.model import base_model
from qlora_rft.models import family_of
from qlora_rft.prompts import PromptInputs


@dataclass
class Rollout:
    """G sampled completions of one prompt."""

    prompt: PromptInputs
    completion_ids: torch.Tensor  # [G, T] (pad after the first EOS)
    mask: torch.Tensor  # [G, T] float: 1 up to and including the first EOS
    texts: list[str]  # decoded completions, special tokens removed
    finite: bool = True  # False: some next-token logits of the sampling were NaN or inf (sampling.FiniteLogits)
    sampler_logp: torch.Tensor | None = None  # [G, T] fp32: each token's log-prob under the sampling weights
    # (temperature applied, before top-k/top-p; 0 after the first EOS); None: not sampled (teacher-forced)

    @property
    def size(self) -> int:
        return self.completion_ids.shape[0]

    def chunk(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.completion_ids[start:stop], self.mask[start:stop]


def text_deltas(base, inputs: dict) -> torch.Tensor:
    """M-RoPE offsets of the text after each (left-padded) prompt row of `inputs`: the row's last position + 1
    minus its length, so that decoding or scoring after a prefill places the completion where a forward of prompt +
    completion does. transformers' own offsets (`rope_deltas`) continue from the largest position instead, which
    lies further on after a long clip (transformers 5.25 continues the text after a video from its spatial extent:
    huggingface/transformers#45381); for images the two are the same.  -> [rows, 1]"""
    positions, _ = base.model.get_rope_index(**inputs)  # [3, rows, width]
    return positions[0, :, -1:] + 1 - inputs["attention_mask"].sum(-1, keepdim=True)


@torch.no_grad()
def share_vision(model, prompt: PromptInputs) -> PromptInputs:
    """Run the (frozen) vision tower once for this prompt's images and videos; generation and every log-prob pass
    reuse the result (every level the family's language model takes, deepstack included) instead of running it
    again for each of the G completions and each pass."""
    base = base_model(model)
    family = family_of(base)
    if prompt.image_grid_thw is not None:
        prompt.vision = family.encode_images(base, prompt.pixel_values, prompt.image_grid_thw)
    if prompt.video_grid_thw is not None:
        prompt.video_vision = family.encode_videos(base, prompt.pixel_values_videos, prompt.video_grid_thw)
    return prompt


def completion_logprobs(
    model, prompt: PromptInputs, completion_ids: torch.Tensor, mask: torch.Tensor, logprob_chunk: int,
    temperature: float = 1.0, share_prompt: bool = False,
) -> torch.Tensor:
    """log pi(token) for each completion token, under the sampling temperature.  [B, T] -> [B, T] fp32.

    Gradients flow when called with grad enabled (the policy pass); wrap in `reference_mode` for the reference.
    share_prompt (no-grad passes only): the prompt runs once and the B completions continue from its KV cache,
    instead of the prompt being computed again in each of the B rows.
    """
    return completion_scores(model, prompt, completion_ids, mask, logprob_chunk, temperature, share_prompt).logp


def completion_scores(
    model, prompt: PromptInputs, completion_ids: torch.Tensor, mask: torch.Tensor, logprob_chunk: int,
    temperature: float = 1.0, share_prompt: bool = False, entropy: bool = False,
) -> grpo.TokenScores:
    """`completion_logprobs`, and with `entropy` the policy's entropy at each completion position (no grad)."""
    base = base_model(model)
    if share_prompt:
        return _scores_after_prefill(base, prompt, completion_ids, mask, logprob_chunk, temperature, entropy)
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
        **inputs,  # grids (and a video's time inputs), and pixels or the shared vision features
    ).last_hidden_state  # [B, P+T, H]
    P = prompt.length
    predicting = hidden[:, P - 1 : P + T - 1]  # [B, T, H]: the state before each completion token
    return grpo.token_scores(predicting, base.lm_head.weight, completion_ids, logprob_chunk, temperature, entropy)


@torch.no_grad()
def _scores_after_prefill(base, prompt: PromptInputs, completion_ids: torch.Tensor, mask: torch.Tensor,
                          logprob_chunk: int, temperature: float, entropy: bool) -> grpo.TokenScores:
    """`completion_scores` with the prompt computed once: P + B*T tokens through the model instead of B*(P+T)."""
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
            delta = text_deltas(base, prompt.repeated(1))  # M-RoPE: where the text after the prompt continues
            positions = (torch.arange(P, P + T - 1, device=completion_ids.device) + delta).view(1, -1, T - 1)
            attention = torch.cat([prompt.attention_mask.expand(B, -1), mask[:, :-1].to(prompt.attention_mask.dtype)],
                                  dim=1)  # [B, P + T - 1]
            rest = base.model(input_ids=completion_ids[:, :-1], attention_mask=attention,
                              position_ids=positions.expand(3, B, -1), past_key_values=cache,
                              use_cache=True).last_hidden_state  # [B, T-1, H]
            predicting = torch.cat([predicting, rest], dim=1)  # [B, T, H]
    finally:
        base.train(was_training)
    return grpo.token_scores(predicting, base.lm_head.weight, completion_ids, logprob_chunk, temperature, entropy)


class CompletionScorer(torch.nn.Module):
    """The policy as one module whose forward gives completion log-probs, and entropies when asked
    (`completion_scores`).

    This is what accelerate prepares: every log-prob pass then runs through the engine's own forward (DDP's
    gradient hooks, DeepSpeed's gathering of sharded weights), not around it. `policy` is the PeftModel, or the
    plain model in full mode.
    """

    def __init__(self, policy: torch.nn.Module):
        super().__init__()
        self.policy = policy

    def forward(self, prompt: PromptInputs, completion_ids: torch.Tensor, mask: torch.Tensor, logprob_chunk: int,
                temperature: float = 1.0, share_prompt: bool = False, entropy: bool = False) -> grpo.TokenScores:
        return completion_scores(self.policy, prompt, completion_ids, mask, logprob_chunk, temperature,
                                 share_prompt, entropy)

    @property
    def config(self):
        """The model's config (DeepSpeed helpers size their buffers from it)."""
        return self.policy.config

    def head_weight(self) -> torch.nn.Parameter:
        return base_model(self.policy).lm_head.weight
