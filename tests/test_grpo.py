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


def test_truncated_rows_are_those_without_any_eos():
    ids = torch.tensor([[5, 2, 0], [5, 6, 7], [9, 0, 0]])
    assert grpo.truncated(ids, [2, 0]).tolist() == [False, True, False]
    assert grpo.truncated(ids, 2).tolist() == [False, True, True]


def test_group_advantages_by_hand():
    # rewards 1, 0, 0, 1: mean 0.5; unbiased std = sqrt((4 * 0.25) / 3) = 0.57735
    adv = grpo.advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0]]), "group", eps=0.0)
    assert adv.tolist()[0] == pytest.approx([0.866025, -0.866025, -0.866025, 0.866025], abs=1e-5)
    # rewards 3, 1: mean 2, std sqrt(2) = 1.41421; eps 1e-4 in the denominator
    adv = grpo.advantages(torch.tensor([[3.0, 1.0]]), "group", eps=1e-4)
    assert adv.tolist()[0] == pytest.approx([1 / (math.sqrt(2) + 1e-4), -1 / (math.sqrt(2) + 1e-4)], abs=1e-6)


def test_advantages_without_scaling_and_uniform_group():
    assert grpo.advantages(torch.tensor([[2.0, 0.0, 1.0]]), "none").tolist() == [[1.0, -1.0, 0.0]]
    # 0.1 * 3 / 3 is not 0.1 in floating point: a uniform group is still exactly 0, whatever the scaling
    for scale in grpo.SCALINGS:
        assert grpo.advantages(torch.tensor([[0.1, 0.1, 0.1], [1.0, 0.0, 0.0]]), scale)[0].tolist() == [0.0] * 3


def test_batch_scaling_divides_every_group_by_the_std_of_all_rewards():
    rewards = torch.tensor([[1.0, 0.0], [3.0, 3.0]])
    # centred per group: [0.5, -0.5], [0, 0]; all four rewards 1, 0, 3, 3: mean 1.75, squared deviations
    # 0.5625 + 3.0625 + 1.5625 + 1.5625 = 6.75, unbiased variance 6.75 / 3 = 2.25, std 1.5
    assert grpo.advantages(rewards, "batch", eps=0.0).flatten().tolist() == pytest.approx([1 / 3, -1 / 3, 0, 0])
    # the group's own std (0.7071) would give +-0.7071
    assert grpo.advantages(rewards, "group", eps=0.0)[0].tolist() == pytest.approx([0.707107, -0.707107])
    # `batch` (every process's rewards) decides the std: rewards 0, 2, 4, 6 have std 2.582
    other = torch.tensor([[0.0, 2.0], [4.0, 6.0]])
    assert grpo.advantages(rewards, "batch", eps=0.0, batch=other)[0].tolist() == pytest.approx([0.19365, -0.19365],
                                                                                                 abs=1e-5)


def test_k3_kl_by_hand():
    # d = ref - logp = log(0.5) - log(0.25) = log 2: exp(d) - d - 1 = 2 - 0.693147 - 1 = 0.306853
    kl = grpo.k3_kl(torch.tensor([math.log(0.25)]), torch.tensor([math.log(0.5)]))
    assert kl.item() == pytest.approx(0.306853, abs=1e-6)
    assert grpo.k3_kl(torch.tensor([-1.3]), torch.tensor([-1.3])).item() == 0.0


GRPO = grpo.Objective()  # loss_type grpo, beta 0, epsilon 0.2 both sides, token level


