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


def to_device(batch: dict, device) -> dict:
    """A batch with its tensors on `device` (its numbers as they are)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


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


def collate_pair_rows(pairs: list, pad_id: int) -> dict:
    """Encoded pairs (chosen, rejected, margin), one row per pair, so that the prompt both sequences share is computed
    once: that prompt, the rest of the chosen sequence, the rest of the rejected one, then padding to L. The rejected
    tokens attend to the prompt and to each other but not to the chosen tokens, and their positions go on from the
    prompt's: every token sees what it sees in its own sequence. On HH-RLHF's dialogues, where the prompt is most of a
    pair, a batch of rows is about 60% of the tokens of the chosen and rejected sequences padded apart.

    input_ids, position_ids (B, L) long; attention_mask (B, 1, L, L) bool, True where query i attends key j (a pad
    position attends itself, so that no softmax row is empty); loss_mask (B, L) bool, True at a token whose log-prob
    counts; source (B, L) long, the position whose logits predict the token here; segment (B, L) long, 2i for pair i's
    chosen tokens and 2i + 1 for its rejected ones; ends (B, 2) long, the positions of the chosen and rejected
    sequences' last tokens (where a reward model reads its score); margin (B,); num_items B; num_sequences 2B;
    num_tokens the tokens of the 2B sequences."""
    rows = []
    for chosen, rejected, _ in pairs:
        n, c, r = shared_prompt_len(chosen, rejected), len(chosen.input_ids), len(rejected.input_ids)
        rows.append((chosen, rejected, n, c, r))
    L = max(c + r - n for _, _, n, c, r in rows)
    B = len(rows)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    position_ids = torch.zeros((B, L), dtype=torch.long)
    part = torch.full((B, L), 3, dtype=torch.long)  # 0 prompt, 1 chosen, 2 rejected, 3 padding
    loss_mask = torch.zeros((B, L), dtype=torch.bool)
    source = torch.zeros((B, L), dtype=torch.long)
    ends = torch.zeros((B, 2), dtype=torch.long)
    for i, (chosen, rejected, n, c, r) in enumerate(rows):
        input_ids[i, :c] = torch.tensor(chosen.input_ids, dtype=torch.long)
        input_ids[i, c:c + r - n] = torch.tensor(rejected.input_ids[n:], dtype=torch.long)
        position_ids[i, :c + r - n] = torch.cat([torch.arange(c), torch.arange(n, r)])
        part[i, :n], part[i, n:c], part[i, c:c + r - n] = 0, 1, 2
        # A sequence's first token has no predecessor and never counts.
        loss_mask[i, 1:c] = torch.tensor(chosen.loss_mask[1:], dtype=torch.bool)
        loss_mask[i, c + max(0, 1 - n):c + r - n] = torch.tensor(rejected.loss_mask[max(n, 1):], dtype=torch.bool)
        source[i, 1:c] = torch.arange(c - 1)
        if r > n:
            source[i, c:c + r - n] = torch.cat([torch.tensor([n - 1]), torch.arange(c, c + r - n - 1)])
        ends[i] = torch.tensor([c - 1, c + r - n - 1 if r > n else n - 1])
    index = torch.arange(L)
    same_part = (part[:, None, :] == part[:, :, None]) | (part[:, None, :] == 0)  # (B, query, key)
    attention_mask = (index[None, :] <= index[:, None]) & same_part & (part[:, None, :] != 3)
    attention_mask |= torch.eye(L, dtype=torch.bool)
    segment = 2 * torch.arange(B)[:, None] + (part == 2).long()
    return {"input_ids": input_ids, "position_ids": position_ids, "attention_mask": attention_mask[:, None],
            "loss_mask": loss_mask, "source": source, "segment": segment, "ends": ends,
            "margin": torch.tensor([p[2] for p in pairs], dtype=torch.float32), "num_items": B,
            "num_sequences": 2 * B, "num_tokens": sum(c + r for _, _, _, c, r in rows)}
