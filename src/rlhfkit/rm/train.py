"""Stage 2, reward model: a one-label sequence classifier trained on preference pairs.

The score of a sequence is the head's output at its last non-pad token (the EOS after the response), as Hugging Face's
`*ForSequenceClassification` computes it; chosen and rejected sequences of a batch go through one forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from rlhfkit.config import ConfigError, option
from rlhfkit.data.batching import chunks, pad_right, step_indices
from rlhfkit.data.encode import EncodeStats, Encoded, encode_pair
from rlhfkit.data.formats import PreferencePair
from rlhfkit.data.templates import resolve_template
from rlhfkit.models import autocast, load_sequence_classifier, load_tokenizer
from rlhfkit.rm.losses import LOSSES, pairwise_loss
from rlhfkit.training.common import (SupervisedConfig, checkpoint_saver, load_train_eval, log, optimization,
                                     save_final, setup_logging, start_run, with_lora)
from rlhfkit.training.distributed import World, gather_share, rank_share, strided_share, wrap_model
from rlhfkit.training.loop import fit
from rlhfkit.training.metrics import RunLogger

EncodedPair = tuple[Encoded, Encoded, float]  # chosen, rejected, margin


@dataclass
class RMConfig(SupervisedConfig):
    lr: float = option(1e-5, "peak learning rate (AdamW)", group="training")
    loss: str = option("log_sig", "pairwise loss: log_sig = -log sigmoid(r_c - r_r - margin), log_exp = "
                                  "log(1 + exp(r_r - r_c + margin))", group="training", choices=LOSSES)


def encode_pairs(pairs: list[PreferencePair], tokenizer, template: str, max_len: int, stats: EncodeStats
                 ) -> list[EncodedPair]:
    out = []
    for pair in pairs:
        encoded = encode_pair(pair, tokenizer, template, max_len, stats)
        if encoded is not None:
            out.append((encoded[0], encoded[1], pair.margin))
    return out


def collate_pairs(pairs: list[EncodedPair], pad_id: int) -> dict:
    """input_ids, attention_mask (2B, T): the B chosen sequences, then the B rejected ones; margin (B,)."""
    batch = pad_right([p[0].input_ids for p in pairs] + [p[1].input_ids for p in pairs], pad_id)
    batch["margin"] = torch.tensor([p[2] for p in pairs], dtype=torch.float32)
    batch["num_items"] = len(pairs)
    return batch


def sequence_scores(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(N,) float32 score of each sequence, read at its last non-pad token."""
    return model(input_ids=input_ids, attention_mask=attention_mask).logits.squeeze(-1).float()


def rm_loss_fn(loss_name: str):
    def loss_fn(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        scores = sequence_scores(model, batch["input_ids"], batch["attention_mask"])
        chosen, rejected = scores.chunk(2)
        losses = pairwise_loss(loss_name, chosen, rejected, batch["margin"])
        with torch.no_grad():
            stats = {"accuracy": (chosen > rejected).float().sum().item(), "chosen_score": chosen.sum().item(),
                     "rejected_score": rejected.sum().item(), "margin": (chosen - rejected).sum().item()}
        return losses.sum(), stats

    return loss_fn


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


def run_rm(config: RMConfig) -> Path:
    """Train and write OUTPUT/final (Hugging Face format, with the score mean and std for PPO)."""
    setup_logging()
    out, resume, world = start_run(config, "rm")

    train_rows, eval_rows = load_train_eval(config, "preference", out)
    tokenizer = load_tokenizer(config.model)
    template = resolve_template(config.template, tokenizer)
    stats = EncodeStats()
    train_set = encode_pairs(train_rows, tokenizer, template, config.max_len, stats)
    eval_set = encode_pairs(eval_rows, tokenizer, template, config.max_len, EncodeStats())
    log.info(f"template {template}; tokenized {stats.describe()}")
    if not train_set:
        raise ConfigError(f"max_len: no training pair fits in {config.max_len} tokens")

    model = load_sequence_classifier(config.model, tokenizer, attn_implementation=config.attn_implementation,
                                     gradient_checkpointing=config.gradient_checkpointing, seed=config.seed)
    model = with_lora(model, config, "SEQ_CLS")
    model = wrap_model(model, world, dtype=config.dtype, cpu_offload=config.fsdp_cpu_offload)
    optimizer, scheduler, steps, start = optimization(model, config, len(train_set), resume, world)
    pad = tokenizer.pad_token_id

    def step_batches(step: int) -> list[dict]:
        indices = rank_share(step_indices(len(train_set), config.batch_size, config.seed, step), world)
        return [collate_pairs([train_set[i] for i in part], pad) for part in chunks(indices, config.micro)]

    def eval_fn() -> dict[str, float]:
        if not eval_set:
            return {}
        chosen, rejected = score_pairs(model, eval_set, pad, config.micro, config.dtype, world)
        return pair_metrics(chosen, rejected, torch.tensor([p[2] for p in eval_set]), config.loss)

    logger = RunLogger(out, total_steps=steps, start_step=start, desc="rm", wandb_project=config.wandb_project,
                       enabled=world.main)
    try:
        fit(model, loss_fn=rm_loss_fn(config.loss), step_batches=step_batches, optimizer=optimizer,
            scheduler=scheduler, start_step=start, max_steps=steps, max_grad_norm=config.max_grad_norm,
            dtype=config.dtype, logger=logger, eval_fn=eval_fn, eval_every=config.eval_every,
            save_fn=checkpoint_saver(out, model, optimizer, scheduler, config, "rm", world),
            save_every=config.save_every, log_every=config.log_every, max_bad_steps=config.max_bad_steps, world=world,
            stage="rm")
    finally:
        logger.close()

    # PPO normalises rewards with the score distribution on held-out responses (training pairs if none are held out).
    reference = eval_set or train_set[:512]
    chosen, rejected = score_pairs(model, reference, pad, config.micro, config.dtype, world)
    scores = torch.cat([chosen, rejected])
    reward_stats = {"mean": scores.mean().item(), "std": scores.std().item() if len(scores) > 1 else 1.0,
                    "count": len(scores)}

    def fresh_model():  # FSDP's gathered weights are written through an unsharded copy
        return with_lora(load_sequence_classifier(config.model, tokenizer, seed=config.seed), config, "SEQ_CLS")

    final = save_final(model, tokenizer, out / "final", world, fresh_model, merge_lora=config.lora_merge,
                       reward_stats=reward_stats)
    log.info(f"final reward model: {final} (score mean {reward_stats['mean']:.4f}, std {reward_stats['std']:.4f})")
    return final
