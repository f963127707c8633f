"""The Sampler: one object that decodes for training (G completions per prompt, with each token's log-prob under the
sampling weights) and for evaluation (greedy answers to a batch of different prompts), on the weights `synced`
makes ready once per step (gathered whole under ZeRO-3, then the sampling copy) and through one backend.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from qlora_rft import grpo
from qlora_rft.model import Policy
from qlora_rft.prompts import PromptInputs, visual_kwargs
from qlora_rft.rollout import Rollout, completion_logprobs, share_vision
from qlora_rft.sampling.backend import Backend, Decoded, FiniteLogits, Settings, evaluating, prefill
from qlora_rft.sampling.weights import Correction, SamplingWeights, decode_weight_bytes, merged_weights

SCORE_CHUNK = 1024  # completion positions per LM-head chunk when the sampler scores a backend's completions


class Sampler:
    """Sampling weights + a backend, for one model.

    `synced()` makes the weights ready (a copy per step for merged/int8/fp8) and must be around every `sample`,
    `greedy` and `share_vision`. Draws come from torch's default generator unless a generator is passed: train.seed
    seeds it and checkpoints keep it, so a resumed run samples what an uninterrupted one would. The backend's
    caches and counters are rebuilt on resume (they never change a token).
    """

    def __init__(self, policy: Policy, weights: SamplingWeights, backend: Backend, correction: Correction | None = None,
                 gather: Callable[[], contextlib.AbstractContextManager] | None = None):
        self.processor, self.tokens, self.device = policy.processor, policy.tokens, policy.device
        self.weights, self.backend = weights, backend
        self.correction = correction or Correction("none", "not training")
        self._policy_model = policy.model
        self._gather = gather  # () -> context yielding the model whole (ZeRO-3: gathered); None: policy.model
        self._kept = {} if backend.keeps_weights else None  # the copy's tensors, refilled in place each step
        self._model = None  # the model while synced
        self.weight_bytes: int | None = None  # what one decode step reads, measured at the first sync

    @contextlib.contextmanager
    def synced(self):
        """The current weights ready to sample: gathered whole under ZeRO-3, the sampling copy made (dropped on
        exit)."""
        whole = self._gather() if self._gather is not None else contextlib.nullcontext(self._policy_model)
        with whole as model, merged_weights(model, self.weights.merges, self.weights.mode, self._kept):
            if self.weight_bytes is None:
                self.weight_bytes = decode_weight_bytes(model)
            self._model = model
            try:
                yield self
            finally:
                self._model = None

    @property
    def model(self):
        if self._model is None:
            raise RuntimeError("the sampler is used outside `with sampler.synced():`")
        return self._model

    def share_vision(self, prompt: PromptInputs) -> PromptInputs:
        """Encode the prompt's images once (a frozen vision tower): sampling and every log-prob pass reuse them."""
        return share_vision(self.model, prompt)

    @torch.no_grad()
    def sample(self, prompts: list[PromptInputs], group_size: int, settings: Settings,
               generator: torch.Generator | None = None) -> list[Rollout]:
        """G completions of each prompt, settings.chunk per call: chunk < G samples a group in G / chunk calls
        (memory follows the chunk), chunk = k * G packs k prompts into one left-padded call. With sampling each
        rollout carries the log-prob of every token under the sampling weights."""
        model = self.model
        finite = FiniteLogits(self.tokens.eos[0])
        with evaluating(model):
            pieces = self._decode(model, prompts, group_size, settings, finite, generator)
            rollouts = [self._rollout(prompt, parts, finite.ok) for prompt, parts in zip(prompts, pieces)]
            if settings.do_sample:
                for rollout in rollouts:
                    if rollout.sampler_logp is None:  # a backend that does not report them: one scoring pass
                        rollout.sampler_logp = completion_logprobs(
                            model, rollout.prompt, rollout.completion_ids, rollout.mask, SCORE_CHUNK,
                            settings.temperature, share_prompt=True) * rollout.mask
        return rollouts

    def _decode(self, model, prompts: list[PromptInputs], group_size: int, settings: Settings, finite: FiniteLogits,
                generator: torch.Generator | None) -> list[list[Decoded]]:
        """Each prompt's decoded pieces: one backend call per chunk of a group, or per pack of groups."""
        pieces: list[list[Decoded]] = [[] for _ in prompts]
        prefix = None  # (prompt index, its prefill): a group decoded in several calls prefills its prompt once
        for first, group, repeat in self._calls(prompts, group_size, settings.chunk):
            batch, times = self._rows(group, repeat, settings.share_prefill)
            several = times > 1 and repeat < group_size
            if several and (prefix is None or prefix[0] != first):
                prefix = (first, prefill(model, batch))
            out = self.backend.decode(model, batch, times, settings, self.tokens, finite, generator,
                                      prefix[1] if several else None)
            for j in range(len(group)):  # each prompt's rows are together
                pieces[first + j].append(out.rows(j * repeat, (j + 1) * repeat))
        return pieces

    @torch.no_grad()
    def greedy(self, batch: dict, settings: Settings) -> list[str]:
        """Greedy answers to a left-padded batch of different prompts (processor output), special tokens removed."""
        with evaluating(self.model) as model:
            out = self.backend.decode(model, batch, 1, settings, self.tokens, None, None)
        return self.processor.batch_decode(out.ids, skip_special_tokens=True)

    def counters(self) -> dict:
        """The backend's numbers for metrics.jsonl (decode_builds, decode_compiles for the static decoder)."""
        return self.backend.counters()

    def describe(self) -> dict:
        """Which weights, backend and correction, and why (train_summary.json's `sampling`)."""
        found = {"weights": self.weights.mode, "weights_reason": self.weights.reason, "decode": self.backend.name,
                 "decode_reason": self.backend.reason, "importance_correction": self.correction.mode,
                 "importance_correction_reason": self.correction.reason}
        if self.weight_bytes is not None:
            found["decode_weight_bytes"] = self.weight_bytes
        return found

    def summary(self) -> str:
        """One line for the console."""
        return (f"sampling: {self.weights.mode} weights ({self.weights.reason}); decoding: {self.backend.name} "
                f"({self.backend.reason})")

    @staticmethod
    def _calls(prompts: list[PromptInputs], group_size: int, chunk: int):
        """(index of the first prompt, the prompts, completions of each) per backend call."""
        chunk = chunk or group_size
        if chunk <= group_size:
            for i, prompt in enumerate(prompts):
                for _ in range(group_size // chunk):
                    yield i, [prompt], chunk
        else:
            per_call = chunk // group_size
            for first in range(0, len(prompts), per_call):
                yield first, prompts[first : first + per_call], group_size

    def _rows(self, prompts: list[PromptInputs], repeat: int, share_prefill: bool) -> tuple[dict, int]:
        """The batch a backend decodes and how often each row: one row per prompt decoded `repeat` times (one
        prefill shared), or each prompt's row repeated and decoded once."""
        if share_prefill:
            return left_pad(prompts, self.tokens.pad, 1), repeat
        return left_pad(prompts, self.tokens.pad, repeat), 1

    def _rollout(self, prompt: PromptInputs, pieces: list[Decoded], finite: bool) -> Rollout:
        width = max(p.ids.shape[1] for p in pieces)
        pad = self.tokens.pad
        ids = torch.cat([torch.nn.functional.pad(p.ids, (0, width - p.ids.shape[1]), value=pad) for p in pieces])
        mask = grpo.completion_mask(ids, self.tokens.eos)  # [G, T]
        ids = torch.where(mask.bool(), ids, torch.full_like(ids, pad))
        logp = None
        if all(p.logp is not None for p in pieces):
            logp = torch.cat([torch.nn.functional.pad(p.logp, (0, width - p.logp.shape[1])) for p in pieces]) * mask
        texts = self.processor.batch_decode(ids, skip_special_tokens=True)
        return Rollout(prompt=prompt, completion_ids=ids, mask=mask, texts=texts, finite=finite, sampler_logp=logp)


def left_pad(prompts: list[PromptInputs], pad_id: int, repeat: int) -> dict:
    """Model kwargs for several prompts, each repeated `repeat` times, left-padded to one width."""
    width = max(p.length for p in prompts)
    rows = {"input_ids": [], "attention_mask": [], "mm_token_type_ids": []}
    for p in prompts:
        gap = width - p.length
        rows["input_ids"].append(torch.nn.functional.pad(p.input_ids, (gap, 0), value=pad_id))
        rows["attention_mask"].append(torch.nn.functional.pad(p.attention_mask, (gap, 0), value=0))
        rows["mm_token_type_ids"].append(torch.nn.functional.pad(p.mm_token_type_ids, (gap, 0), value=0))
    batch = {k: torch.cat(v).repeat_interleave(repeat, dim=0) for k, v in rows.items()}  # [k * repeat, width]
    return batch | visual_kwargs([p for p in prompts for _ in range(repeat)])  # images and videos, row by row
