"""The static-cache decoder: its sampling rule by hand and against transformers' own logits processors, its tokens
against HF generate (greedy) and against a cache-free reference loop (sampled, seeded), and its step built once."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from conftest import sample
from qlora_rft.prompts import encode_prompt
from qlora_rft.rollout import completion_logprobs, share_vision
from qlora_rft.sampling import Settings, left_pad
from qlora_rft.sampling.static import StaticBackend, banned_ids, draw, filter_logits, penalize
from qlora_rft.sampling.weights import merged_weights
from qlora_rft.tasks import get_task

INF = math.inf
NONE = torch.tensor([False] * 4)


# ----------------------------------------------------------------------------- the rule, by hand


def test_top_k_keeps_the_k_best_and_their_ties():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [1.0, 2.0, 2.0, 0.0]])
    assert filter_logits(logits, NONE, top_k=2).tolist() == [[-INF, 3.0, 2.0, -INF], [-INF, 2.0, 2.0, -INF]]
    assert filter_logits(logits, NONE, top_k=1).tolist()[1] == [-INF, 2.0, 2.0, -INF]  # a tie with the best stays


def test_top_p_keeps_the_smallest_set_whose_mass_passes_p():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = lambda p: torch.isfinite(filter_logits(logits, NONE, top_p=p))[0].tolist()  # noqa: E731
    assert kept(0.8) == [True, True, False, False]  # 0.5 + 0.3 reaches 0.8
    assert kept(0.81) == [True, True, True, False]  # past it: one more
    assert kept(0.01) == [True, False, False, False]  # the best one always stays


def test_temperature_divides_and_banned_ids_never_come():
    logits = torch.tensor([[2.0, 4.0, 6.0, 8.0]])
    banned = torch.tensor([False, False, False, True])
    assert filter_logits(logits, banned, temperature=2.0).tolist() == [[1.0, 2.0, 3.0, -INF]]
    assert draw(filter_logits(logits, banned, do_sample=False), None).tolist() == [2]  # greedy: best allowed
    assert filter_logits(logits, banned, temperature=2.0, do_sample=False).tolist() == [[2.0, 4.0, 6.0, -INF]]


def test_eos_is_banned_only_before_the_minimum_length():
    never, early = banned_ids(6, suppress=[4, 5], eos=[1], device="cpu")
    assert never.tolist() == [False, False, False, False, True, True]
    assert early.tolist() == [False, True, False, False, True, True]


def test_the_exponential_race_samples_the_softmax():
    probs = torch.tensor([0.2, 0.5, 0.3, 0.0])
    scores = probs.log().expand(20000, -1)
    noise = torch.empty(20000, 4).exponential_(generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(draw(scores, noise), minlength=4) / 20000
    assert torch.allclose(counts, probs, atol=0.015) and counts[3] == 0


def test_the_rule_equals_transformers_processors_on_random_logits():
    gen = torch.Generator().manual_seed(0)
    vision, eos = [3, 7], [1, 2]
    for temperature, top_k, top_p in ((1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.9), (0.8, 12, 0.5)):
        logits = torch.randn(6, 40, generator=gen) * 3
        logits[:, 10] = logits[:, 11]  # a tie
        never, early = banned_ids(40, vision, eos, "cpu")
        for generated, banned in ((0, early), (4, never)):  # before and after min_new_tokens = 4
            ours = filter_logits(logits, banned, temperature, top_k, top_p)
            theirs = _hf_processors(3, 4, eos, vision, temperature, top_k, top_p)(
                torch.zeros(6, 3 + generated, dtype=torch.long), logits)
            assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
            assert torch.allclose(ours[torch.isfinite(ours)], theirs[torch.isfinite(theirs)])


def _hf_processors(prompt_length, min_new, eos, vision, temperature, top_k, top_p) -> LogitsProcessorList:
    """transformers' processors for this rule, in generate's order."""
    procs = [MinNewTokensLengthLogitsProcessor(prompt_length, min_new, eos), SuppressTokensLogitsProcessor(vision)]
    if temperature != 1.0:
        procs.append(TemperatureLogitsWarper(temperature))
    if top_k:
        procs.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        procs.append(TopPLogitsWarper(top_p))
    return LogitsProcessorList(procs)


# ----------------------------------------------------------------------------- on the tiny model


@pytest.fixture(scope="module")
def setup(tmp_path_factory, private_cache):
    """A tiny QLoRA policy with non-zero adapters; two prompts of different lengths (different image sizes, so
    left padding and different M-RoPE offsets); the LM head's EOS row made likely, so that rows finish early."""
    from conftest import TINY_RUN, policy_with_adapters, training_examples

    cfg, policy = policy_with_adapters([*TINY_RUN, f"train.output_dir={tmp_path_factory.mktemp('run')}"], seed=0)
    task = get_task("classification")
    examples = training_examples(cfg, policy, 2)
    bigger = replace(cfg.data, min_pixels=7056, max_pixels=7056)
    prompts = [encode_prompt(policy.processor, task, examples[0], cfg.data, policy.device),
               encode_prompt(policy.processor, task, examples[1], bigger, policy.device)]
    assert prompts[0].length != prompts[1].length
    first = sample(policy, prompts[:1], 2, 2, Settings(1, do_sample=False))[0].completion_ids[0, 0]
    head = policy.base.lm_head.weight
    with torch.no_grad():
        head[policy.tokens.eos[0]] = 1.5 * head[first]  # EOS wins wherever that token would
    return policy, prompts


