"""The language-model loss on the trained tokens of right-padded examples: SFT's objective, PPO's PTX term, and the
held-out loss and perplexity every stage that trains a causal LM reports.

Shapes: B examples, T tokens (right-padded), V vocabulary; loss_mask (B, T) True at a token that carries loss.
"""

from __future__ import annotations

import math

import torch

from rlhfkit.data.batching import chunks, pad_right
from rlhfkit.data.encode import Encoded
from rlhfkit.logprobs import sequence_logprobs
from rlhfkit.models import autocast
from rlhfkit.training.distributed import World, gather_share, strided_share


def sft_loss(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
    """Sum over trained tokens of -log p(token | previous tokens).

    batch: input_ids, attention_mask, loss_mask, each (B, T); loss_mask True where a token is trained.
    """
    return example_losses(model, batch)[0].sum(), {}


def collate(examples: list[Encoded], pad_id: int) -> dict:
    batch = pad_right([e.input_ids for e in examples], pad_id, [e.loss_mask for e in examples])
    batch["num_items"] = int(batch["loss_mask"][:, 1:].sum())
    return batch


def example_losses(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed token loss, trained tokens) of each example, each (B,)."""
    logprobs, tokens = sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    return -logprobs, tokens


@torch.no_grad()
def evaluate(model, examples: list[Encoded], pad_id: int, batch_size: int, dtype: str, world: World = World()
             ) -> dict[str, float]:
    """Mean token loss and perplexity on held-out examples (each rank scores a share)."""
    model.eval()
    share, _ = strided_share(examples, world)
    per_example = []
    for group in chunks(share, batch_size):
        batch = {k: v.to(world.device) for k, v in collate(group, pad_id).items() if isinstance(v, torch.Tensor)}
        with autocast(dtype, world.device):
            per_example.append(torch.stack(example_losses(model, batch), 1).cpu())
    total, count = gather_share(torch.cat(per_example), len(examples), world).sum(0).tolist()
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
