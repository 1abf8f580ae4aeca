"""rlhfkit from Python: each stage and tool is a function whose keyword arguments are its config's fields.

    sft = rlhfkit.sft(model="runs/base", data=[{"instruction": ..., "output": ...}], output="runs/sft")
    run = rlhfkit.grpo(actor=sft, reward_fn=[my_fn], prompts=rows, output="runs/grpo")
    run.final, run.metrics[-1]["reward"]

A keyword argument has the flag's name (with underscores), default and checks; a bad value raises ConfigError with the
line the command prints, before any model loads. Beyond what a flag takes, a function accepts: a finished `Run` (or
any path-like object) wherever a model folder goes; a list of dicts or a `datasets.Dataset` wherever data goes (bad
rows are named `<data>[i]`); a callable, or a list of them, for `reward_fn` and `monitor_fn`; a dict {name: model}
for `compare`'s models. The command line calls the same `execute`, so both give the same run.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import signal
import sys
import tempfile
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from rlhfkit import in_memory
from rlhfkit.config import ConfigError, make_config, write_config


@dataclass(frozen=True)
class Run:
    """What a stage or tool leaves: its output folder, the model folders it wrote (`final` is the trained model: the
    actor for PPO and GRPO), the logged metrics (OUTPUT/metrics.jsonl: one dict per logged step, evaluations
    included), the resolved config, and a tool's own result (`eval_rm`'s metrics, `compare`'s rows, `demo`'s
    summary). A Run stands for its final model where a later stage takes a model: `rlhfkit.rm(model=sft_run, ...)`."""
    output: Path | None
    final: Path | None
    models: dict[str, Path]
    metrics: list[dict]
    config: Any
    result: Any = None

    def __fspath__(self) -> str:
        if self.final is None:
            raise TypeError(f"this run of {type(self.config).__name__} wrote no model to stand for")
        return str(self.final)


# command -> (config class, run function): "module:name" each, imported on first use so `import rlhfkit` stays light
STAGES = {
    "sft": ("rlhfkit.sft.train:SFTConfig", "rlhfkit.sft.train:run_sft"),
    "rm": ("rlhfkit.rm.train:RMConfig", "rlhfkit.rm.train:run_rm"),
    "ppo": ("rlhfkit.ppo.config:PPOConfig", "rlhfkit.ppo.train:run_ppo"),
    "grpo": ("rlhfkit.grpo.config:GRPOConfig", "rlhfkit.grpo.train:run_grpo"),
    "dpo": ("rlhfkit.dpo.train:DPOConfig", "rlhfkit.dpo.train:run_dpo"),
    "eval-rm": ("rlhfkit.rm.evaluate:EvalRMConfig", "rlhfkit.rm.evaluate:run_eval_rm"),
    "compare": ("rlhfkit.tools.compare:CompareConfig", "rlhfkit.tools.compare:run_compare"),
    "demo": ("rlhfkit.demo.run:DemoConfig", "rlhfkit.demo.run:run_demo"),
}
FUNCTION_FIELDS = ("reward_fn", "monitor_fn")
MODEL_FOLDERS = ("final", "final_critic", "final_ema")


def resolve(target: str) -> Any:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def config_class(command: str) -> type:
    return resolve(STAGES[command][0])


# ------------------------------------------------------------------------------------------------ Python -> config
def build(command: str, options: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """(the checked config, the objects to register for the run) from a function's keyword arguments."""
    cls = config_class(command)
    hints = typing.get_type_hints(cls)
    values, objects = {}, {}
    for key, value in options.items():
        if key not in hints:  # make_config names the closest field
            values[key] = value
            continue
        is_list = typing.get_origin(hints[key]) is list
        if key in FUNCTION_FIELDS:
            value = _functions(key, value, objects, is_list)
        elif key == "models" and isinstance(value, dict):  # compare: {name: model}
            value = [f"{name}={_path(model)}" for name, model in value.items()]
        elif is_list and _is_table(value):
            objects[f"<{key}>"] = value
            value = [f"<{key}>"]
        elif is_list and isinstance(value, (list, tuple)):
            value = [_path(v) for v in value]
        else:
            value = _path(value)
        values[key] = value
    with in_memory.registered(objects):  # the config's checks see the registered data and functions
        config = make_config(cls, values)
    return config, objects


def _is_table(value: Any) -> bool:
    """Rows in memory: a `datasets.Dataset` (told by its column names, without importing datasets) or a non-empty
    list of dicts."""
    if hasattr(value, "column_names") and hasattr(value, "__iter__"):
        return True
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(v, dict) for v in value)


def _path(value: Any) -> Any:
    return os.fspath(value) if isinstance(value, os.PathLike) else value


def _functions(key: str, value: Any, objects: dict[str, Any], is_list: bool) -> Any:
    items = value if isinstance(value, (list, tuple)) else [value]
    specs = []
    for item in items:
        if callable(item):
            name = in_memory.function_name(key, item)
            objects[name] = item
            specs.append(name)
        else:
            specs.append(item)
    return specs if is_list else (specs[0] if specs else "")


