"""GRPO maths as pure tensor functions: masks, log-probs, advantages, k3 KL, the loss variants, aggregation.

The loss types (grpo, bnpo, dr_grpo, dapo, cispo, sapo), clip-higher and sequence-level importance sampling follow
TRL's GRPOTrainer (tests compare with its own loss). Nothing here knows about models, configs or data; tests check
every function with numbers worked out by hand.
Shapes: N groups of G completions, B completions (a chunk of one group), T completion tokens, H hidden size,
V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def completion_mask(ids: torch.Tensor, eos_token_ids: int | list[int]) -> torch.Tensor:
    """1 for tokens up to and including the first EOS of each row, 0 after it.  ids: [B, T] -> [B, T] float.

    >>> completion_mask(torch.tensor([[5, 2, 7], [5, 6, 7]]), eos_token_ids=2)
    tensor([[1., 1., 0.],
            [1., 1., 1.]])
    """
    eos = torch.as_tensor(eos_token_ids, device=ids.device).reshape(-1)
    is_eos = torch.isin(ids, eos)  # [B, T]
    # Count of EOS strictly before each position: 0 means "still inside the completion".
    eos_before = torch.cumsum(is_eos.int(), dim=1) - is_eos.int()  # [B, T]
    return (eos_before == 0).float()


def truncated(ids: torch.Tensor, eos_token_ids: int | list[int]) -> torch.Tensor:
    """Rows that hold no EOS: cut at the length limit.  ids: [B, T] -> [B] bool.

    >>> truncated(torch.tensor([[5, 2, 0], [5, 6, 7]]), eos_token_ids=2)
    tensor([False,  True])
    """
    eos = torch.as_tensor(eos_token_ids, device=ids.device).reshape(-1)
    return ~torch.isin(ids, eos).any(dim=-1)


class TokenScores(NamedTuple):
    """Per completion token: its log-prob, and the entropy of the distribution it was drawn from (no grad; None
    when not asked for)."""

    logp: torch.Tensor  # [B, T] fp32
    entropy: torch.Tensor | None = None  # [B, T] fp32


def token_logprobs(
    hidden: torch.Tensor, lm_head_weight: torch.Tensor, targets: torch.Tensor, chunk_size: int = 1024,
    temperature: float = 1.0,
) -> torch.Tensor:
    """log p(target) under softmax(hidden @ W.T / temperature), never building all [N, V] logits at once.

    hidden: [B, T, H] (the states that predict each target), lm_head_weight: [V, H], targets: [B, T] -> [B, T] fp32.
    The temperature is the sampler's: the loss must score completions under the distribution they came from.
    Each chunk of positions is recomputed in the backward (activation checkpointing), so memory follows the chunk.
    """
    return token_scores(hidden, lm_head_weight, targets, chunk_size, temperature).logp


def token_scores(
    hidden: torch.Tensor, lm_head_weight: torch.Tensor, targets: torch.Tensor, chunk_size: int = 1024,
    temperature: float = 1.0, entropy: bool = False,
) -> TokenScores:
    """`token_logprobs`, and with `entropy` each position's entropy -sum p log p of the same tempered softmax,
    from the same chunks of logits (no [B, T, V] tensor is kept; no gradient flows through the entropy)."""
    B, T, H = hidden.shape
    flat_h = hidden.reshape(B * T, H)  # [N, H]
    flat_y = targets.reshape(B * T)  # [N]
    logps, entropies = [], []
    for start in range(0, B * T, chunk_size):
        h, y = flat_h[start : start + chunk_size], flat_y[start : start + chunk_size]
        if torch.is_grad_enabled() and (h.requires_grad or lm_head_weight.requires_grad):
            logp, ent = checkpoint(_chunk_scores, h, lm_head_weight, y, temperature, entropy, use_reentrant=False)
        else:
            logp, ent = _chunk_scores(h, lm_head_weight, y, temperature, entropy)
        logps.append(logp)
        entropies.append(ent)
    return TokenScores(torch.cat(logps).reshape(B, T), torch.cat(entropies).reshape(B, T) if entropy else None)


def _chunk_scores(h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, temperature: float,
                  entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    logits = (h @ weight.T).float() / temperature  # [n, V] in fp32 for a stable logsumexp
    norm = torch.logsumexp(logits, dim=-1)  # [n]
    logp = logits.gather(-1, y[:, None]).squeeze(-1) - norm  # [n]
    if not entropy:
        return logp, None
    with torch.no_grad():
        ent = norm - (torch.softmax(logits, dim=-1) * logits).sum(-1)  # [n]: log Z - E_p[logit]
    return logp, ent


SCALINGS = ("group", "batch", "none")


def advantages(rewards: torch.Tensor, scale: str = "group", eps: float = 1e-4,
               batch: torch.Tensor | None = None) -> torch.Tensor:
    """Each reward minus its group's mean, divided by a std + eps (unbiased sample std, as TRL).

    rewards: [N, G], N groups of G -> [N, G].  scale: "group": each group's own std; "batch": the std of all the
    step's rewards (`batch`: every process's, default `rewards`); "none": not divided (Dr. GRPO).
    A group whose rewards are all equal gets advantages of exactly 0.
    >>> advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0]]), eps=0.0)  # mean 0.5, std 0.5774
    tensor([[ 0.8660, -0.8660, -0.8660,  0.8660]])
    """
    if scale not in SCALINGS:
        raise ValueError(f"unknown reward scaling {scale!r}")
    uniform = (rewards == rewards[:, :1]).all(dim=1, keepdim=True)  # [N, 1]
    centred = torch.where(uniform, 0.0, rewards - rewards.mean(dim=1, keepdim=True))  # [N, G]
    if scale == "group":
        return centred / (rewards.std(dim=1, keepdim=True) + eps)
    if scale == "batch":
        return centred / ((rewards if batch is None else batch).std() + eps)
    return centred


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL(policy || reference) estimate exp(d) - d - 1 with d = ref - logp; >= 0, zero iff equal."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo")


@dataclass(frozen=True)
class Objective:
    """Which loss of the GRPO family, and its constants (TRL GRPOTrainer's definitions and defaults)."""

    loss_type: str = "grpo"
    beta: float = 0.0  # weight of the k3 KL to the reference
    epsilon: float = 0.2  # the ratio is clipped below at 1 - epsilon
    epsilon_high: float = 0.2  # ... and above at 1 + epsilon_high; cispo: the importance weight's cap itself
    importance_sampling_level: str = "token"  # token: a ratio per token; sequence: one per completion (GSPO)
    sapo_temperature_pos: float = 1.0  # sapo's gate temperature for tokens with a positive advantage
    sapo_temperature_neg: float = 1.05  # ... and for the others


@dataclass
class TokenLoss:
    """Per-token terms, each [B, T]."""

    loss: torch.Tensor  # the loss type's policy term plus beta * kl
    kl: torch.Tensor | None  # k3 estimate; None when beta = 0 (no reference pass)
    ratio: torch.Tensor  # pi / pi_old (sequence level: the completion's geometric mean, on each of its tokens)
    clipped: torch.Tensor  # bool: the clip (or cispo's cap) decided the term: no gradient through the ratio


def token_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    objective: Objective,
    mask: torch.Tensor | None = None,
    importance: torch.Tensor | None = None,
) -> TokenLoss:
    """The per-token loss of `objective.loss_type`, with A the completion's advantage and r the importance ratio:

    grpo, bnpo, dr_grpo, dapo: -min(r * A, clip(r, 1 - epsilon, 1 + epsilon_high) * A)  (PPO's clipped term);
    cispo: -min(r, epsilon_high) * A * logp, the capped weight detached (MiniMax-M1);
    sapo: -sigmoid(tau * (r - 1)) * 4 / tau * A, tau by the sign of A (a soft gate instead of the clip);
    that term times `importance` [B, T] when given (the sampler correction, `importance_weights`: as TRL, on the
    policy term only), then plus beta * k3 KL. They differ further in how `aggregate` sums them.
    logp, old_logp, ref_logp: [B, T]; advantages: [B]; mask [B, T]: the tokens that count (sequence level needs it).
    With one update per rollout old_logp = logp.detach(), so r = 1 and the gradient is A * grad(logp), whichever
    the type (cispo, sapo: within the cap and the gate's slope 1 at r = 1).
    """
    o = objective
    log_ratio = logp - old_logp  # [B, T]
    if o.importance_sampling_level == "sequence":  # GSPO: one ratio per completion, the mean log-ratio's exp
        if mask is None:
            raise ValueError("importance_sampling_level='sequence' needs the completion mask")
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0))[:, None]  # [B, 1]
    elif o.importance_sampling_level != "token":
        raise ValueError(f"unknown importance sampling level {o.importance_sampling_level!r}")
    ratio = torch.exp(log_ratio)  # [B, T] or [B, 1]
    adv = advantages[:, None]  # [B, 1]
    if o.loss_type == "cispo":
        capped = torch.clamp(ratio, max=o.epsilon_high)
        loss = -capped.detach() * adv * logp  # [B, T]
        clipped = ratio > o.epsilon_high
    elif o.loss_type == "sapo":
        tau = torch.where(adv > 0, o.sapo_temperature_pos, o.sapo_temperature_neg)  # [B, 1]
        loss = -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * adv
        clipped = torch.zeros_like(ratio, dtype=torch.bool)
    elif o.loss_type in LOSS_TYPES:
        unclipped = ratio * adv
        clipped_term = torch.clamp(ratio, 1 - o.epsilon, 1 + o.epsilon_high) * adv
        loss = -torch.minimum(unclipped, clipped_term)
        clipped = clipped_term < unclipped
    else:
        raise ValueError(f"unknown loss type {o.loss_type!r}")
    if importance is not None:
        loss = loss * importance
    kl = None
    if o.beta != 0:
        if ref_logp is None:
            raise ValueError("beta != 0 needs the reference log-probs")
        kl = k3_kl(logp, ref_logp)
        loss = loss + o.beta * kl
    return TokenLoss(loss=loss.expand_as(logp), kl=kl, ratio=ratio.expand_as(logp),
                     clipped=clipped.expand_as(logp))


