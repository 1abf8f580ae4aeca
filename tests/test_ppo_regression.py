"""PPO's numbers pinned before the RL code is restructured (issue 16): a seeded 3-iteration run on a tiny Llama, with
PTX, a reward function and a critic, LoRA off, must reproduce the per-iteration metrics recorded in
fixtures/ppo_metrics.json.

On the machine and library versions that recorded them the tolerance is 1e-6. Float rounding differs between
processors (AVX2 against AVX-512, another GEMM blocking), so elsewhere the numbers are compared to 1e-3 relative: still
far tighter than any change of the algorithm moves them. Sampling takes the argmax (top_k 1), so a rounding
difference cannot change which tokens are sampled.

    RLHFKIT_RECORD=1 python -m pytest tests/test_ppo_regression.py     # records the fixture again (only on purpose)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import transformers
from conftest import write_jsonl

from rlhfkit.config import make_config
from rlhfkit.ppo.config import PPOConfig
from rlhfkit.ppo.train import run_ppo

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.cpu]  # numbers recorded on a CPU

FIXTURE = Path(__file__).parent / "fixtures" / "ppo_metrics.json"
REWARD = '''
def count_e(prompts, responses, **columns):
    return [r.count("e") / 4 for r in responses]
'''


def machine() -> dict:
    flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("flags")), []) if Path("/proc/cpuinfo").exists() else []
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "isa": [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]}


def metrics_of(records: list[dict]) -> list[dict]:
    """Every number an iteration logs, except times and rates."""
    return [{k: v for k, v in r.items() if isinstance(v, (int, float)) and not k.startswith("time_")
             and k != "tokens_per_s"} for r in records]


def test_ppo_metrics_match_the_recorded_run(tiny_models, tmp_path):
    (tmp_path / "reward.py").write_text(REWARD)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"\n\nHuman: What color is item {k}?\n\nAssistant:"}
                                                       for k in range(1, 25)])
    ptx = write_jsonl(tmp_path / "ptx.jsonl", [{"text": f"Item {k} is red and item {k + 1} is blue."}
                                               for k in range(24)])
    out = tmp_path / "run"
    run_ppo(make_config(PPOConfig, {
        "actor": str(tiny_models["llama"]), "reward_fn": f"{tmp_path / 'reward.py'}:count_e", "prompts": [str(prompts)],
        "ptx_data": [str(ptx)], "ptx_coef": 0.5, "output": str(out), "max_steps": 3, "batch_size": 8,
        "mini_batch_size": 4, "ppo_epochs": 2, "max_new_tokens": 8, "top_k": 1, "stop_strings": ["e"], "lr": 3e-3,
        "critic_lr": 3e-3, "lr_schedule": "constant", "reward_norm": "running", "sample_every": 0, "save_every": 0,
        "seed": 3}))
    got = metrics_of([json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()])
    if os.environ.get("RLHFKIT_RECORD"):
        FIXTURE.parent.mkdir(exist_ok=True)
        FIXTURE.write_text(json.dumps({"machine": machine(), "metrics": got}, indent=1) + "\n")
    recorded = json.loads(FIXTURE.read_text())
    same_machine = recorded["machine"] == machine()
    assert len(got) == len(recorded["metrics"]) == 3
    for step, (ours, theirs) in enumerate(zip(got, recorded["metrics"]), start=1):
        assert theirs.keys() <= ours.keys(), step  # metrics may be added, none may go
        for key in theirs:
            tolerance = dict(rel=0, abs=1e-6) if same_machine else dict(rel=1e-3, abs=1e-5)
            assert ours[key] == pytest.approx(theirs[key], **tolerance), (step, key)
    # The paths all ran: responses that stopped and others that did not, PTX, a KL that moved, a value loss.
    assert any(0 < r["eos_rate"] < 1 for r in got) and all(r["ptx_loss"] > 0 and r["value_loss"] > 0 for r in got)
    assert got[-1]["kl"] > 0.1
