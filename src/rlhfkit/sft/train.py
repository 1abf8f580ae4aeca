"""Stage 1, supervised fine-tuning: token-level cross-entropy on the response tokens of demonstrations."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rlhfkit.config import option
from rlhfkit.data.encode import EncodeStats, encode_conversation
from rlhfkit.models import load_causal_lm
from rlhfkit.training.common import with_lora
from rlhfkit.training.lm_loss import collate, evaluate, sft_loss
from rlhfkit.training.supervised import Objective, Prepared, Stage, SupervisedConfig, run_supervised


@dataclass
class SFTConfig(SupervisedConfig):
    lr: float = option(2e-5, "peak learning rate (AdamW)", group="training")
    loss_on: str = option("assistant", "tokens that carry loss: assistant replies (and their EOS), or all tokens",
                          group="data", choices=("assistant", "all"))


def encode(rows: list, tokenizer, template: str, config: SFTConfig, stats: EncodeStats) -> list:
    encoded = (encode_conversation(c, tokenizer, template, config.max_len, stats, train_all=config.loss_on == "all")
               for c in rows)
    return [e for e in encoded if e]


def load_model(config: SFTConfig, tokenizer):
    model = load_causal_lm(config.model, tokenizer, attn_implementation=config.attn_implementation,
                           gradient_checkpointing=config.gradient_checkpointing, seed=config.seed)
    return with_lora(model, config, "CAUSAL_LM")


def objective(run: Prepared) -> Objective:
    pad, config = run.tokenizer.pad_token_id, run.config
    return Objective(
        # looked up at call time, so a test can replace it
        loss_fn=lambda model, batch: sft_loss(model, batch),
        collate=lambda indices: collate([run.train_set[i] for i in indices], pad),
        evaluate=lambda: evaluate(run.model, run.eval_set, pad, config.micro, config.dtype, run.world))


def run_sft(config: SFTConfig) -> Path:
    """Train and write OUTPUT/final (Hugging Face format); returns that folder."""
    return run_supervised(config, Stage("sft", "sft", "example", encode, load_model, objective))