CORRECTIONS = ("none", "tis", "mis", "sequence_tis", "sequence_mis")


def importance_weights(policy_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor, mode: str,
                       cap: float) -> torch.Tensor:
    """Per-token weights correcting for completions drawn from the sampler's weights rather than the policy's, as
    TRL's vLLM importance sampling: at token level r = pi_policy / pi_sampler = exp((policy - sampler) * mask)
    (1 outside the mask); tis: min(r, cap) (TRL's token_truncate); mis: r, or 0 where r > cap (token_mask: the
    token leaves the loss, its count stays in the normalisation). sequence_tis / sequence_mis (TRL's
    sequence_truncate / sequence_mask): one ratio per completion, the exp of its summed log-ratios, given to each
    of its tokens. No gradient.  [B, T] each -> [B, T]

    >>> policy, sampler, mask = torch.tensor([[0.0, -1.0, -3.0]]), torch.tensor([[0.0, -2.0, -1.0]]), torch.ones(1, 3)
    >>> importance_weights(policy, sampler, mask, "tis", 2.0), importance_weights(policy, sampler, mask, "mis", 2.0)
    (tensor([[1.0000, 2.0000, 0.1353]]), tensor([[1.0000, 0.0000, 0.1353]]))
    >>> importance_weights(policy, sampler, mask, "sequence_tis", 2.0)  # e^(1 - 2) for every token
    tensor([[0.3679, 0.3679, 0.3679]])
    """
    if mode not in CORRECTIONS:
        raise ValueError(f"unknown importance correction {mode!r}")
    log_ratio = (policy_logp.detach() - sampler_logp) * mask
    if mode.startswith("sequence_"):
        log_ratio = log_ratio.sum(-1, keepdim=True).expand_as(mask)
    ratio = torch.exp(log_ratio)
    if mode.endswith("tis"):
        return ratio.clamp(max=cap)
    if mode.endswith("mis"):
        return ratio.masked_fill(ratio > cap, 0.0)
    return torch.ones_like(ratio)