@pytest.mark.parametrize("penalty", [1.0, 1.5])  # 1.5: eval.protocol=paper's repetition penalty, strong
def test_greedy_tokens_equal_hf_generate(setup, penalty):
    policy, prompts = setup
    decoder = StaticBackend(bucket=16)
    # with the penalty, no early EOS: 10 tokens a row give it seen tokens to act on (its arithmetic is checked
    # against transformers' processor below)
    greedy = Settings(10, do_sample=False, min_new_tokens=2 if penalty == 1.0 else 10, repetition_penalty=penalty)
    for group in (prompts, [share_vision(policy.model, p) for p in prompts]):  # pixels, shared image features
        for chunk, share in ((2, True), (8, True), (8, False), (4, False)):  # in two calls; packed (left-padded)
            hf = sample(policy, group, 4, chunk, greedy, share)
            ours = sample(policy, group, 4, chunk, greedy, share, backend=decoder)
            for a, b in zip(hf, ours):
                assert torch.equal(a.completion_ids, b.completion_ids) and a.texts == b.texts
    assert decoder.builds == 3 and decoder.compiles == 0  # one per batch size (2, 8 and 4 rows), never per call


def test_the_penalty_equals_transformers_processor_on_random_logits():
    from transformers import RepetitionPenaltyLogitsProcessor

    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 40, generator=gen) * 3
    ids = torch.randint(0, 40, (3, 9), generator=gen)  # a row's prompt (padding included) and completion so far
    seen = torch.zeros(3, 40, dtype=torch.bool).scatter_(1, ids, True)
    assert torch.equal(penalize(logits, seen, 1.3), RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone()))


def test_sampled_tokens_equal_a_cache_free_reference_for_a_seed(setup):
    policy, prompts = setup
    rule = Settings(9, temperature=0.7, top_p=0.9, top_k=20, min_new_tokens=2)
    ours = sample(policy, prompts, 4, 8, rule, backend=StaticBackend(),
                  generator=torch.Generator().manual_seed(5))  # both prompts in one left-padded call
    batch = left_pad(prompts, policy.tokens.pad, 4)
    theirs = _reference(policy, batch, rule, torch.Generator().manual_seed(5))
    assert torch.equal(torch.cat([r.completion_ids for r in ours]), theirs)
    again = sample(policy, prompts, 4, 8, rule, backend=StaticBackend(), generator=torch.Generator().manual_seed(6))
    assert not torch.equal(torch.cat([r.completion_ids for r in again]), theirs)  # the seed matters


