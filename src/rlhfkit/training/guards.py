"""What stops a run rather than let it go on silently wrong: non-finite weights, a run that never trained, a full
disk. Every stage's loop calls these; each failure is a `TrainingError`, one line for the user and exit code 1."""

from __future__ import annotations

import errno
import warnings

import torch

from rlhfkit.training.distributed import World


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite weights, too many skipped steps, a full disk): one line, exit code 1."""


class SkippedIteration(Exception):
    """This iteration's experience cannot be trained on (a non-finite score): the run goes on with the next, and
    counts it with the other bad steps."""


def nonfinite_parameter(model: torch.nn.Module, world: World = World()) -> str | None:
    """The name of the first trainable parameter holding NaN or inf on any rank, else None (every rank calls this).

    One fused norm per tensor keeps it cheap enough for every optimizer step; a non-finite norm is confirmed
    element-wise, since the norm of huge but finite weights can overflow too."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not named:
        return None
    local = [_local(p).detach() for _, p in named]
    norms = torch.stack(torch._foreach_norm(local)).float().cpu()
    suspect = (~torch.isfinite(norms)).nonzero().flatten().tolist()
    bad = [float(not bool(torch.isfinite(local[i]).all())) for i in range(len(named))] if suspect else \
        [0.0] * len(named)
    flags = world.sum(bad)
    first = next((i for i, flag in enumerate(flags) if flag), None)
    return None if first is None else named[first][0]


def check_finite(models: dict[str, torch.nn.Module], when: str, world: World = World()) -> None:
    """Raise a TrainingError naming the model and parameter when any weight is not finite; `when` says at what
    point of the run (e.g. "after the optimizer step of step 12")."""
    for label, model in models.items():
        name = nonfinite_parameter(model, world)
        if name is not None:
            raise TrainingError(f"{label} parameter {name} is not finite {when}; nothing of it was saved. Lower the "
                                "learning rate or check the options and data, then --resume from the last "
                                "checkpoint")


def check_trained(skipped_in_a_row: int, steps_run: int, unit: str = "step") -> None:
    """A run whose every step was skipped did not train: it must not end as if it had."""
    if steps_run and skipped_in_a_row >= steps_run:
        raise TrainingError(f"every {unit} of this run ({steps_run}) was skipped for a non-finite loss, gradient or "
                            "reward: the model did not train, so no final model is written")


def step_schedule(scheduler) -> None:
    """Advance the schedule; after a skipped optimizer step PyTorch would warn that the schedule stepped first,
    which is the intent here: the schedule follows the step count, skipped steps included."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
        scheduler.step()


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC anywhere in the exception's chain, or torch's serializer reporting a short write (which is how a full
    disk shows up in torch.save: "[enforce fail at inline_container.cc] ... unexpected pos")."""
    return any((isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT))
               or any(s in str(e) for s in ("No space left on device", "unexpected pos", "Disk quota exceeded"))
               for e in _chain(exc))


def describe(exc: BaseException) -> str:
    """`Type: first line` of the innermost error worth showing (a DCP failure wraps each rank's error)."""
    inner = next((e for e in _chain(exc) if not hasattr(e, "failures")), exc)
    lines = str(inner).strip().splitlines()
    return f"{type(inner).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def _chain(exc: BaseException | None):
    """The exception, its causes and contexts, and the per-rank errors a DCP CheckpointException holds."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__] + [pair[0] for pair in getattr(e, "failures", {}).values()]


def _local(param: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP parameter (a DTensor), or the tensor itself."""
    return param.to_local() if hasattr(param, "to_local") else param