def test_importance_weights_truncate_or_drop_past_the_cap_by_hand():
    policy = torch.tensor([[0.5, 0.2, 0.1, 0.3, 0.9]]).log()
    sampler = torch.tensor([[0.5, 0.1, 0.4, 0.05, 0.01]]).log()  # ratios 1, 2, 0.25, 6 and 90
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])  # the last token is padding: weight 1, whatever its ratio
    tis = grpo.importance_weights(policy, sampler, mask, "tis", 3.0)
    mis = grpo.importance_weights(policy, sampler, mask, "mis", 3.0)
    assert tis[0].tolist() == pytest.approx([1.0, 2.0, 0.25, 3.0, 1.0])  # min(r, 3)
    assert mis[0].tolist() == pytest.approx([1.0, 2.0, 0.25, 0.0, 1.0])  # r, or 0 past 3
    assert grpo.importance_weights(policy, sampler, mask, "none", 3.0).tolist() == [[1.0] * 5]
    with pytest.raises(ValueError):
        grpo.importance_weights(policy, sampler, mask, "sequence", 3.0)
    # one ratio per completion: 1 x 2 x 0.25 x 6 = 3 over the unmasked tokens, on every token of it
    assert grpo.importance_weights(policy, sampler, mask, "sequence_tis", 4.0)[0].tolist() == pytest.approx([3.0] * 5)
    assert grpo.importance_weights(policy, sampler, mask, "sequence_tis", 2.0)[0].tolist() == pytest.approx([2.0] * 5)
    assert grpo.importance_weights(policy, sampler, mask, "sequence_mis", 4.0)[0].tolist() == pytest.approx([3.0] * 5)
    assert grpo.importance_weights(policy, sampler, mask, "sequence_mis", 2.0)[0].tolist() == [0.0] * 5


def test_the_importance_weight_scales_the_policy_term_and_its_gradient_not_the_kl():
    logp = torch.tensor([[math.log(0.25)]], requires_grad=True)
    ref = torch.tensor([[math.log(0.5)]])
    objective = grpo.Objective(beta=0.1)
    terms = grpo.token_loss(logp, logp.detach(), ref, torch.tensor([1.0]), objective, importance=torch.tensor([[2.0]]))
    assert terms.loss.item() == pytest.approx(2 * -1.0 + 0.1 * 0.306853, abs=1e-6)  # 2 * (-r A) + beta * k3
    terms.loss.sum().backward()
    # d/dlogp: 2 * -A (the ratio's slope 1 at r = 1) + beta * d(k3)/dlogp = 0.1 * (1 - exp(ref - logp)) = -0.1
    assert logp.grad.item() == pytest.approx(-2.0 - 0.1, abs=1e-6)


def test_sampler_gap_is_the_k3_kl_of_sampler_to_policy_and_the_largest_ratio_by_hand():
    policy = torch.tensor([[0.5, 0.3, 0.9]]).log()
    sampler = torch.tensor([[0.25, 0.3, 0.001]]).log()
    gap = grpo.sampler_gap(policy, sampler, torch.tensor([[1.0, 1.0, 0.0]]))  # the third token is padding
    # d = log(0.5 / 0.25) = log 2: exp(d) - d - 1 = 2 - 0.693147 - 1 = 0.306853; the second token: 0
    assert (gap.kl, gap.ratio_max, gap.tokens) == (pytest.approx(0.306853, abs=1e-6), pytest.approx(2.0), 2.0)


def test_entropy_from_the_chunked_head_by_hand_and_against_the_full_softmax():
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [0.0, 0.0]])  # V = 4, H = 2
    hidden = torch.tensor([[[0.0, 0.0], [math.log(2.0), math.log(2.0)]]])  # logits [0,0,0,0] and [l2, l2, 0, 0]
    scores = grpo.token_scores(hidden, weight, torch.tensor([[0, 1]]), chunk_size=1, entropy=True)
    # uniform over 4: log 4; then p = (1/3, 1/3, 1/6, 1/6): 2/3 log 3 + 1/3 log 6 = 1.329661
    assert scores.entropy[0].tolist() == pytest.approx([math.log(4), 1.329661], abs=1e-6)
    torch.manual_seed(0)
    hidden = torch.randn(3, 5, 8, requires_grad=True)
    weight = torch.randn(11, 8)
    targets = torch.randint(0, 11, (3, 5))
    scores = grpo.token_scores(hidden, weight, targets, chunk_size=4, temperature=0.7, entropy=True)
    probs = torch.softmax((hidden @ weight.T) / 0.7, -1)
    assert torch.allclose(scores.entropy, -(probs * probs.log()).sum(-1), atol=1e-5)
    assert not scores.entropy.requires_grad and scores.logp.requires_grad
    assert torch.equal(scores.logp, grpo.token_logprobs(hidden, weight, targets, chunk_size=4, temperature=0.7))


