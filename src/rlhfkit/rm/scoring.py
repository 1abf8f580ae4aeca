"""A reward model's scores of preference pairs and the metrics of those scores: what training evaluates on held-out
pairs and `rlhfkit eval-rm` reports."""

from __future__ import annotations

import torch

from rlhfkit.data.batching import chunks, collate_pairs
from rlhfkit.data.encode import EncodedPair
from rlhfkit.models import autocast
from rlhfkit.rm.losses import pairwise_loss
from rlhfkit.training.distributed import World, gather_share, strided_share


def sequence_scores(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(N,) float32 score of each sequence, read at its last non-pad token."""
    return model(input_ids=input_ids, attention_mask=attention_mask).logits.squeeze(-1).float()


@torch.no_grad()
def score_pairs(model, pairs: list[EncodedPair], pad_id: int, batch_size: int, dtype: str, world: World = World()
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen scores, rejected scores), each (B,); each rank scores a share."""
    model.eval()
    share, _ = strided_share(pairs, world)
    scores = []
    for group in chunks(share, batch_size):
        batch = collate_pairs(group, pad_id)
        with autocast(dtype, world.device):
            both = sequence_scores(model, batch["input_ids"].to(world.device),
                                   batch["attention_mask"].to(world.device))
        scores.append(torch.stack(both.chunk(2), 1).cpu())  # (b, 2): chosen, rejected
    return gather_share(torch.cat(scores), len(pairs), world).unbind(1)


def pair_metrics(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor, loss_name: str
                 ) -> dict[str, float]:
    return {"loss": pairwise_loss(loss_name, chosen, rejected, margin).mean().item(),
            "accuracy": (chosen > rejected).float().mean().item(), "chosen_score": chosen.mean().item(),
            "rejected_score": rejected.mean().item(), "margin": (chosen - rejected).mean().item()}
