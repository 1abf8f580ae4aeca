"""Offline preference losses (DPO and its variants) as pure torch functions of sequence log-probabilities.

Shapes, one notation throughout: B preference pairs; every input and output is (B,).
    chosen_logps, rejected_logps          log pi(y | x) of each response under the trained policy, summed over its
                                          tokens (EOS included; the prompt never counts)
    ref_chosen_logps, ref_rejected_logps  the same under the frozen reference
    chosen_tokens, rejected_tokens        each response's length in tokens
    delta                                 (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOSSES = ("sigmoid", "robust", "ipo", "simpo")
REFERENCE_FREE = ("simpo",)


def sigmoid_loss(delta: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO (Rafailov et al. 2023): -log sigmoid(beta delta). With label smoothing eps, cDPO (Mitchell 2023), which
    takes each label to be flipped with probability eps: -(1 - eps) log sigmoid(beta delta) - eps log sigmoid(-beta
    delta)."""
    return -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)


def robust_loss(delta: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """Robust DPO (Chowdhury et al. 2024): the unbiased estimate of the clean loss when labels flip with probability
    eps, [(1 - eps) l(beta delta) - eps l(-beta delta)] / (1 - 2 eps), with l(z) = -log sigmoid(z)."""
    clean, flipped = -F.logsigmoid(beta * delta), -F.logsigmoid(-beta * delta)
    return ((1 - label_smoothing) * clean - label_smoothing * flipped) / (1 - 2 * label_smoothing)


def ipo_loss(delta_per_token: torch.Tensor, beta: float) -> torch.Tensor:
    """IPO (Azar et al. 2023, Eq. 17 with tau = beta): (h - 1 / (2 beta))^2, where h is `delta` with each response's
    log-ratio divided by its length, the form the authors' results use (and TRL implements)."""
    return (delta_per_token - 1 / (2 * beta)) ** 2


def simpo_loss(chosen_avg: torch.Tensor, rejected_avg: torch.Tensor, beta: float, gamma: float,
               label_smoothing: float = 0.0) -> torch.Tensor:
    """SimPO (Meng et al. 2024), reference-free: -log sigmoid(beta (chosen_avg - rejected_avg) - gamma) on the
    length-averaged log-probs, gamma the target reward margin; label smoothing as in `sigmoid_loss`."""
    z = beta * (chosen_avg - rejected_avg) - gamma
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def nll_loss(chosen_logps: torch.Tensor, chosen_tokens: torch.Tensor) -> torch.Tensor:
    """The chosen response's negative log-likelihood per token: RPO's added term (Pang et al. 2024)."""
    return -chosen_logps / chosen_tokens.clamp(min=1)


@dataclass(frozen=True)
class PreferenceLoss:
    """Which loss, and its numbers: what the training loop reads of the config."""
    name: str  # one of LOSSES
    beta: float
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.0
    rpo_alpha: float = 0.0  # weight of the chosen response's NLL; 0: none

    @property
    def uses_reference(self) -> bool:
        return self.name not in REFERENCE_FREE


def preference_loss(settings: PreferenceLoss, chosen_logps: torch.Tensor, rejected_logps: torch.Tensor,
                    ref_chosen_logps: torch.Tensor | None, ref_rejected_logps: torch.Tensor | None,
                    chosen_tokens: torch.Tensor, rejected_tokens: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, chosen reward, rejected reward), each (B,). The rewards are the implicit ones users know from TRL:
    beta x the log-ratio to the reference, or for SimPO beta x the length-averaged log-prob; detached."""
    s = settings
    if s.name == "simpo":
        chosen_avg = chosen_logps / chosen_tokens.clamp(min=1)
        rejected_avg = rejected_logps / rejected_tokens.clamp(min=1)
        loss = simpo_loss(chosen_avg, rejected_avg, s.beta, s.simpo_gamma, s.label_smoothing)
        chosen_reward, rejected_reward = s.beta * chosen_avg, s.beta * rejected_avg
    else:
        chosen_ratio, rejected_ratio = chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps
        if s.name == "sigmoid":
            loss = sigmoid_loss(chosen_ratio - rejected_ratio, s.beta, s.label_smoothing)
        elif s.name == "robust":
            loss = robust_loss(chosen_ratio - rejected_ratio, s.beta, s.label_smoothing)
        elif s.name == "ipo":
            loss = ipo_loss(chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1),
                            s.beta)
        else:
            raise ValueError(f"unknown preference loss {s.name!r} (expected one of {LOSSES})")
        chosen_reward, rejected_reward = s.beta * chosen_ratio, s.beta * rejected_ratio
    if s.rpo_alpha:
        loss = loss + s.rpo_alpha * nll_loss(chosen_logps, chosen_tokens)
    return loss, chosen_reward.detach(), rejected_reward.detach()