@dataclass(frozen=True)
class SamplerGap:
    """How far the sampler's distribution is from the policy's on the sampled tokens: sums, so that chunks add up."""

    kl: float  # summed k3 estimates of KL(sampler || policy), one per token
    ratio_max: float  # largest pi_policy / pi_sampler
    tokens: float  # tokens counted


def sampler_gap(policy_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor) -> SamplerGap:
    """The per-token k3 estimate of KL(sampler || policy), exp(d) - d - 1 with d = policy - sampler (the tokens were
    drawn from the sampler), summed over the mask, and the largest ratio exp(d) there.  [B, T] each. In float64: a
    gap of float rounding alone (d ~ 1e-6) stays a tiny positive number instead of noise around 0.

    >>> gap = sampler_gap(torch.tensor([[0.0, -1.0]]), torch.tensor([[0.0, -2.0]]), torch.ones(1, 2))
    >>> round(gap.kl, 4), round(gap.ratio_max, 4), gap.tokens  # e - 1 - 1 = 0.7183
    (0.7183, 2.7183, 2.0)
    """
    policy, sampler = policy_logp.detach().double(), sampler_logp.double()  # float64: rounding never makes it < 0
    kl = (k3_kl(sampler, policy) * mask).sum()
    ratio = torch.exp(policy - sampler).masked_fill(mask == 0, 0.0)
    return SamplerGap(kl.item(), ratio.max().item() if mask.any() else 0.0, float(mask.sum()))


