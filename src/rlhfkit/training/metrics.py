"""Metrics to `OUTPUT/metrics.jsonl`, TensorBoard event files, Weights & Biases (when asked), and a progress bar."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm


class RunLogger:
    """One record per logged step: {"step": s, "split": "train"|"eval"|..., metric: value, ...}.

    `enabled` False (ranks other than 0) makes every method a no-op: one process reports a run."""

    def __init__(self, out: str | Path, *, total_steps: int, start_step: int = 0, desc: str = "train",
                 wandb_project: str = "", config: dict[str, Any] | None = None, tensorboard: bool = True,
                 enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        self.path = Path(out) / "metrics.jsonl"
        for records in (self.path, Path(out) / "samples.jsonl"):
            drop_records_after(records, start_step)
        self.file = open(self.path, "a", encoding="utf-8")
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(out) / "tensorboard"), purge_step=start_step + 1 if start_step else None)
        self.wandb = None
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise RuntimeError("wandb_project is set but the wandb package is not installed") from None
            self.wandb = wandb.init(project=wandb_project, config=config, dir=str(out), resume="allow")
        self.bar = tqdm(total=total_steps, initial=start_step, desc=desc, dynamic_ncols=True, mininterval=0.5)

    def log(self, step: int, split: str, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "split": split, **{k: _plain(v) for k, v in metrics.items()}}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        for key, value in metrics.items():
            if self.tb is not None and isinstance(value, (int, float)) and math.isfinite(value):
                self.tb.add_scalar(f"{split}/{key}", value, step)
        if self.wandb is not None:
            self.wandb.log({f"{split}/{k}": v for k, v in metrics.items()}, step=step)

    def progress(self, step: int, shown: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)
        self.bar.update(step - self.bar.n)

    def write(self, text: str) -> None:
        """Print above the progress bar."""
        if not self.enabled:
            return
        self.bar.write(text)

    def close(self) -> None:
        if not self.enabled:
            return
        self.bar.close()
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def drop_records_after(path: Path, step: int) -> None:
    """On resume, forget what a crashed run logged past its last checkpoint (it will be logged again), and a last
    line the crash cut short."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
