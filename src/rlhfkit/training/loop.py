"""The supervised training loop that SFT and reward-model training share.

One step: take the step's micro-batches, accumulate gradients of loss_sum / items_in_step (so accumulation equals one
big batch exactly), clip, step the optimizer and schedule, log; evaluate and checkpoint on their schedules. A
non-finite loss or gradient skips the step (data is still consumed, so resume stays exact) and several in a row stop
the run.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from rlhfkit.models import autocast
from rlhfkit.training.metrics import RunLogger

MicroBatch = dict[str, Any]  # tensors (B, T) plus "num_items": how many loss items (tokens or pairs) it holds
LossFn = Callable[[torch.nn.Module, MicroBatch], tuple[torch.Tensor, dict[str, float]]]


class TrainingError(RuntimeError):
    """Training cannot go on (for example, too many non-finite losses in a row)."""


@dataclass
class StepStats:
    loss: float
    grad_norm: float
    lr: float
    seconds: float
    sequences: int
    tokens: int
    skipped: bool = False
    extra: dict[str, float] = field(default_factory=dict)  # the loss function's own means (accuracy, ...)

    def as_metrics(self) -> dict[str, float]:
        return {"loss": self.loss, "grad_norm": self.grad_norm, "lr": self.lr,
                "sequences_per_s": self.sequences / self.seconds, "tokens_per_s": self.tokens / self.seconds,
                "skipped": float(self.skipped), **self.extra}


def train_step(model: torch.nn.Module, micro_batches: list[MicroBatch], loss_fn: LossFn,
               optimizer: torch.optim.Optimizer, scheduler, *, max_grad_norm: float, dtype: str) -> StepStats:
    """One optimizer step over the micro-batches of one global batch."""
    start = time.perf_counter()
    n_items = sum(mb["num_items"] for mb in micro_batches)
    total_loss, sums, finite = 0.0, {}, True
    for mb in micro_batches:
        with autocast(dtype, mb["input_ids"].device):
            loss_sum, stats = loss_fn(model, mb)
        if not torch.isfinite(loss_sum):
            finite = False
            break
        (loss_sum / n_items).backward()
        total_loss += loss_sum.item()
        for k, v in stats.items():
            sums[k] = sums.get(k, 0.0) + v
    grad_norm = float("nan")
    if finite:
        params = [p for p in model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf"))
        grad_norm = norm.item()
        finite = math.isfinite(grad_norm)
    if finite:
        optimizer.step()
    lr = scheduler.get_last_lr()[0]
    scheduler.step()  # the schedule follows the step count, skipped steps included
    optimizer.zero_grad(set_to_none=True)
    tokens = sum(int(mb["attention_mask"].sum()) for mb in micro_batches)
    sequences = sum(mb["input_ids"].shape[0] for mb in micro_batches)
    return StepStats(loss=total_loss / n_items if finite else float("nan"), grad_norm=grad_norm, lr=lr,
                     seconds=time.perf_counter() - start, sequences=sequences, tokens=tokens, skipped=not finite,
                     extra={k: v / n_items for k, v in sums.items()} if finite else {})


def fit(model: torch.nn.Module, *, loss_fn: LossFn, step_batches: Callable[[int], list[MicroBatch]],
        optimizer: torch.optim.Optimizer, scheduler, start_step: int, max_steps: int, max_grad_norm: float,
        dtype: str, logger: RunLogger, eval_fn: Callable[[], dict[str, float]] | None, eval_every: int,
        save_fn: Callable[[int], Any] | None, save_every: int, log_every: int = 1, max_bad_steps: int = 5
        ) -> dict[str, float]:
    """Train from `start_step` to `max_steps`; returns the last evaluation's metrics."""
    bad_in_a_row = 0
    last_eval: dict[str, float] = {}
    for step in range(start_step, max_steps):
        model.train()
        stats = train_step(model, step_batches(step), loss_fn, optimizer, scheduler,
                           max_grad_norm=max_grad_norm, dtype=dtype)
        done = step + 1
        if stats.skipped:
            bad_in_a_row += 1
            logger.write(f"warning: step {done}: non-finite loss or gradient, step skipped "
                         f"({bad_in_a_row} in a row)")
            if bad_in_a_row >= max_bad_steps:
                raise TrainingError(f"{bad_in_a_row} non-finite steps in a row at step {done}: lower the learning "
                                    "rate, check the data, or use float32")
        else:
            bad_in_a_row = 0
        if done % log_every == 0 or done == max_steps:
            logger.log(done, "train", stats.as_metrics())
        logger.progress(done, {"loss": stats.loss, "lr": stats.lr, "seq/s": stats.sequences / stats.seconds})
        if eval_fn is not None and ((eval_every and done % eval_every == 0) or done == max_steps):
            last_eval = eval_fn()
            logger.log(done, "eval", last_eval)
            logger.write(f"step {done} eval: " + ", ".join(f"{k} {v:.4g}" for k, v in last_eval.items()))
        if save_fn is not None and save_every and done % save_every == 0:
            save_fn(done)
    if eval_fn is not None and start_step >= max_steps:
        last_eval = eval_fn()
    return last_eval
