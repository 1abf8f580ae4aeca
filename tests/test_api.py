"""rlhfkit from Python: the stage functions, data and reward functions in memory, errors, the same run as the CLI."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest

import rlhfkit
from rlhfkit.cli import main
from conftest import color_preference_rows, color_sft_rows, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")

SFT = dict(max_steps=3, batch_size=8, save_every=0, eval_split=0.25, max_len=64, seed=3)
GRPO = dict(max_steps=2, batch_size=2, num_generations=2, max_new_tokens=4, save_every=0, seed=3)


class FakeDataset:
    """What rlhfkit reads of a `datasets.Dataset` (its column names and its rows as dicts), without `datasets`."""

    def __init__(self, rows: list[dict]):
        self.rows, self.column_names = rows, list(rows[0])

    def __iter__(self):
        return iter(self.rows)


def exact(prompts, responses):
    return [float("red" in r) for r in responses]


def comparable(metrics: list[dict]) -> list[dict]:
    """Metrics without wall-clock rates, which differ between any two runs."""
    return [{k: v for k, v in m.items() if not k.endswith("_per_s") and not k.startswith("time")} for m in metrics]


def test_import_is_light_and_exports_the_api():
    code = ("import sys, time; t = time.perf_counter(); import rlhfkit; dt = time.perf_counter() - t; "
            "print(dt, 'torch' in sys.modules, 'transformers' in sys.modules)")
    seconds, torch_loaded, transformers_loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert torch_loaded == transformers_loaded == "False" and float(seconds) < 1.0
    assert issubclass(rlhfkit.ConfigError, ValueError) and issubclass(rlhfkit.DataError, ValueError)
    for name in ("sft", "rm", "ppo", "grpo", "dpo", "eval_rm", "compare", "demo"):
        assert callable(getattr(rlhfkit, name)), name
    assert "\n    kl_coef = 0.05: " in rlhfkit.ppo.__doc__  # help(rlhfkit.ppo) lists every field
    assert "\n    lr = 2e-05: peak learning rate (AdamW)" in rlhfkit.sft.__doc__
    importlib.import_module("rlhfkit.sft.train")  # the package is still the package
    assert rlhfkit.sft.train.run_sft.__name__ == "run_sft" and callable(rlhfkit.sft)


@pytest.mark.cpu
def test_sft_from_memory_equals_the_cli_on_a_file(tiny_models, tmp_path):
    rows = color_sft_rows(24)
    cli_out = tmp_path / "cli"
    data = write_jsonl(tmp_path / "sft.jsonl", rows)
    assert main(["sft", "--model", str(tiny_models["llama"]), "--data", str(data), "--output", str(cli_out)]
                + [f"--{k.replace('_', '-')}={v}" for k, v in SFT.items()]) == 0
    run = rlhfkit.sft(model=tiny_models["llama"], data=rows, output=str(tmp_path / "py"), **SFT)
    assert run.final == tmp_path / "py" / "final" and run.models == {"final": run.final}
    assert (run.final / "config.json").is_file() and run.config.data == ["<data>"] and run.config.dtype == "float32"
    cli = [json.loads(line) for line in (cli_out / "metrics.jsonl").read_text().splitlines()]
    assert comparable(run.metrics) == comparable(cli) and [m["step"] for m in run.metrics] == [1, 2, 3, 3]
    # A Dataset-like table reads the same rows; a Run stands for its final model.
    again = rlhfkit.sft(model=run, data=FakeDataset(rows), output=str(tmp_path / "again"), **SFT)
    assert again.config.model == str(run.final) and len(again.metrics) == 4


def test_errors_name_the_row_or_the_field(tiny_models, tmp_path):
    rows = color_sft_rows(8)
    rows[5] = {"instruction": "What color is item 1?"}  # no output
    with pytest.raises(rlhfkit.DataError, match=r"^<data>\[5\]: field 'output': missing"):
        rlhfkit.sft(model=tiny_models["llama"], data=rows, output=str(tmp_path / "a"), **SFT)
    with pytest.raises(rlhfkit.DataError, match=r"^<data>\[1\]: expected a dict of fields, got str"):
        rlhfkit.sft(model=tiny_models["llama"], data=FakeDataset([rows[0], "text"]), output=str(tmp_path / "b"))
    with pytest.raises(rlhfkit.ConfigError, match=r"^unknown key 'learning_rate' \(did you mean lr\?\)"):
        rlhfkit.sft(model=tiny_models["llama"], data=rows, learning_rate=1e-4)
    with pytest.raises(rlhfkit.ConfigError, match=r"^lr: must be > 0, got -1.0$"):
        rlhfkit.sft(model=tiny_models["llama"], data=rows, output=str(tmp_path / "c"), lr=-1)
    assert not (tmp_path / "a" / "final").exists() and not (tmp_path / "b" / "final").exists()  # nothing trained


def test_grpo_with_a_callable_equals_the_cli_with_a_file(tiny_models, tmp_path):
    prompts = [{"prompt": f"What color is item {k}?"} for k in range(1, 9)]
    data = write_jsonl(tmp_path / "prompts.jsonl", prompts)
    reward_file = tmp_path / "reward.py"
    reward_file.write_text("def exact(prompts, responses):\n    return [float('red' in r) for r in responses]\n")
    assert main(["grpo", "--actor", str(tiny_models["llama"]), "--prompts", str(data), "--reward-fn",
                 f"{reward_file}:exact", "--output", str(tmp_path / "cli")]
                + [f"--{k.replace('_', '-')}={v}" for k, v in GRPO.items()]) == 0
    run = rlhfkit.grpo(actor=tiny_models["llama"], prompts=prompts, reward_fn=[exact], output=str(tmp_path / "py"),
                       **GRPO)
    cli = [json.loads(line) for line in (tmp_path / "cli" / "metrics.jsonl").read_text().splitlines()]
    assert comparable(run.metrics) == comparable(cli) and len(run.metrics) == 2
    assert run.config.reward_fn == ["<reward_fn:test_api.exact>"] and run.final.is_dir()


def test_a_callable_across_resume_and_processes(tiny_models, tmp_path):
    prompts = [{"prompt": f"What color is item {k}?"} for k in range(1, 9)]
    out = str(tmp_path / "run")
    settings = dict(GRPO, save_every=1)
    rlhfkit.grpo(actor=tiny_models["llama"], prompts=prompts, reward_fn=exact, output=out, **settings)
    # Handed over again, the same function resumes the run; not handed over, the run says what is missing.
    resumed = rlhfkit.grpo(actor=tiny_models["llama"], prompts=prompts, reward_fn=exact, output=out, resume=True,
                           **dict(settings, max_steps=3))
    assert [m["step"] for m in resumed.metrics] == [1, 2, 3]
    with pytest.raises(rlhfkit.ConfigError, match=r"^reward_fn: <reward_fn:test_api.exact> was handed to an "
                                                  r"earlier run from Python and is not in this process"):
        rlhfkit.grpo(actor=tiny_models["llama"], prompts=prompts, reward_fn="<reward_fn:test_api.exact>",
                     output=out, resume=True, **dict(settings, max_steps=4))
    assert main(["grpo", "--config", str(tmp_path / "run" / "config.yaml"), "--resume", "--max-steps", "4"]) == 2
    with pytest.raises(rlhfkit.ConfigError, match=r"^nproc: <prompts>, <reward_fn:test_api.exact> live in this "
                                                  r"Python process and cannot reach the 2 processes"):
        rlhfkit.grpo(actor=tiny_models["llama"], prompts=prompts, reward_fn=exact, output=str(tmp_path / "two"),
                     nproc=2, strategy="ddp", **GRPO)


def test_rm_dpo_eval_rm_and_compare_from_python(tiny_models, tmp_path):
    pairs = color_preference_rows(24)
    rm = rlhfkit.rm(model=tiny_models["llama"], data=pairs, output=str(tmp_path / "rm"), max_steps=2, batch_size=8,
                    save_every=0, eval_split=0.25)
    assert rm.final.is_dir() and "accuracy" in rm.metrics[-1]
    dpo = rlhfkit.dpo(model=tiny_models["llama"], data=pairs, output=str(tmp_path / "dpo"), max_steps=2,
                      batch_size=8, save_every=0, eval_split=0.25)
    assert dpo.metrics[0]["loss"] == pytest.approx(0.6931472, abs=1e-6)  # ln 2: the policy is its reference
    ppo = rlhfkit.ppo(actor=tiny_models["llama"], reward=rm, prompts=[{"prompt": p["prompt"]} for p in pairs[:4]],
                      monitor_fn=exact, output=str(tmp_path / "ppo"), max_steps=1, batch_size=4, max_new_tokens=3,
                      save_every=0)
    assert set(ppo.models) == {"final", "final_critic"} and "monitor" in ppo.metrics[-1]
    scored = rlhfkit.eval_rm(model=rm, data=pairs)
    assert scored.result["pairs"] == 24 and scored.metrics == [scored.result] and scored.final is None
    compared = rlhfkit.compare(models={"base": tiny_models["llama"], "dpo": dpo}, prompts=pairs[:3],
                               max_new_tokens=3)
    assert len(compared.result) == 3 and set(compared.result[0]["responses"]) == {"base", "dpo"}


def test_the_readme_example_runs(tmp_path, monkeypatch):
    """The README's Python example, as written, in a fresh folder: what a newcomer runs after installing."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## From Python"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    printed = []
    exec(compile(code, "README.md", "exec"), {"__name__": "readme", "print": lambda *a: printed.append(a)})
    final, reward = printed[-1]
    assert final == Path("runs/py/grpo/final") and (tmp_path / final / "config.json").is_file() and 0 <= reward <= 1