@dataclass(frozen=True)
class StepSize:
    """What the loss types divide by: counts of the whole optimizer step, never of a chunk, so that the shares of
    all chunks of all groups add up to the step's loss whatever the chunking."""

    groups: int  # groups (prompts) in the step, in this process
    group_size: int  # G
    max_completion_length: int  # dr_grpo's constant
    tokens: float  # loss tokens of the step (under a launch: the mean over the processes of their counts)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str, size: StepSize,
              group_tokens: float) -> torch.Tensor:
    """Reduce [B, T] per-token values of a chunk of one group to its share of the step's scalar loss.

    As TRL with one group per micro-batch and the step's groups accumulated (steps_per_generation = accumulation):
    grpo, sapo: mean over each completion's own tokens, then mean over the step's completions (the paper's);
    bnpo: mean over the group's tokens (`group_tokens`: the whole group's), then mean over the groups;
    dr_grpo: sum over tokens / (completions x max_completion_length);
    dapo, cispo: sum over tokens / the step's tokens (under a launch the averaged gradient is then the mean over
    every process's tokens).
    """
    masked = per_token * mask  # [B, T]
    if loss_type in ("grpo", "sapo"):
        per_seq = masked.sum(-1) / mask.sum(-1).clamp(min=1.0)  # [B]
        return per_seq.sum() / size.group_size / size.groups
    if loss_type == "bnpo":
        return masked.sum() / max(float(group_tokens), 1.0) / size.groups
    if loss_type == "dr_grpo":
        return masked.sum() / (size.group_size * size.max_completion_length) / size.groups
    if loss_type in ("dapo", "cispo"):
        return masked.sum() / max(float(size.tokens), 1.0)
    raise ValueError(f"unknown loss type {loss_type!r}")


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of values where mask is 1 (0 when the mask is empty)."""
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def selective_logprobs_reference(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits).gather(targets): the plain definition, for tests.  [B, T, V], [B, T] -> [B, T]."""
    return F.log_softmax(logits.float(), dim=-1).gather(-1, targets[..., None]).squeeze(-1)
