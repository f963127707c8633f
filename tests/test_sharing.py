"""Sharing the prompt across the group (its image encoding, its prefill) and sampling with merged weights: the
same numbers as without, and the shared parts run once."""

from __future__ import annotations

import copy

import torch

from conftest import sample
from qlora_rft.model import reference_mode
from qlora_rft.prompts import encode_prompt
from qlora_rft.rollout import completion_logprobs, share_vision
from qlora_rft.sampling import Settings
from qlora_rft.sampling.weights import merged_weights
from qlora_rft.tasks import get_task


def _setup(tiny_overrides):
    from conftest import policy_with_adapters, training_examples

    cfg, policy = policy_with_adapters(tiny_overrides)
    task = get_task("classification")
    examples = training_examples(cfg, policy, 2)
    prompts = [encode_prompt(policy.processor, task, ex, cfg.data, policy.device) for ex in examples]
    return policy, prompts


def _completions(policy, rows: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed completion ids, above the special and vision placeholder ids (0-6 in the tiny vocabulary), and an
    all-ones mask."""
    assert max(policy.tokens.vision) < 7
    ids = torch.randint(7, 300, (rows, length), generator=torch.Generator().manual_seed(rows * 100 + length))
    return ids, torch.ones(rows, length)


def test_logprobs_and_greedy_samples_with_shared_vision_equal_those_without(tiny_overrides):
    policy, prompts = _setup(tiny_overrides)
    shared = [share_vision(policy.model, copy.copy(p)) for p in prompts]
    assert shared[0].vision is not None and prompts[0].vision is None
    ids, mask = _completions(policy, 4, 6)
    for plain, fast in zip(prompts, shared):
        with torch.no_grad():
            assert torch.allclose(completion_logprobs(policy.model, plain, ids, mask, 1024),
                                  completion_logprobs(policy.model, fast, ids, mask, 1024), atol=1e-5)
        with reference_mode(policy.model):
            assert torch.allclose(completion_logprobs(policy.model, plain, ids, mask, 1024),
                                  completion_logprobs(policy.model, fast, ids, mask, 1024), atol=1e-5)
    greedy = Settings(8, do_sample=False)
    for chunk in (2, 8):  # a group in two calls, and both prompts packed in one call
        a = sample(policy, prompts, 4, chunk, greedy)
        b = sample(policy, shared, 4, chunk, greedy)
        assert [r.texts for r in a] == [r.texts for r in b]


def test_gradients_through_shared_vision_equal_those_without(tiny_overrides):
    policy, prompts = _setup(tiny_overrides)
    ids, mask = _completions(policy, 2, 5)
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
        rollouts = sample(policy, shared, 4, 8, Settings(6))
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
    greedy = Settings(8, do_sample=False)
    for group in (prompts, shared):  # image pixels, or the shared image encoding
        for chunk in (2, 8):  # a group in two calls, and both prompts packed in one call
            plain = sample(policy, group, 4, chunk, greedy, share_prefill=False)
            fast = sample(policy, group, 4, chunk, greedy, share_prefill=True)
            for a, b in zip(plain, fast):
                assert torch.equal(a.completion_ids, b.completion_ids) and a.texts == b.texts


def test_a_shared_prefill_runs_the_prompt_once(tiny_overrides):
    policy, prompts = _setup(tiny_overrides)
    prompt = share_vision(policy.model, prompts[0])
    lengths = []
    hook = policy.base.model.language_model.register_forward_hook(
        lambda module, args, kwargs, out: lengths.append(kwargs["inputs_embeds"].shape), with_kwargs=True)
    try:
        sample(policy, [prompt], 4, 2, Settings(3, do_sample=False))
    finally:
        hook.remove()
    prompt_rows = [shape[0] for shape in lengths if shape[1] > 1]  # calls that process prompt tokens
    assert prompt_rows[0] == 1  # the prompt, once
    assert all(shape[1] == 1 for shape in lengths[1:])  # then one token at a time (the last prompt token included)


def test_sampling_with_merged_weights_equals_the_4bit_model_with_adapters(tiny_overrides):
    policy, prompts = _setup(tiny_overrides)  # qlora mode: every adapted layer is a 4-bit base plus LoRA
    prompt = share_vision(policy.model, prompts[0])
    ids, mask = _completions(policy, 4, 6)
    linears = []
    with torch.no_grad():
        plain = completion_logprobs(policy.model, prompt, ids, mask, 1024)
        with merged_weights(policy.model):
            hook = torch.nn.modules.module.register_module_forward_hook(
                lambda module, args, out: linears.append(type(module).__module__))
            try:
                merged = completion_logprobs(policy.model, prompt, ids, mask, 1024)
            finally:
                hook.remove()
        again = completion_logprobs(policy.model, prompt, ids, mask, 1024)
    assert linears and not any(m.startswith("bitsandbytes") for m in linears)  # no 4-bit kernel ran while merged
    assert not torch.equal(plain, merged)  # a different computation (the adapters are not zero)...
    assert torch.allclose(plain, merged, atol=1e-4)  # ...with the same result
    assert torch.equal(plain, again)  # and everything is back as it was on exit

    greedy = Settings(8, do_sample=False)
    a = sample(policy, [prompt], 4, 4, greedy)[0]
    with merged_weights(policy.model):
        b = sample(policy, [prompt], 4, 4, greedy)[0]
    assert a.texts == b.texts


def test_merged_weights_follow_the_adapters_switch(tiny_overrides):
    policy, prompts = _setup(tiny_overrides)
    prompt = share_vision(policy.model, prompts[0])
    ids, mask = _completions(policy, 2, 5)
    with reference_mode(policy.model):
        reference = completion_logprobs(policy.model, prompt, ids, mask, 1024)
        with merged_weights(policy.model):  # merged while the adapters are off: the base alone
            merged = completion_logprobs(policy.model, prompt, ids, mask, 1024)
    assert torch.allclose(reference, merged, atol=1e-4)


def test_no_grad_logprobs_after_one_prompt_prefill_equal_the_full_passes(tiny_overrides):
    policy, prompts = _setup(tiny_overrides)
    ids, mask = _completions(policy, 4, 7)
    mask[1, 3:] = 0  # an early EOS: its padding is attended to by neither pass
    mask[2, 5:] = 0
    for prompt in (prompts[0], share_vision(policy.model, copy.copy(prompts[1]))):  # pixels, shared features
        for context in (torch.no_grad, lambda: reference_mode(policy.model)):  # old policy, reference
            with context():
                full = completion_logprobs(policy.model, prompt, ids, mask, 1024)
                shared = completion_logprobs(policy.model, prompt, ids, mask, 1024, share_prompt=True)
            assert torch.allclose(full * mask, shared * mask, atol=1e-5)
    with torch.no_grad():  # a one-token completion has only the prompt's last state to go on
        one = completion_logprobs(policy.model, prompts[0], ids[:, :1], mask[:, :1], 1024)
        assert torch.allclose(one, completion_logprobs(policy.model, prompts[0], ids[:, :1], mask[:, :1], 1024,
                                                       share_prompt=True), atol=1e-5)


def test_a_shared_prompt_pass_computes_the_prompt_once(tiny_overrides):
    policy, prompts = _setup(tiny_overrides)
    prompt = prompts[0]
    ids, mask = _completions(policy, 4, 6)
    shapes = []
    hook = policy.base.model.language_model.register_forward_hook(
        lambda module, args, kwargs, out: shapes.append(tuple(kwargs["inputs_embeds"].shape[:2])), with_kwargs=True)
    try:
        with reference_mode(policy.model):
            completion_logprobs(policy.model, prompt, ids, mask, 1024, share_prompt=True)
    finally:
        hook.remove()
    assert shapes == [(1, prompt.length), (4, 5)]  # the prompt once, then the completions alone
