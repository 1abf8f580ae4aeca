"""Options that used to crash (a traceback, often after the models loaded) or pass silently: each is now one line,
exit code 2, naming the field, file or function, before any model is loaded where that is possible (issue 14, 5)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import color_sft_rows, write_jsonl

from rlhfkit import models
from rlhfkit.cli import main


@pytest.fixture
def paths(tiny_models, tmp_path) -> dict[str, Path]:
    return {"model": tiny_models["llama"], "data": write_jsonl(tmp_path / "sft.jsonl", color_sft_rows(8)),
            "prompts": write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "What color is item 3?"}] * 4),
            "output": tmp_path / "out", "dir": tmp_path}


@pytest.fixture
def no_model_loads(monkeypatch):
    """Any model load fails the test: these mistakes must be found before."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    for name in ("load_causal_lm", "load_sequence_classifier"):
        monkeypatch.setattr(models, name, refuse)
    for module in ("rlhfkit.sft.train", "rlhfkit.rm.train", "rlhfkit.ppo.train", "rlhfkit.rm.evaluate",
                   "rlhfkit.tools.chat", "rlhfkit.tools.compare"):
        imported = pytest.importorskip(module)
        for name in ("load_causal_lm", "load_sequence_classifier"):
            if hasattr(imported, name):
                monkeypatch.setattr(imported, name, refuse)


def sft_args(paths, *flags: str) -> list[str]:
    return ["sft", "--model", str(paths["model"]), "--data", str(paths["data"]), "--output", str(paths["output"]),
            *flags]


def ppo_args(paths, *flags: str) -> list[str]:
    return ["ppo", "--actor", str(paths["model"]), "--reward", str(paths["model"]), "--prompts", str(paths["prompts"]),
            "--output", str(paths["output"]), *flags]


def one_line_error(capsys, argv: list[str], *needles: str) -> str:
    """Run the CLI; assert exit code 2 and a single `rlhfkit CMD: error: ...` line holding every needle."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    assert err.endswith("\n") and "\n" not in err.rstrip("\n"), f"not one line: {err!r}"
    assert err.startswith(f"rlhfkit {argv[0]}: error: "), err
    for needle in needles:
        assert needle in err, (needle, err)
    return err.rstrip("\n")


# --------------------------------------------------------------------------------------- finite numbers, seed


@pytest.mark.parametrize("flags,message", [
    (["--lora-r", "4", "--lora-alpha", "nan"], "lora_alpha: must be a finite number, got nan"),
    (["--weight-decay", "inf", "--lr", "1e-3"], "weight_decay: must be a finite number, got inf"),
    (["--epochs", "inf"], "epochs: must be a finite number, got inf"),
    (["--max-grad-norm=-inf"], "max_grad_norm: must be a finite number, got -inf"),
    (["--seed", "99999999999999999999999"], "seed: must be in [0, 4294967295]"),
    (["--seed=-1"], "seed: must be in [0, 4294967295]"),
])
def test_non_finite_numbers_and_huge_seeds(flags, message, paths, capsys, no_model_loads):
    one_line_error(capsys, sft_args(paths, *flags), message)
    assert not paths["output"].exists()


def test_non_finite_numbers_in_yaml_and_other_commands(paths, capsys, no_model_loads):
    config = paths["dir"] / "run.yaml"
    config.write_text(yaml.safe_dump({"lora_alpha": float("nan")}), encoding="utf-8")
    one_line_error(capsys, sft_args(paths, "--config", str(config)), "lora_alpha: must be a finite number, got nan")
    one_line_error(capsys, ppo_args(paths, "--critic-lr", "inf"), "critic_lr: must be a finite number, got inf")
    one_line_error(capsys, ["chat", "--model", str(paths["model"]), "--temperature", "nan"],
                   "temperature: must be a finite number, got nan")
    one_line_error(capsys, ["demo", "--seed", str(2**64)], "seed: must be in [0, 4294967295]")


@pytest.mark.parametrize("weight", ["nan", "inf"])
def test_data_mixing_weight_must_be_finite(weight, paths, capsys, no_model_loads):
    spec = f"{paths['data']}:{weight}"
    one_line_error(capsys, ["sft", "--model", str(paths["model"]), "--data", spec, "--output", str(paths["output"])],
                   f"data: {spec}: the mixing weight must be a finite number")
    one_line_error(capsys, ppo_args(paths, "--ptx-data", spec), f"ptx_data: {spec}: the mixing weight")
    one_line_error(capsys, ["eval-rm", "--model", str(paths["model"]), "--data", spec], f"data: {spec}: the mixing")


# ------------------------------------------------------------------------------------------ unknown-flag hints


@pytest.mark.parametrize("flag,hint", [("--learning-rate", "--lr"), ("--num-train-epochs", "--epochs"),
                                       ("--output-dir", "--output"), ("--max-seq-length", "--max-len"),
                                       ("--per-device-train-batch-size", "--micro-batch-size"),
                                       ("--max-step", "--max-steps")])
def test_unknown_flags_suggest_what_other_frameworks_call_them(flag, hint, paths, capsys):
    one_line_error(capsys, sft_args(paths, f"{flag}=1"), f"unknown option {flag} (did you mean {hint}?)")


def test_unknown_yaml_key_from_another_framework(paths, capsys):
    config = paths["dir"] / "run.yaml"
    config.write_text(yaml.safe_dump({"learning_rate": 0.1}), encoding="utf-8")
    one_line_error(capsys, sft_args(paths, "--config", str(config)), "unknown key 'learning_rate' (did you mean lr?)")
