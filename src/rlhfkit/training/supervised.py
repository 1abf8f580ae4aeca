"""The driver that SFT, reward-model training and DPO share.

A stage says what it trains on and how: the kind of rows it reads, how a row becomes a training item, the model, and
its objective (the loss, the micro-batches, the held-out evaluation). The driver does the rest, the same way for every
stage: it reads and holds out the data (bad rows stop the run before any model loads), places the model for the
strategy, restores a checkpoint, runs the loop (training/loop.fit: the step engine, logging, evaluation, checkpoints)
and writes the final model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from rlhfkit.config import ConfigError, option, require
from rlhfkit.data.batching import chunks, step_indices
from rlhfkit.data.encode import EncodeStats
from rlhfkit.data.loading import load_examples, split_eval, write_problems
from rlhfkit.data.templates import resolve_template
from rlhfkit.models import load_tokenizer
from rlhfkit.training.checkpoint import load_checkpoint, save_checkpoint
from rlhfkit.training.common import (CommonConfig, Resume, check_data_specs, check_model_path, log, make_optimizer,
                                     make_scheduler, run_state, save_final, set_peak_lr, set_weight_decay,
                                     setup_logging, start_run, total_steps)
from rlhfkit.training.distributed import World, rank_share, wrap_model
from rlhfkit.training.loop import LossFn, MicroBatch, fit
from rlhfkit.training.metrics import RunLogger


@dataclass
class SupervisedConfig(CommonConfig):
    """SFT, reward-model training and DPO: one trained model, a dataset with a held-out part."""
    model: str = option("", "model to start from: a local folder or a Hugging Face hub id", group="model")
    data: list[str] = option([], "training data: files, folders or hub names, each optionally PATH:WEIGHT "
                                 "(weight 2 = every row twice, 0.5 = a fixed half)", group="data")
    eval_data: list[str] = option([], "held-out data; when empty, eval_split of the training data is held out",
                                  group="data")
    eval_split: float = option(0.05, "fraction of the training rows held out for evaluation", group="data")
    eval_every: int = option(0, "evaluate every N steps (0 = only at the end)", group="training")

    def check(self) -> None:
        require(bool(self.model), "model: required (a local folder or a hub id)")
        require(bool(self.data), "data: required (one or more files or folders)")
        super().check()
        check_data_specs(self.data + self.eval_data, "data")
        check_model_path(self.model, "model")
        micro = self.micro_batch_size or self.batch_size
        require(self.batch_size % micro == 0,
                f"micro_batch_size: {micro} must divide batch_size {self.batch_size}")
        require(0 <= self.eval_split < 1, f"eval_split: must be in [0, 1), got {self.eval_split}")
        require(self.eval_every >= 0, f"eval_every: must be >= 0, got {self.eval_every}")
        from rlhfkit.models import check_positions

        check_positions([(self.model, "model", self.max_len, "max_len")])


@dataclass
class Prepared:
    """What the driver has set up when it asks a stage for its objective."""
    config: SupervisedConfig
    model: torch.nn.Module  # placed for the strategy (DDP-wrapped, FSDP-sharded)
    tokenizer: Any
    train_set: list
    eval_set: list
    world: World
    resume: Resume | None  # the checkpoint this run continues from, if any


@dataclass
class Objective:
    """What a stage trains the model for, given the prepared run."""
    loss_fn: LossFn
    collate: Callable[[list[int]], MicroBatch]  # indices into the training set -> one micro-batch
    evaluate: Callable[[], dict[str, float]]  # metrics on the held-out set (every rank calls it)
    # Tensors that checkpoints carry beside the model (DPO's precomputed reference log-probs), restored in place
    # on resume: {group: {name: tensor}}.
    extra: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    final: Callable[[], dict[str, Any]] = dict  # save_model's keyword arguments, after training (RM's statistics)


@dataclass(frozen=True)
class Stage:
    name: str  # names the run in checkpoints, logs and errors
    kind: str  # the kind its data rows are read as ("sft", "preference")
    item: str  # what one training item is called in messages
    # (rows, tokenizer, template, config, stats) -> training items; rows that cannot fit are left out and counted
    encode: Callable[[list, Any, str, Any, EncodeStats], list]
    # (config, tokenizer) -> the model to train, unplaced, with its LoRA adapter; also FSDP's unsharded copy that
    # the final weights are written through
    load_model: Callable[[Any, Any], torch.nn.Module]
    objective: Callable[[Prepared], Objective]


def run_supervised(config: SupervisedConfig, stage: Stage) -> Path:
    """Train and write OUTPUT/final (Hugging Face format); returns that folder."""
    setup_logging()
    out, resume, world = start_run(config, stage.name, config.model)

    # Data first, so that bad rows stop the run before any model is loaded.
    train_rows, eval_rows = load_train_eval(config, stage.kind, out)
    tokenizer = load_tokenizer(config.model)
    template = resolve_template(config.template, tokenizer)
    stats = EncodeStats()
    train_set = stage.encode(train_rows, tokenizer, template, config, stats)
    eval_set = stage.encode(eval_rows, tokenizer, template, config, EncodeStats())
    log.info(f"template {template}; tokenized {stats.describe()}")
    if not train_set:
        raise ConfigError(f"max_len: no training {stage.item} fits in {config.max_len} tokens")

    model = wrap_model(stage.load_model(config, tokenizer), world, dtype=config.dtype,
                       cpu_offload=config.fsdp_cpu_offload)
    objective = stage.objective(Prepared(config, model, tokenizer, train_set, eval_set, world, resume))
    # Under FSDP the optimizer holds the shards, so it is made after the model is placed.
    steps = total_steps(config, len(train_set))
    optimizer = make_optimizer(model, config.lr, config.weight_decay)
    scheduler = make_scheduler(optimizer, config.lr_schedule, config.warmup_steps, steps)
    trained = {"model": (model, optimizer)}
    start = 0
    if resume is not None:
        state = load_checkpoint(resume.path, models=trained, schedulers={"model": scheduler}, world=world,
                                extra=objective.extra or None)
        if "lr" in resume.changed:
            set_peak_lr(scheduler, config.lr)
        if "weight_decay" in resume.changed:
            set_weight_decay(optimizer, config.weight_decay)
        start = int(state["step"])
        log.info(f"resumed from {resume.path} at step {start}")

    def step_batches(step: int) -> list[MicroBatch]:
        indices = rank_share(step_indices(len(train_set), config.batch_size, config.seed, step), world)
        return [objective.collate(part) for part in chunks(indices, config.micro)]

    def save(step: int) -> Path:  # everything needed to continue exactly from `step` (all ranks call it)
        return save_checkpoint(out, step, models=trained, schedulers={"model": scheduler},
                               state=run_state(config, stage.name), keep_last=config.keep_last,
                               extra=objective.extra or None, world=world)

    logger = RunLogger(out, total_steps=steps, start_step=start, desc=stage.name, wandb_project=config.wandb_project,
                       enabled=world.main)
    try:
        fit(model, loss_fn=objective.loss_fn, step_batches=step_batches, optimizer=optimizer, scheduler=scheduler,
            start_step=start, max_steps=steps, max_grad_norm=config.max_grad_norm, dtype=config.dtype,
            logger=logger, eval_fn=objective.evaluate if eval_set else None, eval_every=config.eval_every,
            save_fn=save, save_every=config.save_every, log_every=config.log_every,
            max_bad_steps=config.max_bad_steps, world=world, stage=stage.name)
    finally:
        logger.close()
    final = save_final(model, tokenizer, out / "final", world, lambda: stage.load_model(config, tokenizer),
                       merge_lora=config.lora_merge, **objective.final())
    log.info(f"final model: {final}")
    return final


def load_train_eval(config: SupervisedConfig, kind: str, out: Path) -> tuple[list, list]:
    """Training and held-out examples of `kind`, with a report of what was read, skipped and held out."""
    skipped = out / "skipped_rows.jsonl"
    train = load_examples(config.data, kind, skip_invalid=config.skip_invalid, seed=config.seed)
    problems = list(train.problems)
    if config.eval_data:
        held = load_examples(config.eval_data, kind, skip_invalid=config.skip_invalid, seed=config.seed)
        problems += held.problems
        train_examples, eval_examples = train.examples, held.examples
    else:
        train_examples, eval_examples = split_eval(train.examples, config.eval_split, config.seed)
    for r in train.reports:
        formats = ", ".join(f"{k} x{v}" for k, v in r.formats.items()) or "none"
        log.info(f"data {r.path}: {r.rows} rows ({formats}), {r.invalid} invalid, {r.used} used (weight {r.weight:g})")
    if problems:
        write_problems(problems, skipped)
        log.warning(f"skipped {len(problems)} invalid rows; reasons in {skipped}")
    log.info(f"data: {len(train_examples)} training examples, {len(eval_examples)} held out")
    if not train_examples:
        raise ConfigError("data: no valid training examples")
    return train_examples, eval_examples