@pytest.mark.parametrize("backend", [StaticBackend, None])  # None: generate, scored by the sampler afterwards
def test_each_sampled_tokens_logprob_is_the_one_the_trainer_computes(setup, backend):
    """The sampler's log-prob of each drawn token: the full softmax at the temperature, before top-k/top-p (as
    grpo.token_logprobs scores it), 0 after a completion's end; for packed prompts and a group split in calls."""
    policy, prompts = setup
    rule = Settings(9, temperature=0.7, top_k=3, min_new_tokens=2)  # top-k 3: a truncated softmax would differ
    for chunk in (8, 2):
        rollouts = sample(policy, prompts, 4, chunk, rule, backend=backend() if backend else None,
                          generator=torch.Generator().manual_seed(3))
        for r in rollouts:
            with torch.no_grad():
                trainer = completion_logprobs(policy.model, r.prompt, r.completion_ids, r.mask, 1024, 0.7) * r.mask
            assert torch.allclose(r.sampler_logp, trainer, atol=1e-4), (r.sampler_logp - trainer).abs().max()
            assert (r.sampler_logp[r.mask == 0] == 0).all() and (r.sampler_logp[r.mask == 1] < 0).all()
            # Renormalised over the top 3, the drawn tokens' mean log-prob could not fall below -log 3 (minus the
            # spread of a small sample): the values are the full softmax's.
            assert r.sampler_logp[r.mask == 1].mean() < -2 * math.log(3)


@torch.no_grad()
def _reference(policy, batch: dict, rule: Settings, generator: torch.Generator) -> torch.Tensor:
    """Sampling by the same rule the plain way: the whole sequence through the model at every token (no cache, no
    prefill), transformers' logits processors, the same exponential race on the same noise."""
    tokens, model = policy.tokens, policy.model
    ids, mask, types = batch.pop("input_ids"), batch.pop("attention_mask"), batch.pop("mm_token_type_ids")
    procs = _hf_processors(ids.shape[1], rule.min_new_tokens, tokens.eos, tokens.vision, rule.temperature,
                           rule.top_k, rule.top_p)
    eos = torch.tensor(tokens.eos)
    width, finished = ids.shape[1], torch.zeros(ids.shape[0], dtype=torch.bool)
    was_training = model.training
    model.eval()
    for _ in range(rule.max_new_tokens):
        logits = model(input_ids=ids, attention_mask=mask, mm_token_type_ids=types, use_cache=False,
                       **batch).logits[:, -1].float()
        scores = procs(ids, logits)
        noise = torch.empty_like(scores).exponential_(generator=generator)
        new = torch.where(finished, tokens.pad, (scores.softmax(-1) / noise).argmax(-1))
        ids, finished = torch.cat([ids, new[:, None]], 1), finished | torch.isin(new, eos)
        mask, types = torch.cat([mask, torch.ones_like(mask[:, :1])], 1), torch.cat([types, types[:, :1] * 0], 1)
        if finished.all():
            break
    model.train(was_training)
    return ids[:, width:]


@pytest.mark.parametrize("backend", ["eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_the_compiled_step_is_built_once_for_every_step_and_prompt(setup, backend):
    """torch.compile with the eager backend (dynamo's tracing and guards, no code generation; inductor: its CPU
    code, ~30 s to build): the same graph serves every call - another prompt length in the bucket, weights
    refilled in place after an update."""
    policy, prompts = setup
    compiled, eager, kept = StaticBackend(compile=True, bucket=64, compiler=backend), StaticBackend(bucket=64), {}
    greedy = Settings(6, do_sample=False, min_new_tokens=6)  # no EOS: six tokens that can change
    lora_b = [p for n, p in policy.model.named_parameters() if "lora_B" in n]
    before = [p.detach().clone() for p in lora_b]
    seen = []
    for _ in range(3):  # three optimizer steps
        with merged_weights(policy.model, store=kept):
            ours = sample(policy, prompts, 4, 4, greedy, backend=compiled)  # one call per prompt: two prompt widths
        with merged_weights(policy.model):
            plain = sample(policy, prompts, 4, 4, greedy, backend=eager)
        assert all(torch.equal(a.completion_ids, b.completion_ids) for a, b in zip(ours, plain))
        seen.append([r.completion_ids for r in ours])
        with torch.no_grad():
            for p in lora_b:
                p.add_(0.5 * torch.randn_like(p))  # what an optimizer step does to the adapters
    with torch.no_grad():
        for p, old in zip(lora_b, before):
            p.copy_(old)
    assert any(not torch.equal(a, b) for a, b in zip(seen[0], seen[-1]))  # the updates showed: not stale
    assert compiled.builds == 1 and compiled.compiles == 1
