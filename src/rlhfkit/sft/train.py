"""Stage 1, supervised fine-tuning: token-level cross-entropy on the response tokens of demonstrations."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rlhfkit.config import ConfigError, option
from rlhfkit.data.batching import chunks, step_indices
from rlhfkit.data.encode import EncodeStats, encode_conversation
from rlhfkit.data.templates import resolve_template
from rlhfkit.models import load_causal_lm, load_tokenizer
from rlhfkit.training.common import (SupervisedConfig, checkpoint_saver, load_train_eval, log, optimization,
                                     save_final, setup_logging, start_run, with_lora)
from rlhfkit.training.distributed import rank_share, wrap_model
from rlhfkit.training.lm_loss import collate, evaluate, sft_loss
from rlhfkit.training.loop import fit
from rlhfkit.training.metrics import RunLogger


@dataclass
class SFTConfig(SupervisedConfig):
    lr: float = option(2e-5, "peak learning rate (AdamW)", group="training")
    loss_on: str = option("assistant", "tokens that carry loss: assistant replies (and their EOS), or all tokens",
                          group="data", choices=("assistant", "all"))


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
