"""Config files, flags and their precedence; the CLI's one-line errors (exit code 2) and --help."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from conftest import color_sft_rows, write_jsonl

from rlhfkit.cli import main
from rlhfkit.config import ConfigError, flag_name, make_config, parse_config
from rlhfkit.rm.train import RMConfig
from rlhfkit.sft.train import SFTConfig
from rlhfkit.training.common import start_run


@pytest.fixture
def paths(tiny_models, tmp_path) -> dict[str, Path]:
    return {"model": tiny_models["llama"], "data": write_jsonl(tmp_path / "sft.jsonl", color_sft_rows(8)),
            "output": tmp_path / "out", "dir": tmp_path}


def required(paths) -> list[str]:
    return ["--model", str(paths["model"]), "--data", str(paths["data"]), "--output", str(paths["output"])]


def write_yaml(path: Path, values: dict) -> Path:
    path.write_text(yaml.safe_dump(values), encoding="utf-8")
    return path


def run_cli(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, command: str, *needles: str) -> None:
    assert code == 2
    assert "Traceback" not in err
    assert err.endswith("\n") and "\n" not in err.rstrip("\n"), f"not one line: {err!r}"
    assert err.startswith(f"rlhfkit {command}: error: "), err
    for needle in needles:
        assert needle in err, (needle, err)


# ---------------------------------------------------------------------------------------------- precedence


def test_defaults_then_yaml_then_flags(paths):
    config_file = write_yaml(paths["dir"] / "run.yaml", {
        "model": str(paths["model"]), "data": [str(paths["data"])], "output": str(paths["output"]),
        "lr": 0.001, "batch_size": 4, "max_steps": 7, "seed": 1, "lora_target_modules": "q_proj, v_proj",
    })
    config = parse_config(SFTConfig, ["--config", str(config_file), "--lr", "0.002", "--seed=3"], "rlhfkit sft")
    assert config.lr == 0.002  # flag over YAML
    assert config.seed == 3  # flag (--name=value form) over YAML
    assert config.batch_size == 4 and config.max_steps == 7  # YAML over defaults
    assert config.lora_target_modules == ["q_proj", "v_proj"]  # a comma list in YAML becomes a list
    assert config.micro_batch_size == 0 and config.epochs == 1.0 and config.eval_split == 0.05  # defaults
    assert config.loss_on == "assistant" and config.lr_schedule == "cosine"
    assert isinstance(config.lr, float) and isinstance(config.batch_size, int)


def test_stage_defaults_differ_where_documented(paths):
    argv = required(paths)
    assert parse_config(SFTConfig, argv, "rlhfkit sft").lr == 2e-5
    assert parse_config(RMConfig, argv, "rlhfkit rm").lr == 1e-5
    assert parse_config(RMConfig, argv, "rlhfkit rm").loss == "log_sig"


def test_flag_forms(paths, tmp_path):
    other = write_jsonl(tmp_path / "more.jsonl", color_sft_rows(4))
    config = parse_config(SFTConfig, required(paths) + ["--data", str(paths["data"]), f"{other}:0.5",
                                                        "--skip-invalid", "--lora-merge", "false", "--resume",
                                                        "--gradient-checkpointing", "yes"], "rlhfkit sft")
    assert config.data == [str(paths["data"]), f"{other}:0.5"]  # the later --data replaces the first
    assert config.skip_invalid is True and config.lora_merge is False and config.gradient_checkpointing is True
    assert config.resume == "latest"  # bare --resume
    config = parse_config(SFTConfig, required(paths) + ["--resume", str(tmp_path)], "rlhfkit sft")
    assert config.resume == str(tmp_path)


@pytest.mark.cpu
def test_resolved_config_written_and_readable_back(paths):
    config_file = write_yaml(paths["dir"] / "run.yaml", {"batch_size": 4, "lr": 0.001, "eval_split": 0.25})
    config = parse_config(SFTConfig, ["--config", str(config_file), "--max-steps", "9"] + required(paths),
                          "rlhfkit sft")
    out, resume_from, _ = start_run(config, "sft", config.model)
    assert resume_from is None
    written = yaml.safe_load((out / "config.yaml").read_text())
    assert written == dataclasses.asdict(config)  # every field, resolved
    assert written["max_steps"] == 9 and written["batch_size"] == 4 and written["micro_batch_size"] == 0
    assert written["dtype"] == "float32"  # auto, resolved (to float32 here: see conftest's float32_by_default)
    again = parse_config(SFTConfig, ["--config", str(out / "config.yaml")], "rlhfkit sft")
    assert again == config


# ------------------------------------------------------------------------------------------- unknown names


def test_unknown_yaml_key_names_closest_field(paths, capsys):
    config_file = write_yaml(paths["dir"] / "run.yaml", {"batchsize": 4})
    with pytest.raises(ConfigError, match=r"unknown key 'batchsize' \(did you mean batch_size\?\)"):
        parse_config(SFTConfig, ["--config", str(config_file)] + required(paths), "rlhfkit sft")
    code, _, err = run_cli(capsys, ["sft", "--config", str(config_file)] + required(paths))
    assert_one_line_error(code, err, "sft", str(config_file), "'batchsize'", "did you mean batch_size?")


def test_unknown_flag_names_closest_flag(paths, capsys):
    code, _, err = run_cli(capsys, ["rm"] + required(paths) + ["--max-step", "3"])
    assert_one_line_error(code, err, "rm", "unknown option --max-step", "did you mean --max-steps?")
    code, _, err = run_cli(capsys, ["sft"] + required(paths) + ["--learning-rate=0.1"])
    assert_one_line_error(code, err, "sft", "unknown option --learning-rate")
    code, _, err = run_cli(capsys, ["sft"] + required(paths) + ["stray"])
    assert_one_line_error(code, err, "sft", "unexpected argument 'stray'")


def test_unknown_key_in_make_config():
    with pytest.raises(ConfigError, match=r"unknown key 'max_stesp' \(did you mean max_steps\?\)"):
        make_config(SFTConfig, {"max_stesp": 3})


# ------------------------------------------------------------------------------------------- invalid values


INVALID = [
    (["--lr", "-1"], "lr: must be > 0, got -1.0"),
    (["--lr", "0"], "lr: must be > 0"),
    (["--lr", "fast"], "lr: expected a number, got 'fast'"),
    (["--batch-size", "0"], "batch_size: must be >= 1, got 0"),
    (["--batch-size", "8", "--micro-batch-size", "3"], "micro_batch_size: 3 must divide batch_size 8"),
    (["--micro-batch-size", "-2"], "micro_batch_size: must be >= 0"),
    (["--max-steps", "2.5"], "max_steps: expected a whole number, got '2.5'"),
    (["--eval-split", "1"], "eval_split: must be in [0, 1)"),
    (["--keep-last", "0"], "keep_last: must be >= 1"),
    (["--lora-merge", "maybe"], "lora_merge: expected true or false, got 'maybe'"),
    (["--dtype", "fp16"], "argument --dtype: invalid choice: 'fp16'"),
    (["--max-len", "4"], "max_len: must be >= 8"),
    (["--lr"], "argument --lr: expected one argument"),
]


@pytest.mark.parametrize("command", ["sft", "rm"])
@pytest.mark.parametrize("flags,message", INVALID, ids=[" ".join(f) for f, _ in INVALID])
def test_invalid_value_exits_2_with_one_line(command, flags, message, paths, capsys):
    code, out, err = run_cli(capsys, [command] + required(paths) + flags)
    assert_one_line_error(code, err, command, message)
    assert not paths["output"].exists()  # stopped before anything was created or loaded


def test_missing_files_exit_2(paths, capsys):
    missing = paths["dir"] / "nope.jsonl"
    argv = ["--model", str(paths["model"]), "--data", str(missing), "--output", str(paths["output"])]
    code, _, err = run_cli(capsys, ["sft"] + argv)
    assert_one_line_error(code, err, "sft", f"data: {missing}: no such file or folder")
    code, _, err = run_cli(capsys, ["rm"] + required(paths) + ["--eval-data", str(missing)])
    assert_one_line_error(code, err, "rm", f"{missing}: no such file or folder")
    code, _, err = run_cli(capsys, ["sft", "--config", str(paths["dir"] / "none.yaml")] + required(paths))
    assert_one_line_error(code, err, "sft", "none.yaml does not exist")
    code, _, err = run_cli(capsys, ["sft", "--data", str(paths["data"]), "--output", str(paths["output"])])
    assert_one_line_error(code, err, "sft", "model: required")
    code, _, err = run_cli(capsys, ["sft", "--model", "./no/such/model", "--data", str(paths["data"]), "--output",
                                    str(paths["output"])])
    assert_one_line_error(code, err, "sft", "model: ./no/such/model does not exist")
    assert not paths["output"].exists()


def test_invalid_yaml_values_exit_2(paths, capsys):
    for values, message in [({"max_steps": 2.5}, "max_steps: expected a whole number"),
                            ({"batch_size": 0}, "batch_size: must be >= 1"),
                            ({"lr": [1, 2]}, "lr: expected a number"),
                            ({"skip_invalid": "often"}, "skip_invalid: expected true or false")]:
        config_file = write_yaml(paths["dir"] / "bad.yaml", values)
        code, _, err = run_cli(capsys, ["sft", "--config", str(config_file)] + required(paths))
        assert_one_line_error(code, err, "sft", message)
    (paths["dir"] / "list.yaml").write_text("- lr\n- 0.1\n")
    code, _, err = run_cli(capsys, ["sft", "--config", str(paths["dir"] / "list.yaml")] + required(paths))
    assert_one_line_error(code, err, "sft", "expected a mapping of field: value, got list")


# ---------------------------------------------------------------------------------------------------- help


@pytest.mark.parametrize("command,cls", [("sft", SFTConfig), ("rm", RMConfig)])
def test_help_lists_every_field_with_default(command, cls, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "1000")  # no line wrapping inside help texts
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: rlhfkit {command} ")
    text = " ".join(out.split())
    fields = dataclasses.fields(cls)
    assert len(fields) > 30
    for f in fields:
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        assert f"{flag_name(f.name)} " in text, f.name
        assert f"{' '.join(f.metadata['help'].split())} (default: {default!r})" in text, f.name
    assert "--config" in text


def test_top_level_usage_and_unknown_command(capsys):
    assert main([]) == 2
    assert "stages:" in capsys.readouterr().out
    assert main(["--help"]) == 0
    assert "eval-rm" in capsys.readouterr().out
    code, _, err = run_cli(capsys, ["stf"])
    assert code == 2 and "unknown command 'stf' (did you mean sft?)" in err


def test_dtype_auto_follows_the_hardware_and_the_model_width(monkeypatch, tmp_path, caplog):
    import logging

    import rlhfkit.models as models

    monkeypatch.setattr(models, "cpu_bf16_instructions", lambda: ("amx_bf16", "avx512_bf16"))
    models._log_once.cache_clear()
    with caplog.at_level(logging.INFO, logger="rlhfkit"):
        assert models.resolve_dtype("auto", "cpu", 64) == "bfloat16"
        assert models.resolve_dtype("auto", "cpu", 32) == "float32"  # too narrow to gain from bf16
    assert "dtype auto: bfloat16 (this CPU has amx_bf16 and avx512_bf16)" in caplog.messages
    assert ("dtype auto: float32 (this CPU has amx_bf16 and avx512_bf16, but at hidden size 32 (< 64) bf16 autocast "
            "measured slower than float32)") in caplog.messages
    assert models.resolve_dtype("auto", "cpu", None) == "bfloat16"  # width unknown (a hub id): the capability decides
    assert models.resolve_dtype("float32", "cpu", 4096) == "float32"
    (tmp_path / "config.json").write_text('{"model_type": "gpt2", "n_embd": 768}')
    assert models.hidden_size(str(tmp_path)) == 768 and models.resolve_dtype("auto", "cpu", str(tmp_path)) == "bfloat16"
    assert models.hidden_size("org/name") is None and models.hidden_size(str(tmp_path / "missing")) is None
    monkeypatch.setattr(models, "cpu_bf16_instructions", lambda: ())
    assert models.resolve_dtype("auto", "cpu", 4096) == "float32"
    assert models.resolve_dtype("bfloat16", "cpu", 32) == "bfloat16"  # asked for by name: given, with a warning
