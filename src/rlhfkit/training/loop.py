"""The supervised training loop that SFT and reward-model training share.

One step: take the step's micro-batches (this rank's share of them), accumulate gradients of loss_sum / items_in_step
(items of the global batch, so accumulation and ranks equal one big batch), then the step engine (`optimizer_step`,
which PPO uses too): clip, step the optimizer and schedule; log; evaluate and checkpoint on their schedules. A
non-finite loss or gradient skips the step (data is still consumed, so resume stays exact) and several in a row stop
the run, and so does a run that skipped every step. The weights are checked after every optimizer step: a non-finite
model is never evaluated, checkpointed or saved.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from rlhfkit.data.batching import to_device
from rlhfkit.models import autocast
from rlhfkit.training.distributed import World, full_tensor, gradient_sync
from rlhfkit.training.guards import TrainingError, check_finite, check_trained, step_schedule
from rlhfkit.training.metrics import RunLogger

# tensors (B, T) plus "num_items": how many loss items (tokens or pairs) it holds; a batch whose rows are not one
# sequence each also says "num_sequences" and "num_tokens"
MicroBatch = dict[str, Any]
LossFn = Callable[[torch.nn.Module, MicroBatch], tuple[torch.Tensor, dict[str, float]]]


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


@dataclass(frozen=True)
class Stepped:
    """What one optimizer step of one or several models did."""
    finite: bool  # False: nothing was stepped (a loss or a gradient norm was not finite)
    grad_norms: dict[str, float]  # each model's gradient norm before clipping
    lrs: dict[str, float]  # the learning rate each model's step used


def optimizer_step(trained: dict[str, tuple[torch.nn.Module, torch.optim.Optimizer, Any]], max_grad_norm: float,
                   loss_finite: bool = True) -> Stepped:
    """The step engine every stage shares, after its micro-batches have accumulated their gradients.

    trained: name -> (model, optimizer, scheduler). Each model's gradient is clipped to `max_grad_norm` (0: not
    clipped). If the loss or any gradient norm is not finite, no optimizer steps (the models move together or not at
    all); every schedule advances either way, since it follows the step count, and the gradients are cleared."""
    limit = max_grad_norm if max_grad_norm > 0 else float("inf")
    norms = {}
    for name, (model, _, _) in trained.items():
        params = [p for p in model.parameters() if p.grad is not None]
        norms[name] = float(full_tensor(torch.nn.utils.clip_grad_norm_(params, limit))) if params else 0.0
    finite = loss_finite and all(math.isfinite(n) for n in norms.values())
    lrs = {}
    for name, (_, optimizer, scheduler) in trained.items():
        if finite:
            optimizer.step()
        lrs[name] = scheduler.get_last_lr()[0]
        step_schedule(scheduler)
        optimizer.zero_grad(set_to_none=True)
    return Stepped(finite, norms, lrs)


def train_step(model: torch.nn.Module, micro_batches: list[MicroBatch], loss_fn: LossFn,
               optimizer: torch.optim.Optimizer, scheduler, *, max_grad_norm: float, dtype: str,
               world: World = World()) -> StepStats:
    """One optimizer step over this rank's micro-batches of one global batch (all of it on one process)."""
    start = time.perf_counter()
    local = [sum(mb["num_items"] for mb in micro_batches), sum(_tokens(mb) for mb in micro_batches),
             sum(mb.get("num_sequences", mb["input_ids"].shape[0]) for mb in micro_batches)]
    n_items, tokens, sequences = world.sum(local)
    # DDP and FSDP average the ranks' gradients: dividing by n_items / size makes that the global batch's sum / n_items.
    divisor = n_items / world.size
    total_loss, sums, finite = 0.0, {}, True
    for i, mb in enumerate(micro_batches):
        mb = to_device(mb, world.device)
        with gradient_sync(model, enabled=i == len(micro_batches) - 1):
            with autocast(dtype, world.device):
                loss_sum, stats = loss_fn(model, mb)
            finite = finite and bool(torch.isfinite(loss_sum))
            (loss_sum / divisor).backward()  # even when not finite: the other ranks' reductions wait for this one
        total_loss += loss_sum.item()
        for k, v in stats.items():
            sums[k] = sums.get(k, 0.0) + v
    keys = sorted(sums)
    reduced = world.sum([total_loss, float(not finite)] + [sums[k] for k in keys])
    total_loss, finite, sums = reduced[0], reduced[1] == 0, dict(zip(keys, reduced[2:]))
    stepped = optimizer_step({"model": (model, optimizer, scheduler)}, max_grad_norm, loss_finite=finite)
    finite = stepped.finite
    return StepStats(loss=total_loss / n_items if finite else float("nan"), grad_norm=stepped.grad_norms["model"],
                     lr=stepped.lrs["model"], seconds=time.perf_counter() - start, sequences=int(sequences),
                     tokens=int(tokens), skipped=not finite,
                     extra={k: v / n_items for k, v in sums.items()} if finite else {})


def _tokens(mb: MicroBatch) -> int:
    """The tokens of a micro-batch's sequences (a batch of pair rows says how many; its mask is (B, 1, L, L))."""
    return mb["num_tokens"] if "num_tokens" in mb else int(mb["attention_mask"].sum())


def fit(model: torch.nn.Module, *, loss_fn: LossFn, step_batches: Callable[[int], list[MicroBatch]],
        optimizer: torch.optim.Optimizer, scheduler, start_step: int, max_steps: int, max_grad_norm: float,
        dtype: str, logger: RunLogger, eval_fn: Callable[[], dict[str, float]] | None, eval_every: int,
        save_fn: Callable[[int], Any] | None, save_every: int, log_every: int = 1, max_bad_steps: int = 5,
        world: World = World(), stage: str = "model") -> dict[str, float]:
    """Train from `start_step` to `max_steps`; returns the last evaluation's metrics. Every rank runs this; the logger
    of ranks other than 0 is silent, and evaluation and saving are collective. `stage` names the model in errors."""
    bad_in_a_row = 0
    last_eval: dict[str, float] = {}
    for step in range(start_step, max_steps):
        model.train()
        stats = train_step(model, step_batches(step), loss_fn, optimizer, scheduler,
                           max_grad_norm=max_grad_norm, dtype=dtype, world=world)
        done = step + 1
        if not stats.skipped:
            check_finite({stage: model}, f"after the optimizer step of step {done}", world)
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
    check_trained(bad_in_a_row, max_steps - start_step)
    if eval_fn is not None and start_step >= max_steps:
        last_eval = eval_fn()
    return last_eval
