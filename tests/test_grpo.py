"""GRPO maths against numbers worked out by hand, and against TRL's own loss code on the same log-probs."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from qlora_rft import grpo


def test_completion_mask_stops_after_first_eos_of_any_kind():
    ids = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [9, 0, 2, 2]])
    mask = grpo.completion_mask(ids, [2, 0])
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]]


def test_group_advantages_by_hand():
    # rewards 1, 0, 0, 1: mean 0.5; unbiased std = sqrt((4 * 0.25) / 3) = 0.57735
    adv = grpo.group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), scale=True, eps=0.0)
    assert adv.tolist() == pytest.approx([0.866025, -0.866025, -0.866025, 0.866025], abs=1e-5)
    # rewards 3, 1: mean 2, std sqrt(2) = 1.41421; eps 1e-4 in the denominator
    adv = grpo.group_advantages(torch.tensor([3.0, 1.0]), scale=True, eps=1e-4)
    assert adv.tolist() == pytest.approx([1 / (math.sqrt(2) + 1e-4), -1 / (math.sqrt(2) + 1e-4)], abs=1e-6)


def test_group_advantages_without_scaling_and_uniform_group():
    assert grpo.group_advantages(torch.tensor([2.0, 0.0, 1.0]), scale=False).tolist() == [1.0, -1.0, 0.0]
    assert grpo.group_advantages(torch.tensor([0.7, 0.7, 0.7])).tolist() == [0.0, 0.0, 0.0]


def test_k3_kl_by_hand():
    # d = ref - logp = log(0.5) - log(0.25) = log 2: exp(d) - d - 1 = 2 - 0.693147 - 1 = 0.306853
    kl = grpo.k3_kl(torch.tensor([math.log(0.25)]), torch.tensor([math.log(0.5)]))
    assert kl.item() == pytest.approx(0.306853, abs=1e-6)
    assert grpo.k3_kl(torch.tensor([-1.3]), torch.tensor([-1.3])).item() == 0.0


def test_token_loss_on_policy_is_minus_advantage_and_its_gradient_is_a_times_grad_logp():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    terms = grpo.token_loss(logp, logp.detach(), None, torch.tensor([0.5]), beta=0.0, epsilon=0.2)
    assert terms.loss.tolist() == [[-0.5, -0.5]]  # ratio 1: -(1 * A)
    terms.loss.sum().backward()
    assert logp.grad.tolist() == [[-0.5, -0.5]]  # d/dlogp of -exp(logp - old) * A at ratio 1 = -A


def test_token_loss_clips_the_ratio():
    old = torch.tensor([[0.0, 0.0]])
    logp = torch.tensor([[math.log(1.5), math.log(0.5)]])
    # A = +1: token 0 ratio 1.5 -> clipped to 1.2, loss -1.2; token 1 ratio 0.5 (below 0.8): min(0.5, 0.8) = 0.5
    terms = grpo.token_loss(logp, old, None, torch.tensor([1.0]), beta=0.0, epsilon=0.2)
    assert terms.loss[0].tolist() == pytest.approx([-1.2, -0.5])
    assert terms.clipped.tolist() == [[True, False]]
    # A = -1: token 0: min(-1.5, -1.2) = -1.5 -> loss 1.5; token 1: min(-0.5, -0.8) = -0.8 -> loss 0.8 (clipped)
    terms = grpo.token_loss(logp, old, None, torch.tensor([-1.0]), beta=0.0, epsilon=0.2)
    assert terms.loss[0].tolist() == pytest.approx([1.5, 0.8])
    assert terms.clipped.tolist() == [[False, True]]


def test_token_loss_adds_beta_times_kl():
    logp = torch.tensor([[math.log(0.25)]])
    ref = torch.tensor([[math.log(0.5)]])
    terms = grpo.token_loss(logp, logp, ref, torch.tensor([0.0]), beta=0.1, epsilon=0.2)
    assert terms.loss.item() == pytest.approx(0.1 * 0.306853, abs=1e-6)
    with pytest.raises(ValueError):
        grpo.token_loss(logp, logp, None, torch.tensor([0.0]), beta=0.1, epsilon=0.2)


def test_aggregate_sequence_and_token_by_hand():
    per_token = torch.tensor([[1.0, 3.0, 9.0], [2.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    # sequence: (mean(1, 3) + mean(2)) / 2 = (2 + 2) / 2 = 2
    assert grpo.aggregate(per_token, mask, "sequence", num_sequences=2, num_tokens=3).item() == 2.0
    # token: (1 + 3 + 2) / 3 = 2
    assert grpo.aggregate(per_token, mask, "token", num_sequences=2, num_tokens=3).item() == 2.0
    # a chunk's share uses the whole group's counts: chunk shares add up to the group loss
    group = torch.tensor([[1.0, 3.0], [2.0, 5.0], [4.0, 4.0], [0.0, 6.0]])
    gmask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    for how in ("sequence", "token"):
        whole = grpo.aggregate(group, gmask, how, 4, gmask.sum())
        parts = sum(grpo.aggregate(group[i : i + 2], gmask[i : i + 2], how, 4, gmask.sum()) for i in (0, 2))
        assert parts.item() == pytest.approx(whole.item())


def test_token_logprobs_in_chunks_equal_full_log_softmax_values_and_gradients():
    torch.manual_seed(0)
    hidden = torch.randn(3, 5, 8, requires_grad=True)
    weight = torch.randn(11, 8, requires_grad=True)
    targets = torch.randint(0, 11, (3, 5))
    full = grpo.selective_logprobs_reference(hidden @ weight.T, targets)
    chunked = grpo.token_logprobs(hidden, weight, targets, chunk_size=4)  # 15 positions in chunks of 4
    assert torch.allclose(full, chunked, atol=1e-6)
    g_full = torch.autograd.grad(full.sum(), (hidden, weight))
    g_chunk = torch.autograd.grad(chunked.sum(), (hidden, weight))
    for a, b in zip(g_full, g_chunk):
        assert torch.allclose(a, b, atol=1e-5)


def test_token_logprobs_score_under_the_sampling_temperature():
    torch.manual_seed(0)
    hidden, weight = torch.randn(2, 3, 8), torch.randn(11, 8)
    targets = torch.randint(0, 11, (2, 3))
    tempered = grpo.token_logprobs(hidden, weight, targets, chunk_size=2, temperature=0.5)
    expected = grpo.selective_logprobs_reference((hidden @ weight.T) / 0.5, targets)
    assert torch.allclose(tempered, expected, atol=1e-5)
    assert not torch.allclose(tempered, grpo.token_logprobs(hidden, weight, targets), atol=1e-3)


class _Accelerator:
    sync_gradients = True
    num_processes = 1

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x


def _trl_loss(logp, old, ref, advantages, mask, beta, epsilon, loss_type):
    """TRL's GRPOTrainer._compute_loss itself, fed our log-probs instead of running a model."""
    from trl import GRPOTrainer

    stub = SimpleNamespace(
        aux_loss_enabled=False,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="token",
        beta=beta,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None),
        loss_type=loss_type,
        epsilon_low=epsilon,
        epsilon_high=epsilon,
        use_vllm=False,
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        _entropy_bonus_enabled=False,
        accelerator=_Accelerator(),
        _metrics=defaultdict(lambda: defaultdict(list)),
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros_like(logp), None),
    )
    inputs = {
        "prompt_ids": torch.zeros(logp.shape[0], 1, dtype=torch.long),
        "prompt_mask": torch.ones(logp.shape[0], 1),
        "completion_ids": torch.zeros(logp.shape, dtype=torch.long),
        "completion_mask": mask,
        "advantages": advantages,
        "old_per_token_logps": old,
        "ref_per_token_logps": ref,
    }
    return GRPOTrainer._compute_loss(stub, None, inputs)


@pytest.mark.parametrize("how,loss_type", [("sequence", "grpo"), ("token", "bnpo")])
def test_our_loss_equals_trls_grpo_loss_on_the_same_logprobs(how, loss_type):
    torch.manual_seed(1)
    B, T = 4, 6
    logp = (-torch.rand(B, T) * 3).requires_grad_()
    old = logp.detach() + 0.3 * torch.randn(B, T)  # off-policy, so the clipping matters
    ref = logp.detach() + 0.5 * torch.randn(B, T)
    advantages = torch.randn(B)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0]]).float()
    trl = _trl_loss(logp, old, ref, advantages, mask, beta=0.04, epsilon=0.2, loss_type=loss_type)
    terms = grpo.token_loss(logp, old, ref, advantages, beta=0.04, epsilon=0.2)
    ours = grpo.aggregate(terms.loss, mask, how, num_sequences=B, num_tokens=mask.sum())
    assert ours.item() == pytest.approx(trl.item(), abs=1e-6)
    g_trl = torch.autograd.grad(trl, logp)[0]
    g_ours = torch.autograd.grad(ours, logp)[0]
    assert torch.allclose(g_trl, g_ours, atol=1e-7)
