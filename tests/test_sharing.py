"""Sharing the prompt's image encoding across the group: same numbers, and the vision tower runs once per prompt."""

from __future__ import annotations

import copy

import torch

from qlora_rft.config import load_config
from qlora_rft.data import encode_prompt, load_split
from qlora_rft.model import load_policy, reference_mode
from qlora_rft.rollout import Sampling, completion_logprobs, sample_groups, share_vision
from qlora_rft.tasks import get_task


def _setup(tiny_overrides):
    cfg = load_config(None, tiny_overrides)
    policy = load_policy(cfg.model, cfg.lora)
    for name, p in policy.model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)  # adapters that matter
    task = get_task("classification")
    examples = load_split(cfg.data.train, "train", task).examples[:2]
    prompts = [encode_prompt(policy.processor, task, ex, cfg.data, policy.device) for ex in examples]
    return policy, prompts


def test_logprobs_and_greedy_samples_with_shared_vision_equal_those_without(tiny_overrides):
    policy, prompts = _setup(tiny_overrides)
    shared = [share_vision(policy.model, copy.copy(p)) for p in prompts]
    assert shared[0].vision is not None and prompts[0].vision is None
    ids = torch.randint(3, 300, (4, 6))
    mask = torch.ones(4, 6)
    for plain, fast in zip(prompts, shared):
        with torch.no_grad():
            assert torch.allclose(completion_logprobs(policy.model, plain, ids, mask, 1024),
                                  completion_logprobs(policy.model, fast, ids, mask, 1024), atol=1e-5)
        with reference_mode(policy.model):
            assert torch.allclose(completion_logprobs(policy.model, plain, ids, mask, 1024),
                                  completion_logprobs(policy.model, fast, ids, mask, 1024), atol=1e-5)
    greedy = Sampling(8, do_sample=False)
    for chunk in (2, 8):  # a group in two calls, and both prompts packed in one call
        a = sample_groups(policy.model, policy.processor, prompts, 4, chunk, greedy, policy.tokens)
        b = sample_groups(policy.model, policy.processor, shared, 4, chunk, greedy, policy.tokens)
        assert [r.texts for r in a] == [r.texts for r in b]


def test_gradients_through_shared_vision_equal_those_without(tiny_overrides):
    policy, prompts = _setup(tiny_overrides)
    ids, mask = torch.randint(3, 300, (2, 5)), torch.ones(2, 5)
    grads = []
    for prompt in (prompts[0], share_vision(policy.model, copy.copy(prompts[0]))):
        policy.model.zero_grad()
        completion_logprobs(policy.model, prompt, ids, mask, 1024).sum().backward()
        grads.append([p.grad.clone() for p in policy.model.parameters() if p.requires_grad])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-5)


def test_the_vision_tower_runs_once_per_prompt(tiny_overrides):
    policy, prompts = _setup(tiny_overrides)
    calls = []
    hook = policy.base.model.visual.register_forward_hook(lambda *a: calls.append(1))
    try:
        shared = [share_vision(policy.model, p) for p in prompts]
        rollouts = sample_groups(policy.model, policy.processor, shared, 4, 8, Sampling(6), policy.tokens)
        with torch.no_grad():
            for r in rollouts:
                completion_logprobs(policy.model, r.prompt, r.completion_ids, r.mask, 1024)
        with reference_mode(policy.model):
            for r in rollouts:
                completion_logprobs(policy.model, r.prompt, r.completion_ids, r.mask, 1024)
    finally:
        hook.remove()
    assert len(calls) == len(prompts)  # not G per prompt, and not again for the policy or reference passes


def test_generation_from_a_shared_prefill_equals_prefilling_every_completion(tiny_overrides):
    policy, prompts = _setup(tiny_overrides)
    shared = [share_vision(policy.model, copy.copy(p)) for p in prompts]
    greedy = Sampling(8, do_sample=False)
    for group in (prompts, shared):  # image pixels, or the shared image encoding
        for chunk in (2, 8):  # a group in two calls, and both prompts packed in one call
            plain = sample_groups(policy.model, policy.processor, group, 4, chunk, greedy, policy.tokens,
                                  share_prefill=False)
            fast = sample_groups(policy.model, policy.processor, group, 4, chunk, greedy, policy.tokens,
                                 share_prefill=True)
            for a, b in zip(plain, fast):
                assert torch.equal(a.completion_ids, b.completion_ids) and a.texts == b.texts


def test_a_shared_prefill_runs_the_prompt_once(tiny_overrides):
    policy, prompts = _setup(tiny_overrides)
    prompt = share_vision(policy.model, prompts[0])
    lengths = []
    hook = policy.base.model.language_model.register_forward_hook(
        lambda module, args, kwargs, out: lengths.append(kwargs["inputs_embeds"].shape), with_kwargs=True)
    try:
        sample_groups(policy.model, policy.processor, [prompt], 4, 2, Sampling(3, do_sample=False), policy.tokens)
    finally:
        hook.remove()
    prompt_rows = [shape[0] for shape in lengths if shape[1] > 1]  # calls that process prompt tokens
    assert prompt_rows[0] == 1  # the prompt, once
    assert all(shape[1] == 1 for shape in lengths[1:])  # then one token at a time (the last prompt token included)
