"""Log-probabilities of tokens under a causal LM. SFT's loss, the held-out loss, PTX, DPO's sequence scores and the RL
code's per-token log-probs are this one computation.

Shapes: B sequences (or rows of several, `segment_logprobs`), T tokens (right-padded), V vocabulary; loss_mask (B, T)
True at a token whose log-prob counts (a response token or its EOS); N = the number of such tokens in the batch; S
sequences in the batch's rows.
"""

from __future__ import annotations

import inspect

import torch

from rlhfkit.models import transformers_model


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


def segment_logprobs(model: torch.nn.Module, batch: dict, n_segments: int) -> tuple[torch.Tensor, torch.Tensor]:
    """As `sequence_logprobs`, for rows that hold several sequences (`collate_pair_rows`): the sum of each sequence's
    token log-probs (S,) float32 and their count (S,).

    batch: input_ids, position_ids, loss_mask, source, segment (B, T) and attention_mask (B, 1, T, T); the token at
    (b, t) is predicted by the logits at (b, source[b, t]) and belongs to sequence segment[b, t]. Logits are computed
    only from the first position that predicts a counted token (`logits_to_keep`), not for the prompt before it."""
    rows, cols = batch["loss_mask"].nonzero(as_tuple=True)  # (N,) each
    sources = batch["source"][rows, cols]
    T = batch["input_ids"].shape[1]
    first = int(sources.min()) if len(sources) and _keeps_logits(model) else 0
    kwargs = {"logits_to_keep": T - first} if first else {}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"], **kwargs).logits  # (B, T - first, V)
    token = logprobs_from_logits(logits[rows, sources - first].float(), batch["input_ids"][rows, cols])  # (N,)
    segments = batch["segment"][rows, cols]
    sums = torch.zeros(n_segments, dtype=torch.float32, device=token.device).index_add(0, segments, token)
    counts = torch.zeros(n_segments, dtype=torch.float32, device=token.device).index_add(
        0, segments, torch.ones_like(token))
    return sums, counts


def _keeps_logits(model: torch.nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(transformers_model(model).forward).parameters
