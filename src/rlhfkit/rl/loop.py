"""The outer loop every on-policy algorithm shares: one iteration after another, the bad-iteration count and its
limit, logging, the progress bar, sample tables and checkpoints. An algorithm brings its iteration as a function of
the iteration number, returning (metrics, samples); everything around it is here.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from rlhfkit.training.distributed import World
from rlhfkit.training.guards import SkippedIteration, TrainingError, check_trained
from rlhfkit.training.metrics import RunLogger

Iteration = Callable[[int], tuple[dict[str, float], list[dict]]]  # iteration (0-based) -> (metrics, samples)


@dataclass(frozen=True)
class LoopSettings:
    iterations: int  # the run's last iteration (1-based)
    max_bad_steps: int  # this many skipped iterations in a row stop the run
    log_every: int
    sample_every: int  # 0: no sample tables
    num_samples: int
    save_every: int  # 0: no checkpoints
    snapshot_every: int = 0  # 0: no snapshots of the policy


def run_iterations(iterate: Iteration, start: int, settings: LoopSettings, logger: RunLogger,
                   save: Callable[[int], None], out: Path, world: World,
                   snapshot: Callable[[int], None] | None = None) -> None:
    """Iterations `start` .. settings.iterations - 1. An iteration is skipped when it raises SkippedIteration (a
    non-finite score) or some of its optimizer steps were skipped (metrics["skipped"] > 0: their share); either way
    the run warns and goes on, until max_bad_steps in a row stop it, and a run that skipped every iteration fails."""
    bad_in_a_row = 0
    for iteration in range(start, settings.iterations):
        done = iteration + 1
        try:
            metrics, samples = iterate(iteration)
            if metrics.get("skipped"):
                logger.write(f"warning: iteration {done}: non-finite loss or gradient, "
                             f"{metrics['skipped']:.0%} of its optimizer steps skipped")
        except SkippedIteration as skipped:
            metrics, samples = {"skipped": 1.0}, []
            logger.write(f"warning: {skipped}")
        bad_in_a_row = bad_in_a_row + 1 if metrics.get("skipped") else 0
        if bad_in_a_row >= settings.max_bad_steps:
            raise TrainingError(f"{bad_in_a_row} iterations in a row skipped (non-finite gradients or scores) at "
                                f"iteration {done}: lower the learning rates, check the reward, or use float32")
        if done % settings.log_every == 0 or done == settings.iterations:
            logger.log(done, "train", metrics)
        logger.progress(done, {k: metrics.get(key, float("nan")) for k, key in
                               (("score", "score"), ("kl", "kl"), ("len", "response_length"))})
        if (world.main and settings.sample_every and settings.num_samples and samples
                and (done % settings.sample_every == 0 or done == settings.iterations)):
            write_samples(out, samples, logger)
        if settings.save_every and done % settings.save_every == 0:
            save(done)
        if snapshot is not None and settings.snapshot_every and done % settings.snapshot_every == 0:
            snapshot(done)
    check_trained(bad_in_a_row, settings.iterations - start, "iteration")


def write_samples(out: Path, samples: list[dict], logger: RunLogger) -> None:
    """Append the samples to OUTPUT/samples.jsonl and show them as a table in the log."""
    from rich.console import Console
    from rich.table import Table

    with open(out / "samples.jsonl", "a", encoding="utf-8") as f:
        for row in samples:
            f.write(json.dumps(row) + "\n")
    table = Table(title=f"samples at iteration {samples[0]['step']}", show_lines=True)
    for column in ("prompt", "response", "score"):
        table.add_column(column, overflow="fold")
    for row in samples:
        table.add_row(row["prompt"][-200:], row["response"][:300], f"{row['score']:.3f}")
    buffer = io.StringIO()
    Console(file=buffer, width=120, markup=False).print(table)
    logger.write(buffer.getvalue().rstrip())
