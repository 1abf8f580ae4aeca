"""Stage 1, supervised fine-tuning: token-level cross-entropy on the response tokens of demonstrations."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from rlhfkit.config import ConfigError, option
from rlhfkit.data.batching import chunks, pad_right, step_indices
from rlhfkit.data.encode import EncodeStats, Encoded, encode_conversation
from rlhfkit.data.templates import resolve_template
from rlhfkit.models import autocast, load_causal_lm, load_tokenizer
from rlhfkit.training.common import (SupervisedConfig, checkpoint_saver, load_train_eval, log, optimization,
                                     save_final, setup_logging, start_run, with_lora)
from rlhfkit.training.distributed import World, gather_share, rank_share, strided_share, wrap_model
from rlhfkit.training.loop import fit
from rlhfkit.training.metrics import RunLogger


@dataclass
class SFTConfig(SupervisedConfig):
    lr: float = option(2e-5, "peak learning rate (AdamW)", group="training")
    loss_on: str = option("assistant", "tokens that carry loss: assistant replies (and their EOS), or all tokens",
                          group="data", choices=("assistant", "all"))


def sft_loss(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
    """Sum over trained tokens of -log p(token | previous tokens).

    batch: input_ids, attention_mask, loss_mask, each (B, T); loss_mask True where a token is trained.
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
    targets = batch["loss_mask"][:, 1:]  # token t+1 is predicted from position t
    picked = logits[:, :-1][targets].float()  # (N, V): only the positions that carry loss
    return F.cross_entropy(picked, batch["input_ids"][:, 1:][targets], reduction="sum"), {}


def collate(examples: list[Encoded], pad_id: int) -> dict:
    batch = pad_right([e.input_ids for e in examples], pad_id, [e.loss_mask for e in examples])
    batch["num_items"] = int(batch["loss_mask"][:, 1:].sum())
    return batch


def example_losses(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed token loss, trained tokens) of each example, each (B,)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
    targets = batch["loss_mask"][:, 1:]
    losses = F.cross_entropy(logits[:, :-1][targets].float(), batch["input_ids"][:, 1:][targets], reduction="none")
    rows = targets.nonzero()[:, 0]  # (N,) the example each trained token belongs to
    return torch.zeros(len(targets), device=losses.device).index_add_(0, rows, losses), targets.sum(1).float()


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


def run_sft(config: SFTConfig) -> Path:
    """Train and write OUTPUT/final (Hugging Face format); returns that folder."""
    setup_logging()
    out, resume, world = start_run(config, "sft")

    # Data first, so that bad rows stop the run before any model is loaded.
    train_rows, eval_rows = load_train_eval(config, "sft", out)
    tokenizer = load_tokenizer(config.model)
    template = resolve_template(config.template, tokenizer)
    stats = EncodeStats()
    train_set = [e for e in (encode_conversation(c, tokenizer, template, config.max_len, stats,
                                                 train_all=config.loss_on == "all") for c in train_rows) if e]
    eval_set = [e for e in (encode_conversation(c, tokenizer, template, config.max_len, EncodeStats(),
                                                train_all=config.loss_on == "all") for c in eval_rows) if e]
    log.info(f"template {template}; tokenized {stats.describe()}")
    if not train_set:
        raise ConfigError(f"max_len: no training example fits in {config.max_len} tokens")

    model = load_causal_lm(config.model, tokenizer, attn_implementation=config.attn_implementation,
                           gradient_checkpointing=config.gradient_checkpointing, seed=config.seed)
    model = with_lora(model, config, "CAUSAL_LM")
    model = wrap_model(model, world, dtype=config.dtype, cpu_offload=config.fsdp_cpu_offload)
    optimizer, scheduler, steps, start = optimization(model, config, len(train_set), resume, world)

    def step_batches(step: int) -> list[dict]:
        indices = rank_share(step_indices(len(train_set), config.batch_size, config.seed, step), world)
        return [collate([train_set[i] for i in part], tokenizer.pad_token_id) for part in chunks(indices, config.micro)]

    def eval_fn() -> dict[str, float]:
        return evaluate(model, eval_set, tokenizer.pad_token_id, config.micro, config.dtype, world) if eval_set else {}

    logger = RunLogger(out, total_steps=steps, start_step=start, desc="sft", wandb_project=config.wandb_project,
                       enabled=world.main)
    try:
        fit(model, loss_fn=sft_loss, step_batches=step_batches, optimizer=optimizer, scheduler=scheduler,
            start_step=start, max_steps=steps, max_grad_norm=config.max_grad_norm, dtype=config.dtype,
            logger=logger, eval_fn=eval_fn, eval_every=config.eval_every,
            save_fn=checkpoint_saver(out, model, optimizer, scheduler, config, "sft", world),
            save_every=config.save_every, log_every=config.log_every, max_bad_steps=config.max_bad_steps, world=world,
            stage="sft")
    finally:
        logger.close()

    def fresh_model():  # FSDP's gathered weights are written through an unsharded copy
        return with_lora(load_causal_lm(config.model, tokenizer, seed=config.seed), config, "CAUSAL_LM")

    final = save_final(model, tokenizer, out / "final", world, fresh_model, merge_lora=config.lora_merge)
    log.info(f"final model: {final}")
    return final
