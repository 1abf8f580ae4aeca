"""Batch order as a pure function of (seed, step), and padded tensors for training.

The stream of example indices is an endless run of seeded permutations (one per epoch); optimizer step `s` takes items
`s*B .. s*B+B-1` of it. So the data position of a run is its step number alone: resuming needs no sampler state, and
any split of a step's indices (micro-batches, ranks) sees the same global batch.
"""

from __future__ import annotations

from functools import lru_cache

import torch


@lru_cache(maxsize=8)
def _permutation(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return tuple(torch.randperm(n, generator=generator).tolist())


def step_indices(n: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Indices into a dataset of `n` items for optimizer step `step` (0-based)."""
    out = []
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(position, n)
        out.append(_permutation(n, seed, epoch)[offset])
    return out


def chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def pad_right(sequences: list[list[int]], pad_id: int, masks: list[list[bool]] | None = None
              ) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask (and loss_mask when masks are given), each (B, T) with T the longest sequence."""
    longest = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for i, seq in enumerate(sequences):
        input_ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[i, : len(seq)] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if masks is not None:
        loss_mask = torch.zeros((len(sequences), longest), dtype=torch.bool)
        for i, m in enumerate(masks):
            loss_mask[i, : len(m)] = torch.tensor(m, dtype=torch.bool)
        batch["loss_mask"] = loss_mask
    return batch


def collate_pairs(pairs: list, pad_id: int) -> dict:
    """Encoded pairs (chosen, rejected, margin) as one batch: input_ids, attention_mask, loss_mask (2B, T), the B
    chosen sequences then the B rejected ones; margin (B,); num_items B."""
    sequences = [p[0] for p in pairs] + [p[1] for p in pairs]
    batch = pad_right([e.input_ids for e in sequences], pad_id, [e.loss_mask for e in sequences])
    batch["margin"] = torch.tensor([p[2] for p in pairs], dtype=torch.float32)
    batch["num_items"] = len(pairs)
    return batch


def shared_prompt_len(chosen, rejected) -> int:
    """How many leading tokens a pair's two encoded sequences share before either carries loss: their common prompt."""
    n, limit = 0, min(len(chosen.input_ids), len(rejected.input_ids))
    while (n < limit and chosen.input_ids[n] == rejected.input_ids[n] and not chosen.loss_mask[n]
           and not rejected.loss_mask[n]):
        n += 1
    return n


def collate_pairs_shared(pairs: list, pad_id: int) -> dict | None:
    """Encoded pairs (chosen, rejected, margin) laid out so that each pair's prompt can be computed once for its two
    responses: rows 2i and 2i + 1 are pair i's chosen and rejected sequence, its shared prompt left-padded to P and
    the rest right-padded to R. input_ids, attention_mask (2B, P + R); response_mask (2B, R) True where a token's
    log-prob counts; prompt_len P; num_items B. None when a pair's sequences share no first token (then
    `collate_pairs`)."""
    splits = [shared_prompt_len(chosen, rejected) for chosen, rejected, _ in pairs]
    if min(splits) == 0:
        return None
    P = max(splits)
    rows = [(sequence, n) for (chosen, rejected, _), n in zip(pairs, splits) for sequence in (chosen, rejected)]
    R = max(len(sequence.input_ids) - n for sequence, n in rows)
    input_ids = torch.full((len(rows), P + R), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), P + R), dtype=torch.long)
    response_mask = torch.zeros((len(rows), R), dtype=torch.bool)
    for i, (sequence, n) in enumerate(rows):
        k = len(sequence.input_ids) - n
        input_ids[i, P - n:P + k] = torch.tensor(sequence.input_ids, dtype=torch.long)
        attention_mask[i, P - n:P + k] = 1
        response_mask[i, :k] = torch.tensor(sequence.loss_mask[n:], dtype=torch.bool)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask,
            "prompt_len": P, "num_items": len(pairs)}
