"""The RL math (rlhfkit.rl.core, and PPO's own in rlhfkit.ppo.core) against numbers worked out by hand.

Every expected value here is written out literally or computed with plain Python floats and `math`, never with the
torch code under test. Tensors are float64 so that the tolerances can be tight. Masked positions are filled with
garbage (huge numbers, inf, nan) wherever a function promises to ignore them, so a forgotten mask fails loudly.
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from rlhfkit.logprobs import logprobs_from_logits
from rlhfkit.ppo import core as ppo_core
from rlhfkit.rl import core

ATOL = 1e-6
NAN, INF, HUGE = float("nan"), float("inf"), 1e6


# ------------------------------------------------------------------------------------------------------- helpers
def t(rows) -> torch.Tensor:
    """A float64 tensor from nested lists."""
    return torch.tensor(rows, dtype=torch.float64)


def m(rows) -> torch.Tensor:
    """A bool mask from nested lists of 0/1."""
    return torch.tensor(rows, dtype=torch.bool)


def close(got, expected, atol: float = ATOL) -> None:
    """assert_close with an absolute tolerance only; expected may be a nested list or a number."""
    if not isinstance(expected, torch.Tensor):
        expected = torch.tensor(expected, dtype=got.dtype)
    torch.testing.assert_close(got, expected, atol=atol, rtol=0)


def gae_by_hand(values: list[float], rewards: list[float], mask: list[int], gamma: float, lam: float
                ) -> tuple[list[float], list[float]]:
    """One row of GAE in plain Python: walk the valid positions only, back to front; masked positions give 0."""
    valid = [i for i, keep in enumerate(mask) if keep]
    advantages, returns = [0.0] * len(mask), [0.0] * len(mask)
    next_value = next_advantage = 0.0
    for i in reversed(valid):
        delta = rewards[i] + gamma * next_value - values[i]
        next_advantage = delta + gamma * lam * next_advantage
        next_value = values[i]
        advantages[i], returns[i] = next_advantage, next_advantage + values[i]
    return advantages, returns


def ratios_to_logprobs(ratios: list[list[float]], old: list[list[float]]) -> torch.Tensor:
    """logprobs such that exp(logprobs - old) equals the given ratios."""
    return t([[o + math.log(r) for r, o in zip(rr, oo)] for rr, oo in zip(ratios, old)])


# ------------------------------------------------------------------------------------------------------------ GAE
def test_gae_one_row_worked_out_by_hand():
    values, rewards = t([[0.5, 1.0, -0.5]]), t([[0.1, -0.2, 1.0]])
    # gamma = 0.9, lam = 0.8, gamma * lam = 0.72; V after the last token is 0.
    # delta_2 = 1.0  + 0.9 * 0    - (-0.5) =  1.5
    # delta_1 = -0.2 + 0.9 * -0.5 - 1.0    = -1.65
    # delta_0 = 0.1  + 0.9 * 1.0  - 0.5    =  0.5
    # A_2 = 1.5
    # A_1 = -1.65 + 0.72 * 1.5    = -0.57
    # A_0 =  0.5  + 0.72 * -0.57  =  0.0896
    # returns = A + V = [0.5896, 0.43, 1.0]
    advantages, returns = ppo_core.gae(values, rewards, m([[1, 1, 1]]), gamma=0.9, lam=0.8)
    close(advantages, [[0.0896, -0.57, 1.5]], atol=1e-12)
    close(returns, [[0.5896, 0.43, 1.0]], atol=1e-12)


@pytest.mark.parametrize("garbage", [HUGE, -HUGE, NAN, INF])
def test_gae_right_padding_garbage_is_ignored_and_masked_positions_are_zero(garbage):
    mask = m([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    clean_values = t([[0.3, -0.2, 0.7, 1.1], [0.4, 0.9, 0.0, 0.0], [-0.6, 0.0, 0.0, 0.0]])
    clean_rewards = t([[0.0, 0.1, -0.3, 2.0], [0.2, -1.0, 0.0, 0.0], [1.5, 0.0, 0.0, 0.0]])
    dirty_values = torch.where(mask, clean_values, torch.full_like(clean_values, garbage))
    dirty_rewards = torch.where(mask, clean_rewards, torch.full_like(clean_rewards, garbage))

    adv_clean, ret_clean = ppo_core.gae(clean_values, clean_rewards, mask, gamma=0.95, lam=0.9)
    adv_dirty, ret_dirty = ppo_core.gae(dirty_values, dirty_rewards, mask, gamma=0.95, lam=0.9)

    # Exactly equal (not merely close), and exactly 0 where masked.
    torch.testing.assert_close(adv_dirty, adv_clean, atol=0, rtol=0)
    torch.testing.assert_close(ret_dirty, ret_clean, atol=0, rtol=0)
    assert (adv_dirty[~mask] == 0).all() and (ret_dirty[~mask] == 0).all()
    # And both agree with the plain Python loop row by row (a padded row ends where its valid tokens end).
    for row in range(3):
        adv, ret = gae_by_hand(clean_values[row].tolist(), clean_rewards[row].tolist(), mask[row].tolist(), 0.95, 0.9)
        close(adv_dirty[row], adv, atol=1e-12)
        close(ret_dirty[row], ret, atol=1e-12)


def test_gae_hole_in_mask_next_valid_token_plays_t_plus_1():
    # Position 1 and 3 are masked: position 0's successor is position 2, position 2's successor is position 4.
    mask_rows = [[1, 0, 1, 0, 1], [0, 1, 1, 0, 1]]
    values_rows = [[0.5, HUGE, -0.25, NAN, 0.75], [NAN, 0.2, 0.6, -HUGE, -0.4]]
    rewards_rows = [[0.1, NAN, 0.3, HUGE, 1.0], [HUGE, 0.0, -0.5, NAN, 2.0]]
    adv, ret = ppo_core.gae(t(values_rows), t(rewards_rows), m(mask_rows), gamma=0.9, lam=0.8)
    for row in range(2):
        adv_hand, ret_hand = gae_by_hand(values_rows[row], rewards_rows[row], mask_rows[row], 0.9, 0.8)
        close(adv[row], adv_hand, atol=1e-12)
        close(ret[row], ret_hand, atol=1e-12)
    # Row 0 spelled out: delta_4 = 1.0 - 0.75 = 0.25; delta_2 = 0.3 + 0.9*0.75 + 0.25 = 1.225;
    # delta_0 = 0.1 + 0.9*(-0.25) - 0.5 = -0.625. A_4 = 0.25, A_2 = 1.225 + 0.72*0.25 = 1.405,
    # A_0 = -0.625 + 0.72*1.405 = 0.3866.
    close(adv[0], [0.3866, 0.0, 1.405, 0.0, 0.25], atol=1e-12)


def test_gae_gamma_1_lam_1_is_future_reward_sum_minus_value():
    mask_rows = [[1, 1, 1, 1], [1, 1, 1, 0]]
    values_rows = [[0.5, -1.0, 2.0, 0.25], [1.0, 0.0, -0.5, HUGE]]
    rewards_rows = [[0.1, 0.2, -0.4, 1.5], [0.0, 0.3, 0.7, HUGE]]
    adv, ret = ppo_core.gae(t(values_rows), t(rewards_rows), m(mask_rows), gamma=1.0, lam=1.0)
    for row in range(2):
        n = sum(mask_rows[row])
        expected_adv = [sum(rewards_rows[row][i:n]) - values_rows[row][i] for i in range(n)] + [0.0] * (4 - n)
        expected_ret = [sum(rewards_rows[row][i:n]) for i in range(n)] + [0.0] * (4 - n)
        close(adv[row], expected_adv, atol=1e-12)
        # With gamma = lam = 1 the return is the plain reward-to-go, and returns = advantages + values.
        close(ret[row], expected_ret, atol=1e-12)
        close(ret[row, :n], [a + v for a, v in zip(expected_adv[:n], values_rows[row][:n])], atol=1e-12)


# ---------------------------------------------------------------------------------------------- masked statistics
def test_masked_sum_and_mean_ignore_garbage():
    x = t([[1.0, 2.0, NAN], [4.0, INF, -HUGE]])
    mask = m([[1, 1, 0], [1, 0, 0]])
    close(core.masked_sum(x, mask), 7.0)
    close(core.masked_mean(x, mask), 7.0 / 3.0)
    close(core.masked_sum(x, mask, dim=-1), [3.0, 4.0])
    close(core.masked_mean(x, mask, dim=-1), [1.5, 4.0])
    # A row with no valid entry has mean 0, not nan (its count is clamped to 1).
    close(core.masked_mean(x, m([[1, 1, 0], [0, 0, 0]]), dim=-1), [1.5, 0.0])


def test_masked_var_uses_bessel_correction():
    x = t([[1.0, 2.0, HUGE], [3.0, NAN, 4.0]])
    mask = m([[1, 1, 0], [1, 0, 1]])
    # Valid values 1, 2, 3, 4: mean 2.5, squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5.
    close(core.masked_var(x, mask), 5.0 / 3.0, atol=1e-12)
    close(core.masked_var(x, mask, unbiased=False), 5.0 / 4.0, atol=1e-12)
    assert statistics.variance([1.0, 2.0, 3.0, 4.0]) == pytest.approx(5.0 / 3.0)


def test_masked_whiten_hand_values_and_garbage_ignored():
    mask = m([[1, 1, 0], [1, 0, 1]])
    clean = t([[1.0, 2.0, 0.0], [3.0, 0.0, 4.0]])
    dirty = t([[1.0, 2.0, HUGE], [3.0, NAN, 4.0]])
    # Valid 1, 2, 3, 4: mean 2.5, unbiased variance 5/3 (eps 1e-8 is far below the tolerance).
    s = math.sqrt(5.0 / 3.0 + 1e-8)
    expected = [[(1 - 2.5) / s, (2 - 2.5) / s, 0.0], [(3 - 2.5) / s, 0.0, (4 - 2.5) / s]]
    whitened = core.masked_whiten(dirty, mask)
    close(whitened, expected, atol=1e-9)
    torch.testing.assert_close(whitened, core.masked_whiten(clean, mask), atol=0, rtol=0)
    assert (whitened[~mask] == 0).all()
    # shift_mean=False adds the mean back at valid positions (and still 0 where masked).
    expected_shifted = [[e + 2.5 if keep else 0.0 for e, keep in zip(er, mr)]
                        for er, mr in zip(expected, mask.tolist())]
    close(core.masked_whiten(dirty, mask, shift_mean=False), expected_shifted, atol=1e-9)


def test_masked_whiten_valid_entries_get_mean_0_and_unbiased_std_1():
    mask = m([[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]])
    x = t([[0.3, -1.7, 2.2, 5.0, HUGE, NAN], [-0.4, 0.0, 9.5, -HUGE, INF, 3.0]])
    whitened = core.masked_whiten(x, mask)
    valid = whitened[mask].tolist()
    assert len(valid) == 7
    assert statistics.fmean(valid) == pytest.approx(0.0, abs=1e-9)
    assert statistics.stdev(valid) == pytest.approx(1.0, abs=1e-6)  # stdev is the Bessel-corrected one
    assert whitened[~mask].tolist() == [0.0] * 5


def test_explained_variance_by_hand():
    mask = m([[1, 1, 0], [1, 0, 0]])
    returns = t([[1.0, 2.0, HUGE], [4.0, NAN, 0.0]])
    # A perfect critic explains everything, even with garbage values at masked positions.
    assert ppo_core.explained_variance(t([[1.0, 2.0, -HUGE], [4.0, INF, 7.0]]), returns, mask) == pytest.approx(1.0)
    # Predicting the mean of the returns (7/3) explains nothing: Var(returns - 7/3) = Var(returns).
    mean_values = t([[7 / 3, 7 / 3, NAN], [7 / 3, 0.0, 0.0]])
    assert ppo_core.explained_variance(mean_values, returns, mask) == pytest.approx(0.0, abs=1e-12)
    # values [1, 2, 3]: residuals [0, 0, 1] have (Bessel) variance 1/3; returns [1, 2, 4] have 7/3: EV = 6/7.
    assert ppo_core.explained_variance(t([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]]), returns, mask) == pytest.approx(6 / 7)
    # Constant returns: the ratio is undefined.
    assert math.isnan(ppo_core.explained_variance(returns, t([[2.0, 2.0, 0.0], [2.0, 0.0, 0.0]]), mask))


# ------------------------------------------------------------------------------------------------- policy outputs
LOGITS = [[[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]], [[0.2, 0.2, 0.2], [-2.0, 1.5, 0.0]]]


def log_softmax_by_hand(row: list[float]) -> list[float]:
    log_z = math.log(sum(math.exp(v) for v in row))
    return [v - log_z for v in row]


def test_logprobs_from_logits_by_hand():
    labels = torch.tensor([[1, 2], [0, 0]])
    expected = [[log_softmax_by_hand(LOGITS[b][r])[labels[b, r].item()] for r in range(2)] for b in range(2)]
    close(logprobs_from_logits(t(LOGITS), labels), expected, atol=1e-12)
    # First one spelled out: log(e^2 / (e^1 + e^2 + e^0.5)).
    assert expected[0][0] == pytest.approx(2.0 - math.log(math.e + math.e ** 2 + math.exp(0.5)))
    # Uniform logits over V = 3: log(1/3).
    assert expected[1][0] == pytest.approx(-math.log(3.0))


def test_entropy_from_logits_by_hand():
    expected = [[-sum(math.exp(lp) * lp for lp in log_softmax_by_hand(LOGITS[b][r])) for r in range(2)]
                for b in range(2)]
    got = core.entropy_from_logits(t(LOGITS))
    close(got, expected, atol=1e-12)
    close(got[1, 0], math.log(3.0), atol=1e-12)  # uniform over 3: the maximum, log 3


def test_truncate_after_stop():
    pad = 0
    responses = torch.tensor([[5, 6, 2, 7, 8],    # stop at 2
                              [2, 5, 6, 7, 8],    # stop at 0: only the stop token survives
                              [5, 6, 7, 8, 9],    # no stop: untouched
                              [5, 2, 6, 2, 9],    # stop at 1; the second stop at 3 changes nothing
                              [5, 6, 7, 8, 2],    # stop at the last position
                              [5, 6, 7, 8, 9]])   # stop flagged on token 7 (end of a stop string), not on an id 2
    is_stop = responses == 2
    is_stop[5, 2] = True
    out, mask, stopped = core.truncate_after_stop(responses, is_stop, pad)
    assert out.tolist() == [[5, 6, 2, 0, 0],
                            [2, 0, 0, 0, 0],
                            [5, 6, 7, 8, 9],
                            [5, 2, 0, 0, 0],
                            [5, 6, 7, 8, 2],
                            [5, 6, 7, 0, 0]]
    assert mask.tolist() == [[True, True, True, False, False],
                             [True, False, False, False, False],
                             [True, True, True, True, True],
                             [True, True, False, False, False],
                             [True, True, True, True, True],
                             [True, True, True, False, False]]
    assert stopped.tolist() == [True, True, False, True, True, True]
    assert mask.dtype == torch.bool and stopped.dtype == torch.bool
    assert responses[0].tolist() == [5, 6, 2, 7, 8]  # the input is not modified in place


# ------------------------------------------------------------------------------------------------------ the reward
LOGP = [[-1.0, -0.5, -2.0, -0.1]]
REF_LOGP = [[-1.5, -0.5, -1.0, -3.0]]  # r = logp - ref = [0.5, 0, -1, 2.9]


@pytest.mark.parametrize("estimator, formula", [
    ("k1", lambda r: r),
    ("k2", lambda r: r * r / 2),
    ("k3", lambda r: math.exp(-r) - 1 + r),
])
def test_kl_estimators_by_hand(estimator, formula):
    rs = [a - b for a, b in zip(LOGP[0], REF_LOGP[0])]
    got = core.kl_estimate(t(LOGP), t(REF_LOGP), estimator)
    close(got, [[formula(r) for r in rs]], atol=1e-12)
    if estimator == "k1":  # k1 can be negative; k2 and k3 cannot
        assert (got < 0).any()
    else:
        assert (got >= 0).all()


def test_kl_default_is_k1_and_k3_values_written_out():
    close(core.kl_estimate(t(LOGP), t(REF_LOGP)), [[0.5, 0.0, -1.0, 2.9]], atol=1e-12)
    # k3 at r = 0.5: e^-0.5 - 0.5 = 0.10653065971263342; at r = -1: e - 2 = 0.7182818284590451.
    k3 = core.kl_estimate(t(LOGP), t(REF_LOGP), "k3")
    close(k3[0, :3], [0.10653065971263342, 0.0, 0.7182818284590451], atol=1e-12)


def test_kl_unknown_estimator_raises():
    with pytest.raises(ValueError, match="k4"):
        core.kl_estimate(t(LOGP), t(REF_LOGP), "k4")


def test_per_token_rewards_score_at_last_valid_token():
    scores = t([2.0, -1.0, 0.5])
    mask = m([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    kl = t([[0.1, -0.2, 0.3, 0.4], [0.5, 1.0, NAN, HUGE], [-0.3, INF, -INF, NAN]])
    rewards = core.per_token_rewards(scores, kl, 0.1, mask)
    close(rewards, [[-0.01, 0.02, -0.03, -0.04 + 2.0],
                    [-0.05, -0.1 - 1.0, 0.0, 0.0],
                    [0.03 + 0.5, 0.0, 0.0, 0.0]], atol=1e-12)
    assert (rewards[~mask] == 0).all()


# ------------------------------------------------------------------------------------------------------- the losses
# One row of tokens with eps = 0.2: (advantage, ratio, per-token loss, clipped term strictly larger?)
#   A=+1, ratio 1.1 (inside):  max(-1.1, -1.1) = -1.1   not clipped
#   A=+1, ratio 1.5 (above):   max(-1.5, -1.2) = -1.2   clipped
#   A=+1, ratio 0.5 (below):   max(-0.5, -0.8) = -0.5   not clipped (moving away is not capped)
#   A=-2, ratio 0.5 (below):   max( 1.0,  1.6) =  1.6   clipped
#   A=-2, ratio 1.5 (above):   max( 3.0,  2.4) =  3.0   not clipped
#   A=-2, ratio 0.9 (inside):  max( 1.8,  1.8) =  1.8   not clipped
POLICY_ADV = [[1.0, 1.0, 1.0, -2.0, -2.0, -2.0]]
POLICY_RATIO = [[1.1, 1.5, 0.5, 0.5, 1.5, 0.9]]
POLICY_OLD = [[-1.0, -0.5, -2.0, -0.3, -1.2, -0.7]]
POLICY_LOSS = [[-1.1, -1.2, -0.5, 1.6, 3.0, 1.8]]


def test_policy_loss_per_token_by_hand():
    logprobs = ratios_to_logprobs(POLICY_RATIO, POLICY_OLD)
    mask = m([[1] * 6])
    loss, stats = core.policy_loss(logprobs, t(POLICY_OLD), t(POLICY_ADV), mask, cliprange=0.2)
    close(loss, POLICY_LOSS, atol=1e-12)
    close(stats["clipfrac"], 2 / 6, atol=1e-12)
    close(stats["ratio"], sum(POLICY_RATIO[0]) / 6, atol=1e-12)
    close(stats["approx_kl"], sum(0.5 * math.log(r) ** 2 for r in POLICY_RATIO[0]) / 6, atol=1e-12)


def test_policy_loss_stats_count_valid_tokens_only():
    # Row 0: tokens 0-2 valid (ratio 1.5 with A>0 clipped). Row 1: tokens 0-1 valid (ratio 0.5 with A<0 clipped).
    # Masked tokens are all ones that *would* be clipped, with large ratios: 2 of 5 valid are clipped -> 0.4.
    adv = [[1.0, 1.0, 1.0, 1.0], [-2.0, -2.0, 1.0, -1.0]]
    ratio = [[1.1, 1.5, 0.5, 3.0], [0.5, 1.5, 4.0, 0.1]]
    old = [[-1.0, -1.0, -1.0, -1.0], [-2.0, -2.0, -2.0, -2.0]]
    mask = m([[1, 1, 1, 0], [1, 1, 0, 0]])
    _, stats = core.policy_loss(ratios_to_logprobs(ratio, old), t(old), t(adv), mask, cliprange=0.2)
    close(stats["clipfrac"], 0.4, atol=1e-12)
    valid_ratios = [1.1, 1.5, 0.5, 0.5, 1.5]
    close(stats["ratio"], sum(valid_ratios) / 5, atol=1e-12)
    close(stats["approx_kl"], sum(0.5 * math.log(r) ** 2 for r in valid_ratios) / 5, atol=1e-12)


def test_policy_loss_dual_clip():
    # c = 3. A=-2, ratio 10: max(20, 2.4) = 20, capped at -c*A = 6. A=-2, ratio 2: max(4, 2.4) = 4 < 6, kept.
    # A=+1, ratio 10: max(-10, -1.2) = -1.2 and A=+2, ratio 0.1: max(-0.2, -1.6) = -0.2, dual clip leaves A>0 alone.
    adv, ratio, old = [[-2.0, -2.0, 1.0, 2.0]], [[10.0, 2.0, 10.0, 0.1]], [[-3.0, -1.0, -4.0, -0.5]]
    logprobs, mask = ratios_to_logprobs(ratio, old), m([[1, 1, 1, 1]])
    loss, _ = core.policy_loss(logprobs, t(old), t(adv), mask, cliprange=0.2, dual_clip=3.0)
    close(loss, [[6.0, 4.0, -1.2, -0.2]], atol=1e-12)
    plain, _ = core.policy_loss(logprobs, t(old), t(adv), mask, cliprange=0.2)
    close(plain, [[20.0, 4.0, -1.2, -0.2]], atol=1e-12)


def test_policy_loss_clip_higher_and_clip_fractions_low_and_high():
    # cliprange 0.2, cliprange_high 0.28 (DAPO). loss = max(-A r, -A clip(r, 0.8, 1.28)):
    #   A=+1, r=1.25: max(-1.25, -1.25) = -1.25, not clipped (it would be with the symmetric 1.2: -1.2)
    #   A=+1, r=1.5:  max(-1.5, -1.28) = -1.28, clipped high
    #   A=-1, r=0.5:  max(0.5, 0.8) = 0.8, clipped low
    #   A=-1, r=1.5:  max(1.5, 1.28) = 1.5, not clipped (the upper bound never binds for A < 0)
    adv, ratio, old = [[1.0, 1.0, -1.0, -1.0]], [[1.25, 1.5, 0.5, 1.5]], [[-1.0, -2.0, -1.0, -0.5]]
    logprobs, mask = ratios_to_logprobs(ratio, old), m([[1, 1, 1, 1]])
    loss, stats = core.policy_loss(logprobs, t(old), t(adv), mask, cliprange=0.2, cliprange_high=0.28)
    close(loss, [[-1.25, -1.28, 0.8, 1.5]], atol=1e-12)
    close(stats["clipfrac"], 2 / 4, atol=1e-12)
    close(stats["clipfrac_high"], 1 / 4, atol=1e-12)
    close(stats["clipfrac_low"], 1 / 4, atol=1e-12)
    symmetric, stats = core.policy_loss(logprobs, t(old), t(adv), mask, cliprange=0.2)
    close(symmetric, [[-1.2, -1.2, 0.8, 1.5]], atol=1e-12)
    close(stats["clipfrac_high"], 2 / 4, atol=1e-12)


def test_policy_loss_gradient_zero_where_clipped():
    old = t(POLICY_OLD)
    logprobs = ratios_to_logprobs(POLICY_RATIO, POLICY_OLD).requires_grad_(True)
    loss, _ = core.policy_loss(logprobs, old, t(POLICY_ADV), m([[1] * 6]), cliprange=0.2)
    (grad,) = torch.autograd.grad(loss.sum(), logprobs)
    # d/dlogp of -A * exp(logp - old) = -A * ratio where unclipped; 0 where the clamped term won.
    close(grad, [[-1.1, 0.0, -0.5, 0.0, 3.0, 1.8]], atol=1e-12)
    # With dual clip the capped token (A=-2, ratio 10) has no gradient either.
    logprobs = ratios_to_logprobs([[10.0, 2.0]], [[0.0, 0.0]]).requires_grad_(True)
    loss, _ = core.policy_loss(logprobs, t([[0.0, 0.0]]), t([[-2.0, -2.0]]), m([[1, 1]]), 0.2, dual_clip=3.0)
    (grad,) = torch.autograd.grad(loss.sum(), logprobs)
    close(grad, [[0.0, 4.0]], atol=1e-12)


def test_value_loss_by_hand():
    # c = 0.2, v_clip = old + clamp(v - old, -0.2, 0.2), loss = 0.5 * max((v - G)^2, (v_clip - G)^2):
    #   old 1, v 1.5, G 2:   v_clip 1.2,  0.5 * max(0.25, 0.64) = 0.32    clipped
    #   old 1, v 1.1, G 2:   v_clip 1.1,  0.5 * max(0.81, 0.81) = 0.405   not clipped (tie)
    #   old 1, v 1.5, G 0:   v_clip 1.2,  0.5 * max(2.25, 1.44) = 1.125   not clipped
    #   old 0, v -1, G 0.5:  v_clip -0.2, 0.5 * max(2.25, 0.49) = 1.125   not clipped
    #   old 0, v -1, G -3:   v_clip -0.2, 0.5 * max(4.0, 7.84)  = 3.92    clipped
    #   masked: old 0, v 5, G 10: v_clip 0.2, 0.5 * max(25, 96.04) = 48.02, clipped but not counted
    values = t([[1.5, 1.1, 1.5], [-1.0, -1.0, 5.0]])
    old = t([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    returns = t([[2.0, 2.0, 0.0], [0.5, -3.0, 10.0]])
    mask = m([[1, 1, 1], [1, 1, 0]])
    loss, stats = ppo_core.value_loss(values, old, returns, mask, cliprange_value=0.2)
    close(loss, [[0.32, 0.405, 1.125], [1.125, 3.92, 48.02]], atol=1e-12)
    close(stats["vf_clipfrac"], 2 / 5, atol=1e-12)


def test_value_loss_gradient_zero_where_clipped():
    values = t([[1.5, 1.5]]).requires_grad_(True)
    loss, _ = ppo_core.value_loss(values, t([[1.0, 1.0]]), t([[2.0, 0.0]]), m([[1, 1]]), cliprange_value=0.2)
    (grad,) = torch.autograd.grad(loss.sum(), values)
    # Token 0: the clipped term won and does not depend on v -> 0. Token 1: d/dv 0.5 (v - G)^2 = v - G = 1.5.
    close(grad, [[0.0, 1.5]], atol=1e-12)


# --------------------------------------------------------------------------------------------------- aggregation
def test_aggregate_token_mean_vs_seq_mean_by_hand():
    loss = t([[1.0, 2.0, 3.0, NAN], [4.0, HUGE, INF, -INF]])
    mask = m([[1, 1, 1, 0], [1, 0, 0, 0]])
    close(core.aggregate(loss, mask, "token-mean"), (1 + 2 + 3 + 4) / 4, atol=1e-12)       # 2.5
    close(core.aggregate(loss, mask), 2.5, atol=1e-12)                                      # the default
    close(core.aggregate(loss, mask, "seq-mean-token-mean"), ((1 + 2 + 3) / 3 + 4 / 1) / 2, atol=1e-12)  # 3.0
    close(core.aggregate(loss, mask, "token-mean", denominator=8.0), 10 / 8, atol=1e-12)
    close(core.aggregate(loss, mask, "seq-mean-token-mean", denominator=4.0), 6 / 4, atol=1e-12)


def test_aggregate_seq_mean_token_sum_norm_by_hand():
    # Dr.GRPO: each sequence's sum over its valid tokens / 4 (the longest response allowed), then the mean over
    # sequences: (6 / 4 + 4 / 4) / 2 = 1.25; a short and a long response with the same per-token loss weigh by length.
    loss = t([[1.0, 2.0, 3.0, NAN], [4.0, HUGE, INF, -INF]])
    mask = m([[1, 1, 1, 0], [1, 0, 0, 0]])
    close(core.aggregate(loss, mask, "seq-mean-token-sum-norm", token_norm=4), 1.25, atol=1e-12)
    close(core.aggregate(loss, mask, "seq-mean-token-sum-norm", denominator=4.0, token_norm=4), 10 / 4 / 4,
          atol=1e-12)
    with pytest.raises(ValueError, match="token_norm"):
        core.aggregate(loss, mask, "seq-mean-token-sum-norm")


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_aggregate_micro_batches_add_up_to_the_whole(mode):
    loss = t([[1.0, 2.0, 3.0, NAN], [4.0, HUGE, 0.0, 0.0], [0.5, -1.5, 2.5, 7.0], [9.0, 1.0, INF, 0.0]])
    mask = m([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]])
    # The whole minibatch's count: 10 valid tokens, or 4 sequences.
    denominator = 10.0 if mode == "token-mean" else 4.0
    parts = [core.aggregate(loss[s], mask[s], mode, denominator=denominator, token_norm=4)
             for s in (slice(0, 2), slice(2, 4))]
    close(parts[0] + parts[1], core.aggregate(loss, mask, mode, token_norm=4), atol=1e-12)
    expected = {"token-mean": (6 + 4 + 8.5 + 10) / 10, "seq-mean-token-mean": (2 + 4 + 8.5 / 4 + 5) / 4,
                "seq-mean-token-sum-norm": (6 + 4 + 8.5 + 10) / 4 / 4}[mode]
    close(core.aggregate(loss, mask, mode, token_norm=4), expected, atol=1e-12)


def test_aggregate_unknown_mode_raises():
    with pytest.raises(ValueError, match="seq-sum"):
        core.aggregate(t([[1.0]]), m([[1]]), "seq-sum")


# ---------------------------------------------------------------------------------------------- the KL controller
def test_kl_controller_fixed_when_target_is_zero():
    ctl = ppo_core.AdaptiveKLController(0.05, target=0.0)
    for kl in (0.0, 6.0, 100.0):
        ctl.update(kl, 256)
    assert ctl.value == 0.05


@pytest.mark.parametrize("current_kl, error", [
    (12.0, 0.2),     # 12 / 6 - 1 = 1, clipped to 0.2
    (6.6, 0.1),      # 6.6 / 6 - 1 = 0.1, inside the clip
    (6.0, 0.0),      # on target: unchanged
    (4.8, -0.2),     # 4.8 / 6 - 1 = -0.2 exactly
    (0.0, -0.2),     # 0 / 6 - 1 = -1, clipped to -0.2
])
def test_kl_controller_proportional_update(current_kl, error):
    ctl = ppo_core.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(current_kl, 100)
    assert ctl.value == pytest.approx(0.1 * (1 + error * 100 / 10000), rel=1e-12, abs=0)


def test_kl_controller_updates_compound_and_skip_non_finite():
    ctl = ppo_core.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(12.0, 100)
    ctl.update(float("nan"), 100)  # a non-finite KL leaves the coefficient alone
    ctl.update(float("inf"), 100)
    ctl.update(12.0, 100)
    assert ctl.value == pytest.approx(0.1 * 1.002 * 1.002, rel=1e-12, abs=0)


def test_masked_positions_cannot_put_nan_into_gradients():
    """A log ratio that overflows exp() (or a non-finite value) at a masked position leaves the gradient finite."""
    mask = torch.tensor([[True, False]])
    logp = torch.tensor([[-1.1, -5.0]], requires_grad=True)
    loss, _ = core.policy_loss(logp, torch.tensor([[-1.0, -100.0]]), torch.tensor([[0.5, 0.0]]), mask, 0.2)
    core.aggregate(loss, mask).backward()
    # d/dlogp of -A * ratio at the valid token (ratio exp(-0.1) is inside the clip range): -0.5 * exp(-0.1).
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.5 * math.exp(-0.1), 0.0]]), atol=1e-6, rtol=0)
    values = torch.tensor([[1.9, float("inf")]], requires_grad=True)
    vf, _ = ppo_core.value_loss(values, torch.tensor([[2.0, 0.0]]), torch.tensor([[2.5, 0.0]]), mask, 0.2)
    core.aggregate(vf, mask).backward()
    # Unclipped term wins ((1.9-2.5)^2 = 0.36 vs (1.9-2.5)^2 clipped the same): d/dv of 0.5 (v-G)^2 = v - G = -0.6.
    torch.testing.assert_close(values.grad, torch.tensor([[-0.6, 0.0]]), atol=1e-6, rtol=0)
