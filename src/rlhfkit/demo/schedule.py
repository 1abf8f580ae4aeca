"""The demo's stages after SFT, trained several at a time, each in a worker process with a fixed number of threads.

Why: the demo's models are small (hidden 128), and in bf16 one stage cannot keep two cores busy. On 2 cores (Intel
Xeon with AMX), 100 reward-model steps took 28.7 s on 2 threads and 40.6 s on 1, while two 1-thread runs at once took
36.9 s; 20 GRPO iterations took 21.5, 27.5 and 26.8 s. (float32 stages are bound by the multiply rate instead, and two
at once slow each other down: the demo runs them one at a time.) Each stage runs on the same number of threads on
every run, so a seed's numbers still repeat exactly.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Callable

from rlhfkit.config import ConfigError
from rlhfkit.data.readers import DataError
from rlhfkit.training.common import log
from rlhfkit.training.guards import TrainingError


def run_stages(stages: dict[str, Callable], build: Callable[[str], object], depends: dict[str, tuple[str, ...]],
               done: set[str], jobs: int, threads: int, logs: Path, finished: Callable[[str, float, object], None]
               ) -> None:
    """Run `stages` (name -> its function, in order of priority) `jobs` at a time, each on `threads` threads in a
    worker process, called with the config or record `build(name)` makes as it starts; a stage starts once the
    stages it depends on are in `done`. Each stage's output goes to LOGS/NAME.log; `finished(name, seconds, what its
    function returned)` is called as each one ends. Training stages (configs with max_steps) are announced in the log
    and get a progress bar. The first failure stops the others and is raised here (a user's mistake as the one-line
    error it was in the stage)."""
    logs.mkdir(parents=True, exist_ok=True)
    pending = list(stages)
    running: dict[Future, str] = {}
    progress = _Progress()
    # spawn, not fork: the parent has started torch's thread pools, which a forked child would inherit broken.
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_exit_with_parent,
                             initargs=(os.getpid(),)) as pool:
        try:
            while pending or running:
                for name in [n for n in pending if done.issuperset(depends.get(n, ()))][:jobs - len(running)]:
                    run, config = stages[name], build(name)
                    if hasattr(config, "max_steps"):
                        log.info(f"--- demo stage: {name} (in a worker, {threads} thread{'s' * (threads > 1)}; its "
                                 f"log: {logs / name}.log)")
                        progress.start(name, config)
                    running[pool.submit(_work, run, config, threads, logs / f"{name}.log")] = name
                    pending.remove(name)
                if not running:
                    raise RuntimeError(f"stages {pending} wait on stages that never ran")
                ended, _ = wait(running, timeout=0.5, return_when=FIRST_COMPLETED)
                progress.update()
                for future in ended:
                    name = running.pop(future)
                    try:
                        seconds, error, result = future.result()
                    except BrokenProcessPool:
                        raise TrainingError(f"{name}: its worker process died (killed, or out of memory); --resume "
                                            "keeps the stages that finished") from None
                    if error:
                        kind, message = error
                        raise (ConfigError if kind == "config" else TrainingError)(f"{name}: {message}")
                    if name in progress.tasks:
                        progress.stop(name)
                        log.info(f"--- demo stage: {name} finished in {seconds:.0f} s")
                    done.add(name)
                    finished(name, seconds, result)
        except BaseException:
            progress.close()
            for child in multiprocessing.active_children():  # the executor would wait for the running stages
                child.terminate()
            raise
    progress.close()


def _work(run: Callable, config: object, threads: int, log_file: Path) -> tuple[float, tuple[str, str] | None, object]:
    """In the worker: run one stage with its output in `log_file`; (seconds, error, what `run` returned). A user's
    mistake comes back as error (kind, message), since some of its exception classes cannot be rebuilt from their
    message in the parent."""
    import torch

    from rlhfkit.training.common import setup_logging

    torch.set_num_threads(threads)
    sys.stdout.flush()
    sys.stderr.flush()
    with open(log_file, "w") as file:
        os.dup2(file.fileno(), 1)
        os.dup2(file.fileno(), 2)
    setup_logging()
    start = time.perf_counter()
    try:
        result = run(config)
    except (ConfigError, DataError) as exc:
        return 0.0, ("config", str(exc)), None
    except TrainingError as exc:
        return 0.0, ("training", str(exc)), None
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    return round(time.perf_counter() - start, 1), None, result


def _exit_with_parent(parent: int) -> None:
    """In each worker as it starts: end it when the demo's process `parent` is gone (killed, it cannot stop its
    workers), rather than train on."""
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


class _Progress:
    """One bar per running stage in a terminal, read from the stage's metrics.jsonl (one train record per step)."""

    def __init__(self):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.tasks: dict[str, tuple[int, Path]] = {}
        self.bars = Progress(TextColumn("{task.description:>10}"), BarColumn(), MofNCompleteColumn(),
                             TimeElapsedColumn(), console=Console(stderr=True), disable=not sys.stderr.isatty(),
                             transient=True)
        self.bars.start()

    def start(self, name: str, config) -> None:
        task = self.bars.add_task(name, total=getattr(config, "max_steps", None) or None)
        self.tasks[name] = task, Path(config.output) / "metrics.jsonl"

    def update(self) -> None:
        for task, metrics in self.tasks.values():
            self.bars.update(task, completed=_steps_logged(metrics))

    def stop(self, name: str) -> None:
        self.bars.remove_task(self.tasks.pop(name)[0])

    def close(self) -> None:
        self.bars.stop()


def _steps_logged(metrics: Path) -> int:
    try:
        lines = metrics.read_text().splitlines()
    except OSError:
        return 0
    steps = [json.loads(line)["step"] for line in lines[-50:] if '"split": "train"' in line and line.endswith("}")]
    return max(steps, default=0)