def test_token_loss_on_policy_is_minus_advantage_and_its_gradient_is_a_times_grad_logp():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    terms = grpo.token_loss(logp, logp.detach(), None, torch.tensor([0.5]), GRPO)
    assert terms.loss.tolist() == [[-0.5, -0.5]]  # ratio 1: -(1 * A)
    terms.loss.sum().backward()
    assert logp.grad.tolist() == [[-0.5, -0.5]]  # d/dlogp of -exp(logp - old) * A at ratio 1 = -A


def test_token_loss_clips_the_ratio():
    old = torch.tensor([[0.0, 0.0]])
    logp = torch.tensor([[math.log(1.5), math.log(0.5)]])
    # A = +1: token 0 ratio 1.5 -> clipped to 1.2, loss -1.2; token 1 ratio 0.5 (below 0.8): min(0.5, 0.8) = 0.5
    terms = grpo.token_loss(logp, old, None, torch.tensor([1.0]), GRPO)
    assert terms.loss[0].tolist() == pytest.approx([-1.2, -0.5])
    assert terms.clipped.tolist() == [[True, False]]
    # A = -1: token 0: min(-1.5, -1.2) = -1.5 -> loss 1.5; token 1: min(-0.5, -0.8) = -0.8 -> loss 0.8 (clipped)
    terms = grpo.token_loss(logp, old, None, torch.tensor([-1.0]), GRPO)
    assert terms.loss[0].tolist() == pytest.approx([1.5, 0.8])
    assert terms.clipped.tolist() == [[False, True]]


def test_token_loss_adds_beta_times_kl():
    logp = torch.tensor([[math.log(0.25)]])
    ref = torch.tensor([[math.log(0.5)]])
    with_kl = grpo.Objective(beta=0.1)
    terms = grpo.token_loss(logp, logp, ref, torch.tensor([0.0]), with_kl)
    assert terms.loss.item() == pytest.approx(0.1 * 0.306853, abs=1e-6)
    with pytest.raises(ValueError):
        grpo.token_loss(logp, logp, None, torch.tensor([0.0]), with_kl)


def test_clip_higher_widens_the_upper_range_only():
    old = torch.tensor([[0.0, 0.0]])
    logp = torch.tensor([[math.log(1.25), math.log(0.7)]])
    higher = grpo.Objective(epsilon=0.2, epsilon_high=0.28)
    # A = +1, ratio 1.25: within 1 + 0.28, so -1.25 (epsilon 0.2 on both sides clips it to -1.2)
    assert grpo.token_loss(logp, old, None, torch.tensor([1.0]), higher).loss[0, 0].item() == pytest.approx(-1.25)
    assert grpo.token_loss(logp, old, None, torch.tensor([1.0]), GRPO).loss[0, 0].item() == pytest.approx(-1.2)
    # A = -1, ratio 0.7: the lower side is still 1 - 0.2: -min(-0.7, -0.8) = 0.8, clipped
    terms = grpo.token_loss(logp, old, None, torch.tensor([-1.0]), higher)
    assert terms.loss[0, 1].item() == pytest.approx(0.8)
    assert terms.clipped.tolist() == [[False, True]]


