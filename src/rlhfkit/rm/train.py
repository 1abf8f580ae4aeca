"""Stage 2, reward model: a one-label sequence classifier trained on preference pairs.

The score of a sequence is the head's output at its last token (the EOS after the response), where Hugging Face's
`*ForSequenceClassification` reads it. A pair is one row, its prompt computed once for both responses
(`collate_pair_rows`), where the model allows it; otherwise its chosen and rejected sequences go through one forward
pass side by side.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from rlhfkit.config import option
from rlhfkit.data.batching import collate_pair_rows, collate_pairs
from rlhfkit.data.encode import EncodeStats, encode_pairs
from rlhfkit.models import load_sequence_classifier, takes_pair_rows
from rlhfkit.rm.losses import LOSSES, pairwise_loss
from rlhfkit.rm.scoring import batch_scores, pair_metrics, score_pairs
from rlhfkit.training.common import log, with_lora
from rlhfkit.training.supervised import Objective, Prepared, Stage, SupervisedConfig, run_supervised


@dataclass
class RMConfig(SupervisedConfig):
    lr: float = option(1e-5, "peak learning rate (AdamW)", group="training")
    loss: str = option("log_sig", "pairwise loss: log_sig = -log sigmoid(r_c - r_r - margin), log_exp = "
                                  "log(1 + exp(r_r - r_c + margin))", group="training", choices=LOSSES)


def rm_loss_fn(loss_name: str):
    def loss_fn(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        chosen, rejected = batch_scores(model, batch).unbind(1)
        losses = pairwise_loss(loss_name, chosen, rejected, batch["margin"])
        with torch.no_grad():
            stats = {"accuracy": (chosen > rejected).float().sum().item(), "chosen_score": chosen.sum().item(),
                     "rejected_score": rejected.sum().item(), "margin": (chosen - rejected).sum().item()}
        return losses.sum(), stats

    return loss_fn


def encode(rows: list, tokenizer, template: str, config: RMConfig, stats: EncodeStats) -> list:
    return encode_pairs(rows, tokenizer, template, config.max_len, stats)


def load_model(config: RMConfig, tokenizer):
    model = load_sequence_classifier(config.model, tokenizer, attn_implementation=config.attn_implementation,
                                     gradient_checkpointing=config.gradient_checkpointing, seed=config.seed)
    return with_lora(model, config, "SEQ_CLS")


def objective(run: Prepared) -> Objective:
    config, pad, world = run.config, run.tokenizer.pad_token_id, run.world

    def evaluate() -> dict[str, float]:
        chosen, rejected = score_pairs(run.model, run.eval_set, pad, config.micro, config.dtype, world)
        return pair_metrics(chosen, rejected, torch.tensor([p[2] for p in run.eval_set]), config.loss)

    def final() -> dict:
        # PPO normalises rewards with the score distribution on held-out responses (training pairs if none are
        # held out).
        reference = run.eval_set or run.train_set[:512]
        scores = torch.cat(score_pairs(run.model, reference, pad, config.micro, config.dtype, world))
        stats = {"mean": scores.mean().item(), "std": scores.std().item() if len(scores) > 1 else 1.0,
                 "count": len(scores)}
        log.info(f"reward model scores: mean {stats['mean']:.4f}, std {stats['std']:.4f}")
        return {"reward_stats": stats}

    collate_fn = collate_pair_rows if takes_pair_rows(run.model) else collate_pairs
    return Objective(loss_fn=rm_loss_fn(config.loss),
                     collate=lambda indices: collate_fn([run.train_set[i] for i in indices], pad),
                     evaluate=evaluate, final=final)


def run_rm(config: RMConfig) -> Path:
    """Train and write OUTPUT/final (Hugging Face format, with the score mean and std for PPO)."""
    return run_supervised(config, Stage("rm", "preference", "pair", encode, load_model, objective))
