"""Pairwise reward-model losses (Bradley-Terry), pure torch.

Shapes: B = number of preference pairs. `chosen` and `rejected` are the scores r_c and r_r, each (B,); `margin` is
(B,) or a number. Both losses equal -log sigmoid(r_c - r_r - margin) in exact arithmetic; they are kept under the names
the seed documents use (ColossalChat's `log_sig` and `log_exp`), computed the two ways those projects write them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("log_sig", "log_exp")


def log_sigmoid_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | float = 0.0) -> torch.Tensor:
    """-log sigmoid(r_c - r_r - margin), per pair, shape (B,). Llama 2 (Touvron et al. 2023) adds the margin."""
    return -F.logsigmoid(chosen - rejected - margin)


def log_exp_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | float = 0.0) -> torch.Tensor:
    """log(1 + exp(r_r - r_c + margin)), per pair, shape (B,); softplus keeps it finite for large differences."""
    return F.softplus(rejected - chosen + margin)


def pairwise_loss(name: str, chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | float = 0.0
                  ) -> torch.Tensor:
    if name == "log_sig":
        return log_sigmoid_loss(chosen, rejected, margin)
    if name == "log_exp":
        return log_exp_loss(chosen, rejected, margin)
    raise ValueError(f"unknown reward-model loss {name!r} (expected one of {LOSSES})")
