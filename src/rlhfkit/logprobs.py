"""Log-probabilities of tokens under a causal LM. SFT's loss, the held-out loss, PTX, DPO's sequence scores and the RL
code's per-token log-probs are this one computation.

Shapes: B sequences, T tokens (right-padded), V vocabulary; loss_mask (B, T) True at a token whose log-prob counts (a
response token or its EOS); N = the number of such tokens in the batch.
"""

from __future__ import annotations

import torch


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(labels): logits (..., V) float, labels (...) long -> (...). (The logit minus the log-sum-exp: no
    log-softmax of the whole vocabulary is kept.)"""
    return logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


def sequence_logprobs(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log p(token | previous tokens) over each sequence's loss_mask tokens (B,) float32, their count (B,)).

    Only the N positions that carry loss are taken to float32 and through the log-softmax, not all B x T."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, T, V)
    targets = loss_mask[:, 1:]  # token t+1 is predicted at position t
    token = logprobs_from_logits(logits[:, :-1][targets].float(), input_ids[:, 1:][targets])  # (N,)
    rows = targets.nonzero()[:, 0]  # (N,) the sequence each token belongs to
    sums = torch.zeros(len(targets), dtype=torch.float32, device=token.device).index_add(0, rows, token)
    return sums, targets.sum(1).float()
