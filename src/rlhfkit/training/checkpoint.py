"""Atomic checkpoints: trainable weights (safetensors), optimizer and scheduler states, RNG states and run state.

A checkpoint is written to a hidden temporary folder and renamed into place, so a crash leaves either a whole
checkpoint or none. Layout: `OUTPUT/checkpoints/step-00000010/{NAME.safetensors, NAME.optim.pt, NAME.sched.pt,
rng.pt, state.json}` where NAME is each trained model ("model", or "actor" and "critic" for PPO).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

PREFIX = "step-"


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


def save_checkpoint(out: str | Path, step: int, *, weights: dict[str, dict[str, torch.Tensor]],
                    optimizers: dict[str, Any], schedulers: dict[str, Any], state: dict[str, Any],
                    keep_last: int) -> Path:
    """Write checkpoint `step` atomically and delete all but the newest `keep_last`."""
    folder = checkpoint_dir(Path(out))
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{PREFIX}{step:08d}"
    tmp = folder / f".tmp-{PREFIX}{step:08d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    for name, tensors in weights.items():
        save_file(tensors, str(tmp / f"{name}.safetensors"))
    for name, opt in optimizers.items():
        torch.save(opt.state_dict(), tmp / f"{name}.optim.pt")
    for name, sched in schedulers.items():
        torch.save(sched.state_dict(), tmp / f"{name}.sched.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2))
    for f in tmp.iterdir():  # the data must reach the disk before the rename makes the checkpoint visible
        with open(f, "rb") as handle:
            os.fsync(handle.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    done = sorted(p for p in folder.iterdir() if p.name.startswith(PREFIX))
    for old in done[:-keep_last]:
        shutil.rmtree(old)
    return final


def load_checkpoint(path: str | Path, *, optimizers: dict[str, Any], schedulers: dict[str, Any]
                    ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """Restore optimizers, schedulers and RNG states in place; return (weights by model name, run state)."""
    path = Path(path)
    weights = {f.name[: -len(".safetensors")]: load_file(str(f)) for f in path.glob("*.safetensors")}
    for name, opt in optimizers.items():
        opt.load_state_dict(torch.load(path / f"{name}.optim.pt", weights_only=False))
    for name, sched in schedulers.items():
        sched.load_state_dict(torch.load(path / f"{name}.sched.pt", weights_only=False))
    set_rng_state(torch.load(path / "rng.pt", weights_only=False))
    return weights, json.loads((path / "state.json").read_text())