def test_sequence_level_ratio_is_the_exp_of_the_mean_log_ratio_over_the_completion():
    old = torch.zeros(1, 3)
    logp = torch.tensor([[0.2, -0.2, 5.0]])  # log-ratios 0.2, -0.2, and 5.0 on a token after the EOS
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    gspo = grpo.Objective(importance_sampling_level="sequence")
    terms = grpo.token_loss(logp, old, None, torch.tensor([2.0]), gspo, mask)
    assert terms.ratio.tolist() == [[1.0, 1.0, 1.0]]  # exp(mean(0.2, -0.2)) = 1: the masked token does not count
    assert terms.loss.tolist() == [[-2.0, -2.0, -2.0]]  # -(1 * A) on every token
    # log-ratios 0.5, 0.5: ratio e^0.5 = 1.6487 on both tokens, clipped to 1.2 for A = +1
    terms = grpo.token_loss(torch.tensor([[0.5, 0.5, 0.0]]), old, None, torch.tensor([1.0]), gspo, mask)
    assert terms.ratio[0, 0].item() == pytest.approx(math.exp(0.5))
    assert terms.loss[0, :2].tolist() == pytest.approx([-1.2, -1.2])


def test_cispo_weighs_logp_by_the_capped_detached_ratio():
    old = torch.tensor([[math.log(0.25), math.log(0.25)]])
    logp = torch.tensor([[math.log(0.5), math.log(0.3)]], requires_grad=True)  # ratios 2 and 1.2
    cispo = grpo.Objective(loss_type="cispo", epsilon_high=1.5)
    terms = grpo.token_loss(logp, old, None, torch.tensor([1.0]), cispo)
    # token 0: weight min(2, 1.5) = 1.5, loss -1.5 * 1 * log 0.5 = 1.03972; token 1: -1.2 * log 0.3 = 1.44477
    assert terms.loss[0].tolist() == pytest.approx([1.5 * math.log(2), -1.2 * math.log(0.3)], abs=1e-5)
    assert terms.clipped.tolist() == [[True, False]]
    terms.loss.sum().backward()
    assert logp.grad[0].tolist() == pytest.approx([-1.5, -1.2])  # the weight is a constant: -w * A


def test_sapo_gate_by_hand():
    logp = torch.tensor([[-1.0]], requires_grad=True)
    sapo = grpo.Objective(loss_type="sapo", sapo_temperature_pos=1.0, sapo_temperature_neg=1.05)
    # on policy, A = +1: -sigmoid(0) * 4 / 1 * 1 = -2; gradient -A * (slope of the gate at 1: 0.25 * 4 = 1) = -1
    terms = grpo.token_loss(logp, logp.detach(), None, torch.tensor([1.0]), sapo)
    assert terms.loss.item() == pytest.approx(-2.0)
    terms.loss.sum().backward()
    assert logp.grad.item() == pytest.approx(-1.0)
    # A = -1 takes tau 1.05: 0.5 * 4 / 1.05 = 1.904762
    terms = grpo.token_loss(logp, logp.detach(), None, torch.tensor([-1.0]), sapo)
    assert terms.loss.item() == pytest.approx(2 / 1.05)
    # off policy, ratio 2, A = +1: -sigmoid(1) * 4 = -2.924234 (a hard clip would stop at -1.2)
    terms = grpo.token_loss(torch.tensor([[math.log(2.0)]]), torch.zeros(1, 1), None, torch.tensor([1.0]), sapo)
    assert terms.loss.item() == pytest.approx(-4 / (1 + math.exp(-1.0)))


