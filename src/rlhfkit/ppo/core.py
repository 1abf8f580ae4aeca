"""PPO's own math as small pure torch functions: GAE, the clipped value loss, the critic's explained variance and the
adaptive KL coefficient. What the RL algorithms share (log-probs, KL, the policy loss, aggregation) is in rl/core.py.

Shapes, as in rl/core.py: B sequences, R response tokens; response_mask (B, R) bool, True at a valid token. Masked
positions never change a result.
"""

from __future__ import annotations

import math

import torch

from rlhfkit.rl.core import masked_mean, masked_var


# -------------------------------------------------------------------------------------------------------- the critic
def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(returns - values) / Var(returns) over valid tokens: 1 is a perfect critic, <= 0 no better than a mean."""
    var_returns = masked_var(returns, mask).item()
    if var_returns == 0:
        return float("nan")
    return 1.0 - masked_var(returns - values, mask).item() / var_returns


def gae(values: torch.Tensor, rewards: torch.Tensor, response_mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over valid tokens only: (advantages, returns), each (B, R).

    values (B, R): V(s_t), the critic's value before response token t; rewards (B, R); response_mask (B, R).
    delta_t = r_t + gamma * V(s_t+1) - V(s_t); A_t = delta_t + gamma * lam * A_t+1; returns = A + V. Masked positions
    are skipped (the next valid token plays the role of t+1; after the last one V = 0 and A = 0) and come out as 0.
    """
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        valid = response_mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = torch.where(valid, advantage, torch.zeros_like(advantage))
        next_value = torch.where(valid, values[:, t], next_value)
        next_advantage = torch.where(valid, advantage, next_advantage)
    returns = torch.where(response_mask, advantages + values, torch.zeros_like(values))
    return advantages, returns


# ---------------------------------------------------------------------------------------------------------- losses
def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, response_mask: torch.Tensor,
               cliprange_value: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss, per token: (B, R) each -> (loss (B, R), stats).

    loss = max((V - G)^2, (V_old + clip(V - V_old, -c, c) - G)^2) / 2: the critic cannot move further than c from
    the values that made the advantages in one round. stats: vf_clipfrac = share of tokens where the clipped term won.
    """
    values = torch.where(response_mask, values, returns)  # masked positions: zero loss and a finite zero gradient
    clipped_values = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    unclipped = (values - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    loss = 0.5 * torch.maximum(unclipped, clipped)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean((clipped > unclipped).float(), response_mask)}
    return loss, stats


# ------------------------------------------------------------------------------------------------ the KL coefficient
class AdaptiveKLController:
    """The KL coefficient: fixed, or adapted towards a target KL (Ziegler et al. 2019, "Fine-Tuning Language Models
    from Human Preferences", section 2.2): beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon),
    where KL is the mean per-sequence KL of the last batch and n its number of sequences. target 0 = fixed beta."""

    def __init__(self, init_coef: float, target: float = 0.0, horizon: int = 10000):
        self.value, self.target, self.horizon = init_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        if self.target <= 0 or not math.isfinite(current_kl):
            return
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon
