"""Typed stage configs: documented dataclass fields, YAML files and command-line flags under one rule.

The rule: every field `some_name` of a stage's config is the YAML key `some_name` and the flag `--some-name`.
Precedence is defaults < `--config FILE.yaml` < flags. Values are converted to the field's type and checked by the
config's `check()` before any model is loaded; every mistake is a `ConfigError` with a one-line message.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad config value, key or file: one line, shown to the user without a traceback (exit code 2)."""


def option(default: Any, help: str, *, group: str = "general", choices: tuple[str, ...] | None = None,
           repeat: bool = False) -> Any:
    """A documented config field. Lists are copied per instance. A list flag given twice keeps the later values,
    unless `repeat`: then each use adds to the list (`--reward-fn a.py:f --reward-fn b.py:g`)."""
    meta = {"help": help, "group": group, "choices": choices, "repeat": repeat}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda d=default: list(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _base_type(annotation: Any) -> tuple[type, bool]:
    """(scalar type, is_list) of an annotation such as `float`, `str | None` or `list[str]`."""
    origin = typing.get_origin(annotation)
    if origin in (list, tuple):
        return typing.get_args(annotation)[0], True
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _base_type(args[0])
    return annotation, False


def _convert(name: str, value: Any, annotation: Any) -> Any:
    """Convert a YAML or command-line value to the field's type, or raise a ConfigError naming the field."""
    scalar, is_list = _base_type(annotation)
    if is_list:
        if not isinstance(value, (list, tuple)):
            value = [value]
        # `a,b` means two items, from YAML or a flag alike (`--resume-allow lr,kl_coef`, `--lora-target-modules q,v`)
        parts = [p for v in value for p in (v.split(",") if isinstance(v, str) else [v])]
        value = [p.strip() if isinstance(p, str) else p for p in parts if not isinstance(p, str) or p.strip()]
        return [_convert(name, v, scalar) for v in value]
    if value is None:
        return None
    if scalar is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if scalar in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        try:
            number = float(value) if scalar is float else int(str(value).strip())
        except (TypeError, ValueError):
            kind = "a whole number" if scalar is int else "a number"
            raise ConfigError(f"{name}: expected {kind}, got {value!r}") from None
        if scalar is float and not math.isfinite(number):  # no field means anything by nan or inf; they only poison
            raise ConfigError(f"{name}: must be a finite number, got {value}")
        return number
    if scalar is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return str(value)
    if isinstance(value, dict) and scalar is dict:
        return value
    raise ConfigError(f"{name}: unsupported value {value!r}")


# Names other frameworks (Hugging Face Trainer, TRL, OpenRLHF) use for fields rlhfkit spells differently: spelling
# alone would not find these (`--learning-rate` is closer to `--eval-data` than to `--lr`).
ALIASES = {
    "learning_rate": "lr", "num_epochs": "epochs", "num_train_epochs": "epochs", "n_epochs": "epochs",
    "train_batch_size": "batch_size", "per_device_train_batch_size": "micro_batch_size",
    "gradient_accumulation_steps": "micro_batch_size", "warmup_ratio": "warmup_steps",
    "lr_scheduler_type": "lr_schedule", "max_seq_length": "max_len", "max_length": "max_len",
    "model_name_or_path": "model", "output_dir": "output", "resume_from_checkpoint": "resume",
    "save_steps": "save_every", "logging_steps": "log_every", "eval_steps": "eval_every", "lora_rank": "lora_r",
    "init_kl_coef": "kl_coef", "kl_coeff": "kl_coef", "train_file": "data", "dataset": "data",
}


def _closest(name: str, candidates: list[str]) -> str:
    """A hint naming the candidate (a flag or a YAML key, as `candidates` spell them) the user probably meant."""
    alias = ALIASES.get(name.lstrip("-").replace("-", "_"))
    if alias is not None:
        spelled = flag_name(alias) if name.startswith("--") else alias
        if spelled in candidates:
            return f" (did you mean {spelled}?)"
    match = difflib.get_close_matches(name, candidates, n=1, cutoff=0.5)
    return f" (did you mean {match[0]}?)" if match else ""


class _Parser(argparse.ArgumentParser):
    """argparse whose mistakes (bad choice, missing value) are a one-line ConfigError, not usage text and an exit."""

    def error(self, message: str):
        raise ConfigError(message)


def build_parser(cls: type, prog: str, description: str) -> argparse.ArgumentParser:
    """An argparse parser with one flag per field, listed by group with its default and meaning."""
    parser = _Parser(
        prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        argument_default=argparse.SUPPRESS, allow_abbrev=False,
    )
    parser.add_argument("--config", help="YAML file of field values; flags override it", default=argparse.SUPPRESS)
    hints = typing.get_type_hints(cls)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(cls):
        group = groups.setdefault(f.metadata["group"], parser.add_argument_group(f.metadata["group"]))
        scalar, is_list = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kwargs: dict[str, Any] = {"help": f"{f.metadata['help']} (default: {default!r})", "dest": f.name}
        if f.metadata.get("choices"):
            kwargs["choices"] = f.metadata["choices"]
        if is_list:
            kwargs["nargs"] = "+"
            if f.metadata.get("repeat"):
                kwargs["action"] = "extend"
        elif scalar is bool:
            kwargs["nargs"] = "?"
            kwargs["const"] = "true"
            kwargs["metavar"] = "BOOL"
        elif f.name == "resume":
            kwargs["nargs"] = "?"
            kwargs["const"] = "latest"
        group.add_argument(flag_name(f.name), **kwargs)
    # ArgumentDefaultsHelpFormatter would print SUPPRESS; our help strings carry the defaults instead.
    parser.formatter_class = argparse.HelpFormatter
    return parser


def parse_config(cls: type, argv: list[str], prog: str, description: str = "") -> Any:
    """Build a `cls` instance from defaults, an optional YAML file and flags, then run its `check()`."""
    parser = build_parser(cls, prog, description)
    known, unknown = parser.parse_known_args(argv)
    flags = [flag_name(f.name) for f in dataclasses.fields(cls)] + ["--config"]
    for arg in unknown:
        if arg.startswith("--"):
            name = arg.split("=", 1)[0]
            raise ConfigError(f"unknown option {name}{_closest(name, flags)}")
        raise ConfigError(f"unexpected argument {arg!r}")
    values: dict[str, Any] = {}
    config_file = getattr(known, "config", None)
    if config_file:
        values.update(load_yaml(cls, config_file))
    values.update({k: v for k, v in vars(known).items() if k != "config"})
    return make_config(cls, values)


def load_yaml(cls: type, path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of field: value, got {type(data).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            raise ConfigError(f"{path}: unknown key {key!r}{_closest(str(key), names)}")
    return data


def make_config(cls: type, values: dict[str, Any]) -> Any:
    """Convert `values` to the fields' types, build the config and check it."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    converted = {}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(f"unknown key {key!r}{_closest(key, names)}")
        if key == "resume" and isinstance(value, bool):  # `resume: true` in YAML means the latest checkpoint
            value = "latest" if value else ""
        converted[key] = _convert(key, value, hints[key])
    config = cls(**converted)
    for f in dataclasses.fields(cls):
        choices = f.metadata.get("choices")
        if choices and getattr(config, f.name) not in choices:
            raise ConfigError(f"{f.name}: expected one of {', '.join(choices)}, got {getattr(config, f.name)!r}")
    config.check()
    return config


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def write_config(config: Any, path: str | Path) -> None:
    """The resolved config, readable back with `--config`."""
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False), encoding="utf-8")


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


# numpy's range; it also keeps the streams derived from a seed (seed * 1_000_003 + step) within torch's 64 bits.
MAX_SEED = 2**32 - 1


def require_seed(seed: int) -> None:
    require(0 <= seed <= MAX_SEED, f"seed: must be in [0, {MAX_SEED}] (2**32 - 1), got {seed}")