def test_aggregate_by_hand_for_each_loss_type():
    per_token = torch.tensor([[1.0, 3.0, 9.0], [2.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    # one group of 2 in a step of 2 groups; the step has 8 loss tokens, completions at most 4 tokens long
    size = grpo.StepSize(groups=2, group_size=2, max_completion_length=4, tokens=8.0)
    share = {t: grpo.aggregate(per_token, mask, t, size, group_tokens=3.0).item() for t in grpo.LOSS_TYPES}
    assert share["grpo"] == share["sapo"] == 1.0  # (mean(1, 3) + mean(2)) / 2 completions / 2 groups
    assert share["bnpo"] == 1.0  # (1 + 3 + 2) / 3 tokens / 2 groups
    assert share["dr_grpo"] == 0.375  # 6 / (2 completions x 4) / 2 groups
    assert share["dapo"] == share["cispo"] == 0.75  # 6 / the step's 8 tokens


@pytest.mark.parametrize("loss_type", grpo.LOSS_TYPES)
def test_chunk_shares_add_up_to_the_step_loss(loss_type):
    """Two groups of 4 cut into chunks of 1, 2 or 4: the same step loss (the counts are the step's)."""
    torch.manual_seed(0)
    per_token = torch.rand(2, 4, 3)  # [groups, G, T]
    mask = torch.tensor([[[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0]], [[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 0, 0]]])
    mask = mask.float()
    size = grpo.StepSize(groups=2, group_size=4, max_completion_length=5, tokens=float(mask.sum()))
    losses = []
    for chunk in (4, 2, 1):
        losses.append(sum(grpo.aggregate(per_token[n, s : s + chunk], mask[n, s : s + chunk], loss_type, size,
                                         group_tokens=float(mask[n].sum())).item()
                          for n in range(2) for s in range(0, 4, chunk)))
    assert losses == pytest.approx([losses[0]] * 3)


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


def _trl_loss(logp, old, ref, advantages, mask, objective, max_completion_length, accumulation=1, tokens=None,
              is_ratio=None):
    """TRL's GRPOTrainer._compute_loss itself, fed our log-probs instead of running a model: one micro-batch of an
    accumulation window of `accumulation` (steps_per_generation the same), `tokens` the generation batch's;
    `is_ratio`: its vLLM importance-sampling ratio, with the correction on."""
    from trl import GRPOTrainer

    o = objective
    stub = SimpleNamespace(
        aux_loss_enabled=False,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level=o.importance_sampling_level,
        beta=o.beta,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=accumulation,
                             sapo_temperature_pos=o.sapo_temperature_pos, sapo_temperature_neg=o.sapo_temperature_neg),
        loss_type=o.loss_type,
        epsilon_low=o.epsilon,
        epsilon_high=o.epsilon_high,
        max_completion_length=max_completion_length,
        use_vllm=is_ratio is not None,
        vllm_importance_sampling_correction=is_ratio is not None,
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=accumulation,
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
        "num_items_in_batch": torch.tensor(float(mask.sum() if tokens is None else tokens)),
    }
    if is_ratio is not None:
        inputs["importance_sampling_ratio"] = is_ratio
    return GRPOTrainer._compute_loss(stub, None, inputs)


def _trl_is_ratio(old, sampling, mask, mode, cap):
    """TRL 1.16's vLLM importance-sampling ratio as _generate_and_score_completions computes it (clip_min None): exp
    of the masked log-ratio, per token or summed per sequence ([B, 1]), clamped above (*_truncate) or zeroed past
    the cap (*_mask)."""
    diff = torch.nan_to_num((old - sampling) * mask, nan=0.0)
    ratio = torch.exp(diff.sum(dim=-1, keepdim=True) if mode.startswith("sequence") else diff)
    if mode.endswith("truncate"):
        return torch.clamp(ratio, min=None, max=cap)
    return ratio.masked_fill((ratio < -math.inf) | (ratio > cap), value=0.0)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
@pytest.mark.parametrize("ours,theirs", [("tis", "token_truncate"), ("mis", "token_mask"),
                                         ("sequence_tis", "sequence_truncate"), ("sequence_mis", "sequence_mask")])
def test_our_importance_correction_equals_trls_on_the_same_logprobs(loss_type, ours, theirs):
    """The weights against TRL's arithmetic, then the corrected loss and its gradient against its _compute_loss."""
    torch.manual_seed(2)
    B, T, L = 4, 6, 8
    logp = (-torch.rand(B, T) * 3).requires_grad_()
    sampling = logp.detach() + 0.8 * torch.randn(B, T)  # a sampler far enough off for ratios past the cap of 2
    ref = logp.detach() + 0.5 * torch.randn(B, T)
    advantages = torch.randn(B)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0]]).float()
    old = logp.detach()  # one update per rollout: the policy the completions were sampled for
    weights = grpo.importance_weights(old, sampling, mask, ours, 2.0)
    theirs = _trl_is_ratio(old, sampling, mask, theirs, 2.0)  # [B, T], or [B, 1] per sequence
    assert torch.equal(weights, theirs.expand_as(weights))
    assert (weights[mask == 1] == 2.0).any() if ours.endswith("tis") else (weights[mask == 1] == 0).any()  # the cap
    assert ((weights[mask == 1] > 0) & (weights[mask == 1] < 2)).any()  # ... and not everywhere
    objective = grpo.Objective(loss_type, beta=0.04)
    size = grpo.StepSize(groups=1, group_size=B, max_completion_length=L, tokens=float(mask.sum()))
    terms = grpo.token_loss(logp, old, ref, advantages, objective, mask, weights)
    mine = grpo.aggregate(terms.loss, mask, loss_type, size, group_tokens=float(mask.sum()))
    trl = _trl_loss(logp, old, ref, advantages, mask, objective, L, is_ratio=theirs)
    assert mine.item() == pytest.approx(trl.item(), abs=1e-6)
    assert torch.allclose(torch.autograd.grad(mine, logp)[0], torch.autograd.grad(trl, logp)[0], atol=1e-7)


