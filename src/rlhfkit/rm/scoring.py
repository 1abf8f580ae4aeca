"""A reward model's scores of preference pairs and the metrics of those scores: what training evaluates on held-out
pairs and `rlhfkit eval-rm` reports."""

from __future__ import annotations

import torch

from rlhfkit.data.batching import chunks, collate_pair_rows, collate_pairs, to_device
from rlhfkit.data.encode import EncodedPair
from rlhfkit.models import autocast, is_peft, score_head, takes_pair_rows
from rlhfkit.rm.losses import pairwise_loss
from rlhfkit.training.distributed import World, gather_share, strided_share, unwrap


def batch_scores(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """(B, 2) chosen and rejected scores of B pairs, laid out by `collate_pair_rows` or `collate_pairs`."""
    if "ends" in batch:
        return pair_scores(model, batch)
    return torch.stack(sequence_scores(model, batch["input_ids"], batch["attention_mask"]).chunk(2), 1)


def sequence_scores(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(N,) float32 score of each sequence, read at its last non-pad token."""
    return model(input_ids=input_ids, attention_mask=attention_mask).logits.squeeze(-1).float()


def pair_scores(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """(B, 2) float32 scores of the chosen and rejected sequences of a batch of pair rows (`collate_pair_rows`): the
    head's output at each sequence's last token. The head's output at every position is read inside the model's own
    forward (which DDP and FSDP wrap); the classifier's pooled output, at the row's last token, is not used."""
    inner = unwrap(model)
    inner = inner.base_model.model if is_peft(inner) else inner
    outputs = []
    hook = score_head(inner).register_forward_hook(lambda module, args, out: outputs.append(out))
    try:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
              position_ids=batch["position_ids"])
    finally:
        hook.remove()
    return outputs[-1].squeeze(-1).float().gather(1, batch["ends"])  # (B, T) -> (B, 2)


@torch.no_grad()
def score_pairs(model, pairs: list[EncodedPair], pad_id: int, batch_size: int, dtype: str, world: World = World()
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen scores, rejected scores), each (B,); each rank scores a share."""
    model.eval()
    share, _ = strided_share(pairs, world)
    scores = []
    rows = takes_pair_rows(model)
    for group in chunks(share, batch_size):
        batch = to_device(collate_pair_rows(group, pad_id) if rows else collate_pairs(group, pad_id), world.device)
        with autocast(dtype, world.device):
            scores.append(batch_scores(model, batch).cpu())  # (b, 2): chosen, rejected
    return gather_share(torch.cat(scores), len(pairs), world).unbind(1)


def pair_metrics(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor, loss_name: str
                 ) -> dict[str, float]:
    return {"loss": pairwise_loss(loss_name, chosen, rejected, margin).mean().item(),
            "accuracy": (chosen > rejected).float().mean().item(), "chosen_score": chosen.mean().item(),
            "rejected_score": rejected.mean().item(), "margin": (chosen - rejected).mean().item()}
