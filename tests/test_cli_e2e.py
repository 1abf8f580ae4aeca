"""The `rlhfkit` command end to end, in subprocesses, on tiny models: sft -> rm (LoRA) -> eval-rm, resume, bad rows."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import color_preference_rows, color_sft_rows, write_jsonl
from safetensors.torch import load_file

BAD_LINE = 5


def rlhfkit(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="200")  # tiny models: one thread is fastest and steady
    return subprocess.run([sys.executable, "-m", "rlhfkit", *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    return proc


def records(out: Path, split: str) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["split"] == split]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("e2e")
    rows = color_sft_rows(32)
    rows.insert(BAD_LINE - 1, {"instruction": "What color is item 4?", "input": ""})  # no output: invalid
    write_jsonl(root / "sft.jsonl", rows)
    write_jsonl(root / "sft_eval.jsonl", color_sft_rows(8, seed=1))
    write_jsonl(root / "pref.jsonl", color_preference_rows(48))
    write_jsonl(root / "pref_eval.jsonl", color_preference_rows(16, seed=1))
    return root


def sft_args(model: Path, output: str) -> list[str]:
    return ["sft", "--model", model, "--data", "sft.jsonl", "--eval-data", "sft_eval.jsonl", "--output", output,
            "--max-steps", "4", "--batch-size", "4", "--lr", "5e-3", "--seed", "3", "--save-every", "2",
            "--eval-every", "2"]


@pytest.fixture(scope="module")
def sft_run(work, tiny_models) -> Path:
    ok(rlhfkit(*sft_args(tiny_models["llama"], "out/sft"), "--skip-invalid", cwd=work))
    return work / "out" / "sft"


def test_bad_row_exits_2_naming_file_and_line(work, tiny_models):
    proc = rlhfkit(*sft_args(tiny_models["llama"], "out/bad"), cwd=work)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert f"sft.jsonl:{BAD_LINE}:" in proc.stderr
    assert "--skip-invalid" in proc.stderr
    assert not (work / "out" / "bad" / "final").exists() and not (work / "out" / "bad" / "checkpoints").exists()


def test_sft_writes_config_metrics_tensorboard_checkpoints_final(sft_run):
    out = sft_run
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert (config["max_steps"], config["batch_size"], config["lr"], config["seed"]) == (4, 4, 0.005, 3)
    assert config["skip_invalid"] is True and config["data"] == ["sft.jsonl"]

    assert [r["step"] for r in records(out, "train")] == [1, 2, 3, 4]
    assert all({"loss", "grad_norm", "lr", "tokens_per_s"} <= set(r) for r in records(out, "train"))
    evals = records(out, "eval")
    assert [r["step"] for r in evals] == [2, 4] and all("perplexity" in r for r in evals)
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))

    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    checkpoint = out / "checkpoints" / "step-00000004"
    assert json.loads((checkpoint / "state.json").read_text())["step"] == 4
    for name in ("model/.metadata", "model/__0_0.distcp", "model.sched.pt", "rng-0.pt"):
        assert (checkpoint / name).is_file(), name

    final = out / "final"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (final / name).is_file(), name
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(final).pad_token == "<|pad|>"

    skipped = [json.loads(line) for line in (out / "skipped_rows.jsonl").read_text().splitlines()]
    assert len(skipped) == 1
    assert skipped[0]["line"] == BAD_LINE and skipped[0]["file"].endswith("sft.jsonl")
    assert skipped[0]["row"] == {"instruction": "What color is item 4?", "input": ""}


def test_sft_resume_after_interruption_gives_same_model(sft_run, work, tiny_models):
    # The state of a run killed after its step-2 checkpoint: later checkpoints and the final model never written.
    cut = work / "out" / "cut"
    shutil.copytree(sft_run, cut)
    shutil.rmtree(cut / "checkpoints" / "step-00000004")
    shutil.rmtree(cut / "final")

    proc = ok(rlhfkit(*sft_args(tiny_models["llama"], "out/cut"), "--skip-invalid", "--resume", cwd=work))
    assert "resumed from" in proc.stderr and "step-00000002 at step 2" in proc.stderr
    assert yaml.safe_load((cut / "config.yaml").read_text())["resume"] == "latest"
    resumed, full = load_file(str(cut / "final" / "model.safetensors")), load_file(str(sft_run / "final" /
                                                                                        "model.safetensors"))
    assert sorted(resumed) == sorted(full)
    assert all(torch.equal(resumed[k], full[k]) for k in full)
    assert [r["step"] for r in records(cut, "train")] == [1, 2, 3, 4]
    assert [r["loss"] for r in records(cut, "train")] == [r["loss"] for r in records(sft_run, "train")]


@pytest.mark.cpu
def test_rm_with_lora_on_sft_model_then_eval_rm(sft_run, work):
    ok(rlhfkit("rm", "--model", sft_run / "final", "--data", "pref.jsonl", "--eval-data", "pref_eval.jsonl",
               "--output", "out/rm", "--max-steps", "4", "--batch-size", "4", "--lr", "5e-3", "--seed", "3",
               "--lora-r", "4", cwd=work))
    out = work / "out" / "rm"
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["lora_r"] == 4 and config["model"] == str(sft_run / "final")
    assert [r["step"] for r in records(out, "train")] == [1, 2, 3, 4]
    (last_eval,) = records(out, "eval")
    assert last_eval["step"] == 4
    final = out / "final"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "reward_stats.json"):
        assert (final / name).is_file(), name
    assert not (out / "checkpoints").exists()  # save_every 100 > max_steps
    stats = json.loads((final / "reward_stats.json").read_text())
    assert stats["count"] == 32

    proc = ok(rlhfkit("eval-rm", "--model", final, "--data", "pref_eval.jsonl", "--output", "scores.json",
                      cwd=work))
    assert "reward model on preference pairs" in proc.stdout
    assert "accuracy" in proc.stdout and "on 16 pairs" in proc.stdout
    report = json.loads((work / "scores.json").read_text())
    metrics = report["metrics"]
    assert metrics["pairs"] == 16 and len(report["pairs"]) == 16
    first = json.loads((work / "pref_eval.jsonl").read_text().splitlines()[0])
    assert (report["pairs"][0]["chosen"].strip(), report["pairs"][0]["rejected"].strip()) == (
        first["chosen"].strip(), first["rejected"].strip())
    # The merged, reloaded model scores the held-out pairs as the in-training evaluation did.
    assert metrics["accuracy"] == pytest.approx(last_eval["accuracy"], abs=1e-9)
    assert metrics["chosen_score"] == pytest.approx(last_eval["chosen_score"], abs=1e-5)
    assert metrics["rejected_score"] == pytest.approx(last_eval["rejected_score"], abs=1e-5)
    scores = [p["chosen_score"] for p in report["pairs"]] + [p["rejected_score"] for p in report["pairs"]]
    assert sum(scores) / len(scores) == pytest.approx(stats["mean"], abs=1e-5)
    assert f"accuracy {metrics['accuracy']:.4f} on 16 pairs" in proc.stdout


def test_a_rank_of_a_torchrun_job_keeps_its_exit_code_and_output(tmp_path):
    """A rank leaves without interpreter teardown (cli.exit_with): its exit code and everything it printed, to a pipe
    (stdout block-buffered), still arrive."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"} | {"WORLD_SIZE": "2"}
    proc = subprocess.run([sys.executable, "-m", "rlhfkit"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "stages:" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "rlhfkit", "stf"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "unknown command 'stf' (did you mean sft?)" in proc.stderr