# every loss type x importance sampling level x an upper clip equal to epsilon, clip-higher's 0.28, and 5.0 (cispo's
# recommended cap), with the KL term on
COMBINATIONS = [(t, level, high) for t in grpo.LOSS_TYPES for level in ("token", "sequence")
                for high in (0.2, 0.28, 5.0)]


@pytest.mark.parametrize("loss_type,level,epsilon_high", COMBINATIONS)
def test_our_loss_equals_trls_grpo_loss_on_the_same_logprobs(loss_type, level, epsilon_high):
    """Two groups of 4 accumulated into one step, against TRL with one group per micro-batch: the step's loss and
    its gradient, for each loss type."""
    torch.manual_seed(1)
    B, T, L = 4, 6, 8  # completions of a group, tokens, max_completion_length
    logp = (-torch.rand(2, B, T) * 3).requires_grad_()
    old = logp.detach() + 0.3 * torch.randn(2, B, T)  # off-policy, so the clipping matters
    ref = logp.detach() + 0.5 * torch.randn(2, B, T)
    advantages = torch.randn(2, B)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0]]).float()
    mask = torch.stack([mask, mask.flip(0)])
    objective = grpo.Objective(loss_type, beta=0.04, epsilon=0.2, epsilon_high=epsilon_high,
                               importance_sampling_level=level)
    size = grpo.StepSize(groups=2, group_size=B, max_completion_length=L, tokens=float(mask.sum()))
    trl = ours = 0
    for n in range(2):
        trl = trl + _trl_loss(logp[n], old[n], ref[n], advantages[n], mask[n], objective, L, accumulation=2,
                              tokens=mask.sum())
        terms = grpo.token_loss(logp[n], old[n], ref[n], advantages[n], objective, mask[n])
        ours = ours + grpo.aggregate(terms.loss, mask[n], loss_type, size, group_tokens=float(mask[n].sum()))
    assert ours.item() == pytest.approx(trl.item(), abs=1e-6)
    g_trl = torch.autograd.grad(trl, logp)[0]
    g_ours = torch.autograd.grad(ours, logp)[0]
    assert torch.allclose(g_trl, g_ours, atol=1e-7)
    assert g_ours.abs().sum() > 0
