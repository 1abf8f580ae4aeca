"""Atomic checkpoints with torch.distributed.checkpoint: the same format for one process and many.

Each trained model and its optimizer go into one DCP folder that every rank writes its shard of; DCP reshards on
load, so an FSDP run written on N ranks continues on M (or on one process). A checkpoint is written to a hidden
temporary folder and renamed into place once every rank is done, so a crash leaves a whole checkpoint or none.
Layout: `OUTPUT/checkpoints/step-00000010/{NAME/ (DCP), NAME.sched.pt, extra/ (DCP), rng-RANK.pt, state.json}`,
NAME being each trained model ("model", or "actor" and "critic" for PPO); extra other tensors, such as PPO's EMA of
the actor (sharded like the actor under FSDP).
Several nodes need OUTPUT on a filesystem they share.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from rlhfkit.training.distributed import World

PREFIX = "step-"

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
    """Write checkpoint `step` atomically (every rank calls this) and delete all but the newest `keep_last`."""
    dcp, get_state_dict, _, options, _ = _dcp()
    folder = checkpoint_dir(Path(out))
    final = folder / f"{PREFIX}{step:08d}"
    tmp = folder / f".tmp-{PREFIX}{step:08d}"
    if world.main:
        folder.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    world.barrier()
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
    world.barrier()
    if world.main:
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
    world.barrier()
    return final


def load_checkpoint(path: str | Path, *, models: TrainedModels, schedulers: dict[str, Any], world: World = World(),
                    extra: dict[str, dict[str, torch.Tensor]] | None = None) -> dict[str, Any]:
    """Restore models, optimizers, schedulers, RNG states and the `extra` tensors (loaded into the given ones, which
    say what to read and how it is sharded) in place; return the run state."""
    dcp, get_state_dict, set_state_dict, options, load_options = _dcp()
    path = Path(path)
    for name, (model, optimizer) in models.items():
        if not (path / name / ".metadata").is_file():
            raise FileNotFoundError(f"{path}: no checkpoint of {name!r} (is this a checkpoint of this stage?)")
        model_state, optim_state = get_state_dict(model, optimizer, options=options)
        loaded = {"model": model_state, "optimizer": optim_state}
        with _one_process_quiet():
            dcp.load(loaded, checkpoint_id=path / name, no_dist=not dist.is_initialized())
        set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optimizer"],
                       options=load_options)
    for name, sched in schedulers.items():
        sched.load_state_dict(torch.load(path / f"{name}.sched.pt", weights_only=False))
    state = json.loads((path / "state.json").read_text())
    rng = path / f"rng-{world.rank}.pt"
    if rng.is_file():
        set_rng_state(torch.load(rng, weights_only=False))
    elif world.main:  # a run continued on more ranks than wrote it: the new ranks' random streams start afresh
        import logging

        logging.getLogger("rlhfkit").warning(f"{path} was written by {state.get('ranks')} ranks; rank "
                                             f"{world.rank} and above start new random streams")
    if extra:
        with _one_process_quiet():
            dcp.load(extra, checkpoint_id=path / "extra", no_dist=not dist.is_initialized())
    return state



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
