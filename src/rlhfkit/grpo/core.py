"""The critic-free advantage estimators as small pure torch functions: tensors and numbers in, tensors out.

Shapes, as in rl/core.py:
    B  sequences in the batch, laid out as groups of G consecutive rows (the G samples of one prompt): B = n * G
    R  response tokens per sequence
    scores (B,) float: one reward per sequence
    response_mask (B, R) bool: True at a valid response token
Sequence-level estimators return (B,); `per_token` spreads them over each sequence's valid tokens.
"""

from __future__ import annotations

import torch

from rlhfkit.rl.core import masked_whiten, per_token_rewards

ESTIMATORS = ("grpo", "dr-grpo", "rloo", "reinforce++", "reinforce++-baseline")


def _groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    if scores.dim() != 1 or scores.shape[0] % group_size:
        raise ValueError(f"scores {tuple(scores.shape)} do not split into groups of {group_size}")
    return scores.view(-1, group_size)  # (n, G)


def group_advantages(scores: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """GRPO (Shao et al. 2024): (r - group mean) / (group std + eps), the std with Bessel's correction (as TRL and
    verl compute it). scale=False is Dr.GRPO (Liu et al. 2025): r - group mean, no division, so groups whose
    rewards barely differ are not blown up. (B,) -> (B,)"""
    groups = _groups(scores, group_size)
    centred = groups - groups.mean(-1, keepdim=True)
    if scale:
        centred = centred / (groups.std(-1, keepdim=True) + eps)
    return centred.reshape(-1)


def rloo_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO (Ahmadian et al. 2024): r_i minus the mean of the other G - 1 rewards of its group. (B,) -> (B,)"""
    if group_size < 2:
        raise ValueError("RLOO needs at least 2 samples per prompt")
    groups = _groups(scores, group_size)
    others = (groups.sum(-1, keepdim=True) - groups) / (group_size - 1)
    return (groups - others).reshape(-1)


def zero_variance_groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """(n,) bool: groups whose rewards are all equal (no learning signal under any group baseline; DAPO's dynamic
    sampling drops them)."""
    groups = _groups(scores, group_size)
    return (groups == groups[:, :1]).all(-1)


def per_token(advantages: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """A sequence's advantage at each of its valid tokens: (B,), (B, R) -> (B, R), 0 where masked."""
    return torch.where(response_mask, advantages.unsqueeze(-1), torch.zeros((), dtype=advantages.dtype))


def returns_to_go(rewards: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Sum of the rewards from each valid token to the end of its response (gamma 1): (B, R) -> (B, R), 0 where
    masked. Masked positions add nothing, wherever they are."""
    rewards = torch.where(response_mask, rewards, torch.zeros((), dtype=rewards.dtype))
    to_go = rewards.flip(-1).cumsum(-1).flip(-1)
    return torch.where(response_mask, to_go, torch.zeros((), dtype=rewards.dtype))


def reinforce_pp_advantages(rewards: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """REINFORCE++ (Hu 2025): per-token rewards (the KL penalty at each token, the score at the last) summed to go,
    then whitened over the valid tokens of the whole batch (the global batch: pass every rank's rows). (B, R) ->
    (B, R)"""
    return masked_whiten(returns_to_go(rewards, response_mask), response_mask)


def reinforce_pp_baseline_advantages(scores: torch.Tensor, group_size: int, response_mask: torch.Tensor
                                     ) -> torch.Tensor:
    """REINFORCE++-baseline: the group mean subtracted from each score, spread over the sequence's tokens, then
    whitened over the valid tokens of the whole batch. (B,), (B, R) -> (B, R)"""
    centred = group_advantages(scores, group_size, scale=False)
    return masked_whiten(per_token(centred, response_mask), response_mask)


def advantages(estimator: str, scores: torch.Tensor, group_size: int, response_mask: torch.Tensor,
               kl: torch.Tensor | None = None, kl_coef: float = 0.0, eps: float = 1e-6) -> torch.Tensor:
    """Per-token advantages (B, R) by the estimator's name (one of ESTIMATORS), 0 where masked. scores (B,);
    kl (B, R) and kl_coef are read by reinforce++ alone, whose per-token reward carries the KL penalty."""
    if estimator in ("grpo", "dr-grpo"):
        return per_token(group_advantages(scores, group_size, scale=estimator == "grpo", eps=eps), response_mask)
    if estimator == "rloo":
        return per_token(rloo_advantages(scores, group_size), response_mask)
    if estimator == "reinforce++":
        kl = torch.zeros(response_mask.shape) if kl is None else kl
        return reinforce_pp_advantages(per_token_rewards(scores, kl, kl_coef, response_mask), response_mask)
    if estimator == "reinforce++-baseline":
        return reinforce_pp_baseline_advantages(scores, group_size, response_mask)
    raise ValueError(f"unknown advantage estimator {estimator!r}; expected one of {ESTIMATORS}")


def group_std(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """(n,) each group's reward std (Bessel-corrected, as grpo divides by it)."""
    return _groups(scores, group_size).std(-1)