# --------------------------------------------------------------------------------------------------------- running
def execute(command: str, config: Any, objects: dict[str, Any] | None = None, argv: list[str] | None = None) -> Run:
    """Run `command` with a checked config, here or (with nproc > 1 outside torchrun) on nproc local ranks, and
    collect its Run. `argv`: the command line that made the config, passed on to the ranks; from Python the config
    goes to them as a YAML file."""
    objects = objects or {}
    if getattr(config, "nproc", 0) > 1 and "LOCAL_RANK" not in os.environ:
        if objects:
            names = ", ".join(sorted(objects))
            raise ConfigError(f"nproc: {names} live in this Python process and cannot reach the {config.nproc} "
                              "processes nproc starts; write data to a file and give functions as module:function, or "
                              "start your script with torchrun (each rank then runs it and hands them over)")
        return _launch(command, config, argv)
    from rlhfkit.training.distributed import close_world

    with in_memory.registered(objects):
        result = resolve(STAGES[command][1])(config)
    close_world()
    return collect(config, result)


def _launch(command: str, config: Any, argv: list[str] | None) -> Run:
    from rlhfkit.training.distributed import check_gpu_count, launch
    from rlhfkit.training.guards import TrainingError

    check_gpu_count(config.nproc)
    with tempfile.TemporaryDirectory() as tmp:
        if argv is None:
            write_config(config, Path(tmp) / "config.yaml")
            argv = ["--config", str(Path(tmp) / "config.yaml")]
        code = launch(command, argv, config.nproc)
    if code == 2:
        raise ConfigError(f"{command}: the {config.nproc} ranks stopped on the error above")
    if code > 128:  # this process was signalled; torchrun's agent stopped the ranks
        raise TrainingError(f"{command}: stopped by {signal.Signals(code - 128).name}; --resume continues from the "
                            "last checkpoint")
    if code:
        raise TrainingError(f"{command}: the {config.nproc} ranks stopped with exit code {code} (their log says why)")
    return collect(config, None)


def collect(config: Any, result: Any) -> Run:
    output = Path(config.output) if getattr(config, "output", "") else None
    if output is None or not output.is_dir():  # a tool that wrote a file, or nothing
        return Run(output, None, {}, [result] if isinstance(result, dict) else [], config, result)
    models = {name: output / name for name in MODEL_FOLDERS if (output / name).is_dir()}
    metrics_file = output / "metrics.jsonl"
    metrics = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()] \
        if metrics_file.is_file() else ([result] if isinstance(result, dict) else [])
    return Run(output, models.get("final"), models, metrics, config, result)


# ---------------------------------------------------------------------------------------------- the functions
SUMMARIES = {
    "sft": "Supervised fine-tuning of a causal LM on demonstrations (`rlhfkit sft`).",
    "rm": "Train a reward model on preference pairs (`rlhfkit rm`).",
    "ppo": "PPO with a reward model or functions, KL penalty, GAE and PTX (`rlhfkit ppo`).",
    "grpo": "Critic-free RL: GRPO, Dr.GRPO, RLOO, REINFORCE++ (`rlhfkit grpo`).",
    "dpo": "Train the policy on preference pairs directly: DPO, IPO, SimPO (`rlhfkit dpo`).",
    "eval-rm": "A reward model's accuracy on preference pairs (`rlhfkit eval-rm`); Run.result holds the metrics.",
    "compare": "Several models' answers to the same prompts (`rlhfkit compare`); Run.result holds the rows.",
    "demo": "The whole pipeline offline on a CPU, with a gold evaluation (`rlhfkit demo`); Run.result: the summary.",
}


def run_command(command: str, options: dict[str, Any]) -> Run:
    config, objects = build(command, options)
    return execute(command, config, objects)


def docstring(command: str) -> str:
    lines = [SUMMARIES[command], "", f"Keyword arguments: the fields of `rlhfkit {command} --help`, with the same "
                                     "names, defaults and checks. Returns a Run.", ""]
    for f in dataclasses.fields(config_class(command)):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"    {f.name} = {default!r}: {f.metadata.get('help', '')}")
    return "\n".join(lines)


class StagePackage(types.ModuleType):
    """A stage's package (rlhfkit.sft, rlhfkit.ppo, ...) that is also its function: `rlhfkit.sft(model=...)` runs the
    stage and `help(rlhfkit.sft)` lists its keyword arguments, while `rlhfkit.sft.train` stays the module it is."""
    command: str

    def __call__(self, **options: Any) -> Run:
        return run_command(self.command, options)

    @property
    def __doc__(self) -> str:  # built on first read: it imports the config class, which a bare import must not
        return docstring(self.command)


def stage_package(module_name: str, command: str) -> None:
    """Make the package `module_name` callable as `command` (called from the package's __init__)."""
    module = sys.modules[module_name]
    module.__class__ = StagePackage
    module.command = command


def _function(command: str) -> Callable[..., Run]:
    def function(**options: Any) -> Run:
        return run_command(command, options)

    function.__name__ = function.__qualname__ = command.replace("-", "_")
    function.__doc__ = SUMMARIES[command] + f" Keyword arguments: the fields of `rlhfkit {command} --help`."
    return function


eval_rm = _function("eval-rm")
compare = _function("compare")


__all__ = ["Run", "eval_rm", "compare", "execute", "stage_package"]
