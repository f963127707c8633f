"""GRPO maths as pure tensor functions: masks, log-probs, group advantages, k3 KL, clipped loss, aggregation.

Nothing here knows about models, configs or data; tests check every function with numbers worked out by hand.
Shapes: B completions (a chunk of one group of G), T completion tokens, H hidden size, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

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


def token_logprobs(
    hidden: torch.Tensor, lm_head_weight: torch.Tensor, targets: torch.Tensor, chunk_size: int = 1024,
    temperature: float = 1.0,
) -> torch.Tensor:
    """log p(target) under softmax(hidden @ W.T / temperature), never building all [N, V] logits at once.

    hidden: [B, T, H] (the states that predict each target), lm_head_weight: [V, H], targets: [B, T] -> [B, T] fp32.
    The temperature is the sampler's: the loss must score completions under the distribution they came from.
    Each chunk of positions is recomputed in the backward (activation checkpointing), so memory follows the chunk.
    """
    B, T, H = hidden.shape
    flat_h = hidden.reshape(B * T, H)  # [N, H]
    flat_y = targets.reshape(B * T)  # [N]
    pieces = []
    for start in range(0, B * T, chunk_size):
        h, y = flat_h[start : start + chunk_size], flat_y[start : start + chunk_size]
        if torch.is_grad_enabled() and (h.requires_grad or lm_head_weight.requires_grad):
            pieces.append(checkpoint(_chunk_logprobs, h, lm_head_weight, y, temperature, use_reentrant=False))
        else:
            pieces.append(_chunk_logprobs(h, lm_head_weight, y, temperature))
    return torch.cat(pieces).reshape(B, T)


def _chunk_logprobs(h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = (h @ weight.T).float() / temperature  # [n, V] in fp32 for a stable logsumexp
    return logits.gather(-1, y[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)  # [n]


def group_advantages(rewards: torch.Tensor, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """(r - mean) / (std + eps) over one group of G rewards; std is the unbiased sample std (as TRL).

    rewards: [G] -> [G].  With scale=False only the mean is removed (Dr. GRPO).
    >>> group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), eps=0.0)  # mean 0.5, std 0.5774
    tensor([ 0.8660, -0.8660, -0.8660,  0.8660])
    """
    centred = rewards - rewards.mean()
    if not scale:
        return centred
    return centred / (rewards.std() + eps)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL(policy || reference) estimate exp(d) - d - 1 with d = ref - logp; >= 0, zero iff equal."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


@dataclass
class TokenLoss:
    """Per-token GRPO terms, each [B, T]."""

    loss: torch.Tensor  # -min(ratio * A, clip(ratio) * A) + beta * kl
    kl: torch.Tensor | None  # k3 estimate; None when beta = 0 (no reference pass)
    ratio: torch.Tensor  # pi / pi_old
    clipped: torch.Tensor  # bool: the clipped branch was the minimum (no gradient through the ratio)


def token_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    beta: float,
    epsilon: float,
) -> TokenLoss:
    """PPO-clipped policy-gradient term plus beta * k3 KL, per token.

    logp, old_logp, ref_logp: [B, T]; advantages: [B].  With one update per rollout old_logp = logp.detach(),
    so ratio = 1 and the gradient is A * grad(logp) (the paper's setting).
    """
    ratio = torch.exp(logp - old_logp)  # [B, T]
    adv = advantages[:, None]  # [B, 1]
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * adv
    loss = -torch.minimum(unclipped, clipped)  # [B, T]
    kl = None
    if beta != 0:
        if ref_logp is None:
            raise ValueError("beta != 0 needs the reference log-probs")
        kl = k3_kl(logp, ref_logp)
        loss = loss + beta * kl
    return TokenLoss(loss=loss, kl=kl, ratio=ratio, clipped=clipped < unclipped)


def aggregate(
    per_token: torch.Tensor, mask: torch.Tensor, how: str, num_sequences: int, num_tokens: float
) -> torch.Tensor:
    """Reduce [B, T] per-token values of a chunk to its share of the group's scalar loss.

    how="sequence": mean over each completion's own tokens, then sum / num_sequences (the paper's, TRL "grpo").
    how="token": sum over all tokens / num_tokens (every token of the group weighs the same).
    num_sequences and num_tokens are the WHOLE group's, so the shares of its chunks add up to the group loss.
    """
    if how == "sequence":
        per_seq = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)  # [B]
        return per_seq.sum() / num_sequences
    if how == "token":
        return (per_token * mask).sum() / max(float(num_tokens), 1.0)
    raise ValueError(f"unknown aggregation {how!r}")


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of values where mask is 1 (0 when the mask is empty)."""
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def selective_logprobs_reference(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits).gather(targets): the plain definition, for tests.  [B, T, V], [B, T] -> [B, T]."""
    return F.log_softmax(logits.float(), dim=-1).gather(-1, targets[..., None]).squeeze(-1)
