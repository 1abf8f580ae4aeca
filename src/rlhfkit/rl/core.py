"""The math every RL algorithm shares, as small pure torch functions: tensors and numbers in, tensors out, no config
and no model: masked statistics, entropy, stops, the KL estimate and the per-token reward, the clipped
policy loss and its aggregation. PPO's own (GAE, the value loss, the KL controller) is in ppo/core.py, the critic-free
estimators in grpo/core.py.

Shapes, one notation throughout:
    B  sequences in the batch
    R  response tokens per sequence (responses are right-padded to R)
    V  vocabulary size
    response_mask (B, R) bool: True at a valid response token (up to and including the token that stopped it).
Every function here ignores masked positions: whatever they hold never changes a result.
"""

from __future__ import annotations

import torch

KL_ESTIMATORS = ("k1", "k2", "k3")
LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


# ------------------------------------------------------------------------------------------------ masked statistics
def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    x = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))  # not x*mask: masked inf/nan stay out
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    return masked_sum(x, mask, dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the valid entries of x (with Bessel's correction by default)."""
    n = mask.sum()
    mean = masked_mean(x, mask)
    var = masked_sum((x - mean) ** 2, mask) / n.clamp(min=1)
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the valid entries; masked positions come out as 0."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, torch.zeros_like(whitened))


# -------------------------------------------------------------------------------------------------- policy outputs
def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax at each position: logits (B, R, V) -> (B, R)."""
    logp = logits.log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def truncate_after_stop(responses: torch.Tensor, is_stop: torch.Tensor, pad_id: int
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut each response after its first stop token.

    responses (B, R) long; is_stop (B, R) bool, True where a token ends a response (EOS, a configured stop token, the
    last token of a stop string). Returns (responses with pad after the first stop, response_mask (B, R) with the
    stop token itself valid, stopped (B,) bool: whether the response stopped at all).
    """
    stops_before = is_stop.long().cumsum(-1) - is_stop.long()  # stop tokens strictly before each position
    response_mask = stops_before == 0
    return responses.masked_fill(~response_mask, pad_id), response_mask, is_stop.any(-1)


# ----------------------------------------------------------------------------------------------------- the reward
def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from sampled tokens: (B, R), (B, R) -> (B, R).

    With r = log pi(y) - log pi_ref(y) for y sampled from pi (Schulman, "Approximating KL divergence", 2020):
    k1 = r (unbiased, can be negative), k2 = r^2 / 2 (biased, low variance), k3 = exp(-r) - 1 + r (unbiased, >= 0):
    Schulman's "ratio - 1 - log ratio" with ratio = pi_ref / pi, the inverse of the ratio in r.
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio ** 2
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {KL_ESTIMATORS}")


def per_token_rewards(scores: torch.Tensor, kl: torch.Tensor, kl_coef: float, response_mask: torch.Tensor
                      ) -> torch.Tensor:
    """-kl_coef * kl at every valid token, plus the sequence's score at its last valid token.

    scores (B,), kl (B, R), response_mask (B, R) -> rewards (B, R), 0 at masked positions.
    """
    rewards = torch.where(response_mask, -kl_coef * kl, torch.zeros_like(kl))
    last = _last_valid_index(response_mask)
    return rewards.scatter_add(1, last.unsqueeze(1), scores.to(rewards.dtype).unsqueeze(1))


def _last_valid_index(mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of the last True in each row of mask (B, R) (0 for a row with none)."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask, positions, torch.zeros_like(positions)).max(-1).values


# ---------------------------------------------------------------------------------------------------------- losses
def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                response_mask: torch.Tensor, cliprange: float, dual_clip: float = 0.0,
                cliprange_high: float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate, per token: (B, R) each -> (loss (B, R), stats).

    loss = max(-A * ratio, -A * clip(ratio, 1 - cliprange, 1 + cliprange_high)) with ratio = pi / pi_old;
    cliprange_high defaults to cliprange (DAPO's clip-higher raises it alone, Yu et al. 2025). With dual_clip c > 1
    (Ye et al. 2020), a token with A < 0 loses at most -c * A, so one huge ratio cannot dominate the batch.
    stats (scalars over valid tokens): clipfrac = share of tokens where the clipped term was the larger one (its
    gradient is zero there), split into clipfrac_low (A < 0, ratio below 1 - cliprange) and clipfrac_high (A > 0,
    ratio above 1 + cliprange_high); approx_kl = mean of (log ratio)^2 / 2, ratio = mean ratio.
    """
    high = cliprange if cliprange_high is None else cliprange_high
    # Masked positions get ratio 1: their loss is dropped later, but an overflowing exp there would still put
    # 0 * inf = nan into the gradient.
    log_ratio = torch.where(response_mask, logprobs - old_logprobs, torch.zeros_like(logprobs))
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - cliprange, 1.0 + high)
    loss = torch.maximum(unclipped, clipped)
    if dual_clip > 0:
        loss = torch.where(advantages < 0, torch.minimum(loss, -dual_clip * advantages), loss)
    with torch.no_grad():
        won = clipped > unclipped
        stats = {"clipfrac": masked_mean(won.float(), response_mask),
                 "clipfrac_low": masked_mean((won & (advantages < 0)).float(), response_mask),
                 "clipfrac_high": masked_mean((won & (advantages > 0)).float(), response_mask),
                 "approx_kl": masked_mean(0.5 * log_ratio ** 2, response_mask),
                 "ratio": masked_mean(ratio, response_mask)}
    return loss, stats


def aggregate(loss: torch.Tensor, response_mask: torch.Tensor, mode: str = "token-mean",
              denominator: float | None = None, token_norm: float | None = None) -> torch.Tensor:
    """Reduce a per-token loss (B, R) to a scalar.

    token-mean: sum over valid tokens / number of valid tokens (long responses weigh more; DAPO);
    seq-mean-token-mean: each sequence's mean over its valid tokens, then the mean over sequences (the original GRPO);
    seq-mean-token-sum-norm: each sequence's sum over its valid tokens / `token_norm` (a constant, the longest response
    allowed), then the mean over sequences (Dr.GRPO, Liu et al. 2025: no length bias from a per-sequence mean).
    `denominator` replaces the token (or sequence) count: gradient accumulation passes the count of the whole
    minibatch, so that micro-batches add up to exactly the minibatch's loss.
    """
    if mode == "token-mean":
        total = masked_sum(loss, response_mask)
        count = response_mask.sum()
    elif mode == "seq-mean-token-mean":
        total = (masked_sum(loss, response_mask, dim=-1) / response_mask.sum(-1).clamp(min=1)).sum()
        count = loss.shape[0]
    elif mode == "seq-mean-token-sum-norm":
        if not token_norm:
            raise ValueError("seq-mean-token-sum-norm needs token_norm (the longest response allowed)")
        total = masked_sum(loss, response_mask, dim=-1).sum() / token_norm
        count = loss.shape[0]
    else:
        raise ValueError(f"unknown loss aggregation {mode!r}; expected one of {LOSS_AGGREGATIONS}")
    return total / (denominator if denominator is not None else max(int(count), 1))
