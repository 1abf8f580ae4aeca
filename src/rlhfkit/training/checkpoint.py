"""Atomic checkpoints with torch.distributed.checkpoint: the same format for one process and many.

Each trained model and its optimizer go into one DCP folder that every rank writes its shard of; DCP reshards on
load, so an FSDP run written on N ranks continues on M (or on one process). A checkpoint is written to a hidden
temporary folder and renamed into place once every rank is done, so a crash leaves a whole checkpoint or none.
Layout: `OUTPUT/checkpoints/step-00000010/{NAME/ (DCP), NAME.sched.pt, extra/ (DCP), rng-RANK.pt, state.json,
checksums.json}`,
NAME being each trained model ("model", or "actor" and "critic" for PPO); extra other tensors, such as PPO's EMA of
the actor (sharded like the actor under FSDP).
`checksums.json` holds the SHA-256 of every other file, checked before a resume: bytes changed on disk are named,
never trained on. Several nodes need OUTPUT on a filesystem they share.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from rlhfkit.config import ConfigError
from rlhfkit.training.distributed import World
from rlhfkit.training.guards import TrainingError, check_finite, describe, is_disk_full

PREFIX = "step-"
CHECKSUMS = "checksums.json"

TrainedModels = dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]]  # name -> (model, its optimizer)


def checkpoint_dir(out: Path) -> Path:
    return Path(out) / "checkpoints"


def latest_checkpoint(out: str | Path) -> Path | None:
    folder = checkpoint_dir(Path(out))
    if not folder.is_dir():
        return None
    done = sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / "state.json").exists())
    return done[-1] if done else None


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


def save_checkpoint(out: str | Path, step: int, *, models: TrainedModels, schedulers: dict[str, Any],
                    state: dict[str, Any], keep_last: int, extra: dict[str, dict[str, torch.Tensor]] | None = None,
                    world: World = World()) -> Path:
    """Write checkpoint `step` atomically (every rank calls this) and delete all but the newest `keep_last`.

    Non-finite weights are never written. A write that fails (a full disk, say) removes the temporary folder and
    raises a TrainingError naming the checkpoint still intact; every rank raises it."""
    dcp, get_state_dict, _, options, _ = _dcp()
    folder = checkpoint_dir(Path(out))
    final = folder / f"{PREFIX}{step:08d}"
    tmp = folder / f".tmp-{PREFIX}{step:08d}"
    check_finite({name: model for name, (model, _) in models.items()}, f"at step {step}, when its checkpoint was "
                 "to be written", world)
    what = f"checkpoint {final.name} to {folder}"
    with writing(what, out, tmp, world):
        if world.main:
            folder.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
    with writing(what, out, tmp, world):
        for name, (model, optimizer) in models.items():
            model_state, optim_state = get_state_dict(model, optimizer, options=options)
            with _one_process_quiet():
                dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=tmp / name,
                         no_dist=not dist.is_initialized())
        if extra:
            with _one_process_quiet():
                dcp.save(extra, checkpoint_id=tmp / "extra", no_dist=not dist.is_initialized())
        torch.save(rng_state(), tmp / f"rng-{world.rank}.pt")
        if world.main:
            for name, sched in schedulers.items():
                torch.save(sched.state_dict(), tmp / f"{name}.sched.pt")
            (tmp / "state.json").write_text(json.dumps({"step": step, "ranks": world.size, **state}, indent=2))
    with writing(what, out, tmp, world):
        if world.main:
            sums = {str(f.relative_to(tmp)): _digest(f) for f in sorted(tmp.rglob("*")) if f.is_file()}
            (tmp / CHECKSUMS).write_text(json.dumps(sums, indent=1))
            for f in tmp.rglob("*"):  # the data must reach the disk before the rename makes the checkpoint visible
                if f.is_file():
                    with open(f, "rb") as handle:
                        os.fsync(handle.fileno())
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            done = sorted(p for p in folder.iterdir() if p.name.startswith(PREFIX))
            for old in done[:-keep_last]:
                shutil.rmtree(old)
    return final


def checkpoint_problem(path: Path) -> str | None:
    """Why `path` cannot be resumed from (not a checkpoint, a file missing or changed since it was written), or None.
    Checkpoints carry the SHA-256 of every file (checksums.json); one written before that is taken as it is."""
    if not path.is_dir():
        return f"{path} is not a checkpoint folder"
    if not (path / "state.json").is_file():
        if (path / "config.json").is_file():
            return f"{path} is a saved model, not a checkpoint (checkpoints are OUTPUT/checkpoints/step-N)"
        return f"{path} is not a checkpoint (it holds no state.json; checkpoints are OUTPUT/checkpoints/step-N)"
    listed = path / CHECKSUMS
    if not listed.is_file():
        return None
    try:
        sums = json.loads(listed.read_text())
    except (ValueError, UnicodeDecodeError):
        return f"{listed} is damaged (not valid JSON)"
    for name, expected in sums.items():
        file = path / name
        if not file.is_file():
            return f"{file} is missing"
        if _digest(file) != expected:
            return f"{file} is damaged (its checksum does not match the one written with it)"
    return None


def previous_intact(path: Path) -> str:
    """A hint naming the newest intact checkpoint older than `path` in its folder."""
    if path.parent.is_dir() and path.name.startswith(PREFIX):
        older = sorted((p for p in path.parent.iterdir() if p.name.startswith(PREFIX) and p.name < path.name),
                       reverse=True)
        for candidate in older:
            if checkpoint_problem(candidate) is None:
                return f"the previous intact checkpoint is {candidate}: continue from it with --resume {candidate}"
    return "no earlier intact checkpoint is left"


def read_state(path: Path) -> dict[str, Any]:
    """A checkpoint's state.json (step, ranks, stage, config, the stage's own state)."""
    with _reading(path / "state.json"):
        state = json.loads((path / "state.json").read_text())
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            raise ValueError("no step in it")
    return state


def load_checkpoint(path: str | Path, *, models: TrainedModels, schedulers: dict[str, Any], world: World = World(),
                    extra: dict[str, dict[str, torch.Tensor]] | None = None) -> dict[str, Any]:
    """Restore models, optimizers, schedulers, RNG states and the `extra` tensors (loaded into the given ones, which
    say what to read and how it is sharded) in place; return the run state. A file that cannot be read is a
    CheckpointError naming it and the previous intact checkpoint."""
    dcp, get_state_dict, set_state_dict, options, load_options = _dcp()
    path = Path(path)
    state = read_state(path)
    for name, (model, optimizer) in models.items():
        if not (path / name / ".metadata").is_file():
            raise CheckpointError(f"resume: {path} holds no checkpoint of {name!r} (is it a checkpoint of this "
                                  "stage?)")
        model_state, optim_state = get_state_dict(model, optimizer, options=options)
        loaded = {"model": model_state, "optimizer": optim_state}
        with _reading(path / name), _one_process_quiet():
            dcp.load(loaded, checkpoint_id=path / name, no_dist=not dist.is_initialized())
        with _reading(path / name):
            set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optimizer"],
                           options=load_options)
    for name, sched in schedulers.items():
        with _reading(path / f"{name}.sched.pt"):
            sched.load_state_dict(torch.load(path / f"{name}.sched.pt", weights_only=False))
    rng = path / f"rng-{world.rank}.pt"
    if rng.is_file():
        with _reading(rng):
            set_rng_state(torch.load(rng, weights_only=False))
    elif world.main:  # a run continued on more ranks than wrote it: the new ranks' random streams start afresh
        import logging

        logging.getLogger("rlhfkit").warning(f"{path} was written by {state.get('ranks')} ranks; rank "
                                             f"{world.rank} and above start new random streams")
    if extra:
        with _reading(path / "extra"), _one_process_quiet():
            dcp.load(extra, checkpoint_id=path / "extra", no_dist=not dist.is_initialized())
    return state


class CheckpointError(ConfigError):
    """A checkpoint that cannot be resumed from: one line naming the file and the previous intact checkpoint."""


@contextlib.contextmanager
def _reading(file: Path):
    try:
        yield
    except CheckpointError:
        raise
    except (Exception, _dcp_failure()) as exc:
        raise CheckpointError(f"resume: {file} could not be read ({describe(exc)}); "
                              f"{previous_intact(_checkpoint_of(file))}") from None


@contextlib.contextmanager
def writing(what: str, out: Path, tmp: Path, world: World):
    """Run one phase of writing `what` (e.g. "checkpoint step-N to PATH") through the temporary folder `tmp`; when it
    fails on any rank, every rank removes `tmp` and raises one TrainingError that says which checkpoint of the run in
    `out` is intact. A collective, so that no rank waits for a failed one."""
    failure = None
    try:
        yield
    except (Exception, _dcp_failure()) as exc:
        failure = exc
    if world.sum([float(failure is not None)])[0] == 0:
        return
    if world.main:
        shutil.rmtree(tmp, ignore_errors=True)
    intact = latest_checkpoint(out)
    kept = f"checkpoint {intact.name} is intact" if intact is not None else "no checkpoint was written before"
    if failure is None:
        raise TrainingError(f"writing {what} failed on another rank; {kept}")
    if is_disk_full(failure):
        raise TrainingError(f"no space left on device while writing {what}; {kept}") from None
    raise TrainingError(f"could not write {what} ({describe(failure)}); {kept}") from None


def _checkpoint_of(file: Path) -> Path:
    return next((p for p in [file, *file.parents] if p.name.startswith(PREFIX)), file.parent)


def _digest(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _dcp_failure() -> type[BaseException]:
    """DCP reports a failed load or save as a BaseException subclass, not an Exception."""
    from torch.distributed.checkpoint.api import CheckpointException

    return CheckpointException


def _dcp():
    """torch.distributed.checkpoint and its state-dict helpers, imported when a checkpoint is written or read (the
    import takes a second, which every command would pay otherwise); with the options rlhfkit uses. Frozen weights
    (a LoRA run's base model) come back from the model files, not from checkpoints: loading is not strict about
    them, and dcp.load itself fails on any trained tensor the checkpoint lacks."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    return (dcp, get_state_dict, set_state_dict, StateDictOptions(ignore_frozen_params=True),
            StateDictOptions(ignore_frozen_params=True, strict=False))


@contextlib.contextmanager
def _one_process_quiet():
    """DCP warns on every call without a process group that it assumes one process: that is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield
