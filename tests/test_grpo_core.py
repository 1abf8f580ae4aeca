"""The critic-free advantage estimators against numbers worked out by hand, and against plain loops."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from rlhfkit.grpo import core

NAN = float("nan")


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def m(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)


def close(got, expected, atol: float = 1e-9) -> None:
    if not isinstance(expected, torch.Tensor):
        expected = torch.tensor(expected, dtype=got.dtype)
    torch.testing.assert_close(got, expected, atol=atol, rtol=0)


# Two groups of G = 3. Group 1: rewards 0, 1, 5 (mean 2, deviations -2, -1, 3, Bessel variance (4 + 1 + 9) / 2 = 7).
# Group 2: 2, 2, 2 (no variance).
SCORES = [0.0, 1.0, 5.0, 2.0, 2.0, 2.0]


def test_grpo_by_hand():
    eps = 1e-6
    std = math.sqrt(7.0)
    expected = [-2 / (std + eps), -1 / (std + eps), 3 / (std + eps), 0.0, 0.0, 0.0]
    close(core.group_advantages(t(SCORES), 3), expected)


def test_dr_grpo_by_hand():
    close(core.group_advantages(t(SCORES), 3, scale=False), [-2.0, -1.0, 3.0, 0.0, 0.0, 0.0])


def test_rloo_by_hand():
    # r_i - mean of the other two: 0 - (1 + 5) / 2 = -3; 1 - (0 + 5) / 2 = -1.5; 5 - (0 + 1) / 2 = 4.5; group 2: 0.
    close(core.rloo_advantages(t(SCORES), 3), [-3.0, -1.5, 4.5, 0.0, 0.0, 0.0])
    # RLOO is the Dr.GRPO advantage times G / (G - 1).
    close(core.rloo_advantages(t(SCORES), 3), core.group_advantages(t(SCORES), 3, scale=False) * 3 / 2)
    with pytest.raises(ValueError, match="at least 2"):
        core.rloo_advantages(t([1.0]), 1)


def test_group_estimators_against_a_plain_loop():
    torch.manual_seed(0)
    scores, G = torch.randn(24, dtype=torch.float64), 4
    grpo, rloo = [], []
    for start in range(0, 24, G):
        group = scores[start:start + G].tolist()
        mean, std = statistics.mean(group), statistics.stdev(group)
        grpo += [(r - mean) / (std + 1e-6) for r in group]
        rloo += [r - (sum(group) - r) / (G - 1) for r in group]
    close(core.group_advantages(scores, G), grpo)
    close(core.rloo_advantages(scores, G), rloo)


def test_groups_must_divide_the_batch():
    with pytest.raises(ValueError, match="groups of 4"):
        core.group_advantages(t(SCORES), 4)


def test_zero_variance_groups():
    assert core.zero_variance_groups(t(SCORES), 3).tolist() == [False, True]
    assert core.zero_variance_groups(t([1.0, 1.0, 0.0, 0.0]), 2).tolist() == [True, True]


def test_per_token_spreads_over_valid_tokens_only():
    close(core.per_token(t([2.0, -1.0]), m([[1, 1, 0], [1, 0, 0]])), [[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]])


def test_returns_to_go_by_hand_with_garbage_in_masked_positions():
    rewards = t([[1.0, 2.0, 3.0, NAN], [0.5, NAN, NAN, NAN]])
    mask = m([[1, 1, 1, 0], [1, 0, 0, 0]])
    close(core.returns_to_go(rewards, mask), [[6.0, 5.0, 3.0, 0.0], [0.5, 0.0, 0.0, 0.0]])


def test_reinforce_pp_whitens_returns_over_the_batchs_valid_tokens():
    # Returns 6, 5, 3 and 0.5: mean 3.625, Bessel variance (2.375^2 + 1.375^2 + 0.625^2 + 3.125^2) / 3.
    rewards = t([[1.0, 2.0, 3.0, NAN], [0.5, NAN, NAN, NAN]])
    mask = m([[1, 1, 1, 0], [1, 0, 0, 0]])
    returns = [6.0, 5.0, 3.0, 0.5]
    mean, std = statistics.mean(returns), statistics.stdev(returns)
    w = [(r - mean) / math.sqrt(std ** 2 + 1e-8) for r in returns]
    close(core.reinforce_pp_advantages(rewards, mask), [[w[0], w[1], w[2], 0.0], [w[3], 0.0, 0.0, 0.0]])


def test_reinforce_pp_baseline_by_hand():
    # Group of 2: scores 1 and 3, mean 2 -> -1 and +1, spread over 2 and 1 valid tokens: -1, -1, +1. Their mean is
    # -1/3, Bessel variance ((2/3)^2 * 2 + (4/3)^2) / 2 = 4/3.
    mask = m([[1, 1], [1, 0]])
    got = core.reinforce_pp_baseline_advantages(t([1.0, 3.0]), 2, mask)
    mean, std = -1 / 3, math.sqrt(4 / 3 + 1e-8)
    close(got, [[(-1 - mean) / std, (-1 - mean) / std], [(1 - mean) / std, 0.0]])


# ------------------------------------------------------------------------------------- the dispatcher and the loss
def test_advantages_by_name_match_the_functions():
    scores, mask = t([1.0, 3.0, 0.0, 0.0, 2.0, 4.0]), m([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0], [1, 0, 0],
                                                        [1, 1, 1]])
    close(core.advantages("grpo", scores, 2, mask), core.per_token(core.group_advantages(scores, 2), mask))
    close(core.advantages("dr-grpo", scores, 3, mask),
          core.per_token(core.group_advantages(scores, 3, scale=False), mask))
    close(core.advantages("rloo", scores, 3, mask), core.per_token(core.rloo_advantages(scores, 3), mask))
    close(core.advantages("reinforce++-baseline", scores, 2, mask),
          core.reinforce_pp_baseline_advantages(scores, 2, mask))
    # reinforce++: the KL penalty enters the reward at every token: -0.5 * kl, and the score at the last token.
    kl = t([[0.2, 0.4, 9.0]] * 6)
    rewards = torch.where(mask, -0.5 * kl, torch.zeros(()))
    for i in range(6):
        rewards[i, int(mask[i].sum()) - 1] += scores[i]
    close(core.advantages("reinforce++", scores, 2, mask, kl, 0.5), core.reinforce_pp_advantages(rewards, mask))
    # dr-grpo by hand: group (0, 0, 2) has mean 2/3
    close(core.advantages("dr-grpo", t([0.0, 0.0, 2.0]), 3, m([[1], [1], [1]])), t([[-2 / 3], [-2 / 3], [4 / 3]]))
    with pytest.raises(ValueError, match="unknown advantage estimator 'ppo'"):
        core.advantages("ppo", scores, 2, mask)


def test_grpo_loss_against_a_plain_loop():
    """The vectorised loss grpo_update builds (clipped surrogate with clip-higher, + beta * k3 to the reference,
    aggregated three ways) against a loop over sequences and tokens, on float64."""
    from rlhfkit.rl.core import aggregate, kl_estimate, policy_loss

    g = torch.Generator().manual_seed(0)
    B, R, G, beta, low, high = 6, 5, 3, 0.04, 0.2, 0.28
    mask = m([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    logp = -torch.rand(B, R, generator=g, dtype=torch.float64) * 3
    old = logp + (torch.rand(B, R, generator=g, dtype=torch.float64) - 0.5) * 0.8  # ratios out to e^0.4
    ref = logp + (torch.rand(B, R, generator=g, dtype=torch.float64) - 0.5)
    scores = t([1.0, 0.0, 2.0, 0.5, 0.5, 3.0])
    adv = core.advantages("grpo", scores, G, mask)
    pg, _ = policy_loss(logp, old, adv, mask, low, 0.0, high)
    per_token_loss = pg + beta * kl_estimate(logp, ref, "k3")

    def loop(mode: str) -> float:
        groups = [scores[i:i + G].tolist() for i in range(0, B, G)]
        per_seq, tokens = [], 0
        for i in range(B):
            group = groups[i // G]
            a = (scores[i].item() - statistics.mean(group)) / (statistics.stdev(group) + 1e-6)
            terms = []
            for k in range(R):
                if not mask[i, k]:
                    continue
                ratio = math.exp(logp[i, k].item() - old[i, k].item())
                surrogate = max(-a * ratio, -a * min(max(ratio, 1 - low), 1 + high))
                r = logp[i, k].item() - ref[i, k].item()
                terms.append(surrogate + beta * (math.exp(-r) - 1 + r))
            per_seq.append(terms)
            tokens += len(terms)
        if mode == "token-mean":
            return sum(sum(s) for s in per_seq) / tokens
        if mode == "seq-mean-token-mean":
            return sum(sum(s) / len(s) for s in per_seq) / B
        return sum(sum(s) / R for s in per_seq) / B  # seq-mean-token-sum-norm, max_new_tokens = R

    for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        assert aggregate(per_token_loss, mask, mode, token_norm=R).item() == pytest.approx(loop(mode), abs=1e-12)
