"""PPO runs on tiny models: learning from a reward function, PTX, critic warm-up, accumulation, exact resume, the CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import Crash, corpus, crash_at_call, write_jsonl
from safetensors.torch import load_file

import rlhfkit.ppo.train as ppo_train
from rlhfkit.config import ConfigError, make_config
from rlhfkit.data.encode import EncodeStats, encode_conversation
from rlhfkit.data.loading import load_examples
from rlhfkit.models import load_causal_lm, load_sequence_classifier, load_tokenizer, save_model
from rlhfkit.ppo.config import PPOConfig
from rlhfkit.ppo.train import run_ppo
from rlhfkit.training.lm_loss import evaluate

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before:UserWarning"),
    pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers` to `True`:UserWarning"),
]

REWARD_FNS = '''
def count_e(prompts, responses, **columns):
    """A property a tiny random model can learn fast: how many letters e it writes."""
    return [r.count("e") / 4 for r in responses]


def match_answer(prompts, responses, answer):
    """A verifiable reward that uses a column of the prompt file."""
    return [float(str(a) in r) for r, a in zip(responses, answer)]
'''




@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ppo-data")
    (root / "rewards.py").write_text(REWARD_FNS)
    prompts = [{"prompt": f"\n\nHuman: What color is item {k}?\n\nAssistant:", "answer": k} for k in range(1, 33)]
    ptx = [{"text": f"Item {k} is red, item {k + 1} is blue and item {k + 2} is green."} for k in range(40)]
    return {"prompts": write_jsonl(root / "prompts.jsonl", prompts), "ptx": write_jsonl(root / "ptx.jsonl", ptx),
            "rewards": root / "rewards.py"}


def ppo_config(actor: Path, files, out: Path, **values) -> PPOConfig:
    base = dict(actor=str(actor), reward_fn=f"{files['rewards']}:count_e", prompts=[str(files["prompts"])],
                output=str(out), batch_size=8, max_new_tokens=8, lr=3e-3, critic_lr=3e-3, lr_schedule="constant",
                sample_every=0, save_every=0)
    return make_config(PPOConfig, {**base, **values})


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------------------------------------------------- learning
def test_reward_rises_and_kl_stays_finite(tiny_models, files, tmp_path):
    """40 iterations of 16 prompts x 12 tokens (about 10 s): the mean reward of the last 5 iterations is far above
    that of the first 5, and every logged number is finite."""
    out = tmp_path / "learn"
    run_ppo(ppo_config(tiny_models["llama"], files, out, max_steps=40, batch_size=16, max_new_tokens=12,
                       ppo_epochs=2, mini_batch_size=8, sample_every=20, num_samples=2))
    rows = records(out)
    scores = [r["score"] for r in rows]
    first, last = sum(scores[:5]) / 5, sum(scores[-5:]) / 5
    assert last > first + 1.0, scores  # measured: ~0.45 -> ~3 (about 3 more letters e per 12-token response)
    for r in rows:
        assert all(math.isfinite(v) for k, v in r.items() if isinstance(v, float) and k != "explained_variance"), r
    assert rows[-1]["kl"] > 0.1  # the policy moved away from the reference...
    assert rows[-1]["beta"] == 0.05  # ...under a fixed beta (no kl_target)
    for key in ("score", "score_std", "reward", "kl", "beta", "entropy", "policy_loss", "value_loss", "clipfrac",
                "approx_kl", "explained_variance", "response_length", "eos_rate", "tokens_per_s", "time_generate",
                "time_score", "time_train"):
        assert key in rows[-1], key
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [20, 20, 40, 40]
    assert {"prompt", "response", "score"} <= samples[0].keys() and "What color" in samples[0]["prompt"]
    assert (out / "final" / "config.json").is_file() and (out / "final_critic" / "config.json").is_file()


def test_adaptive_kl_moves_beta_towards_target(tiny_models, files, tmp_path):
    out = tmp_path / "adaptive"
    run_ppo(ppo_config(tiny_models["llama"], files, out, max_steps=3, kl_target=100.0, kl_horizon=100))
    rows = records(out)
    # The reference is the actor's starting point: no KL before the first update (up to float rounding: the old
    # log-probs come from generation's cached forward passes, the reference's from one full pass). With one epoch
    # over one minibatch every update starts from the rollout's own policy: the ratio is 1 and nothing is clipped
    # (dropout is off).
    assert abs(rows[0]["kl"]) < 1e-5
    for r in rows:
        assert r["ratio"] == pytest.approx(1.0, abs=1e-6) and r["clipfrac"] == 0.0
    # KL far below the target: each iteration multiplies beta by 1 - 0.2 * 8 / 100.
    for before, after in zip(rows, rows[1:]):
        assert after["beta"] == pytest.approx(before["beta"] * (1 - 0.2 * 8 / 100), rel=1e-12)


def test_reward_model_with_another_tokenizer(tiny_models, files, tmp_path):
    """The reward model reads re-tokenized text; the critic, which reads the actor's tokens, starts from the actor.
    Also runs the LoRA actor with gradient checkpointing."""
    from rlhfkit.tiny import make_tiny_model, train_tokenizer

    other_tok = train_tokenizer(corpus()[::2], tmp_path / "other", vocab_size=300, bos=False)
    other = make_tiny_model("gpt2", other_tok, tmp_path / "other", hidden=32, layers=2, heads=4)
    reward = save_model(load_sequence_classifier(str(other), load_tokenizer(str(other))), load_tokenizer(str(other)),
                        tmp_path / "rm-other")
    out = tmp_path / "ppo"
    run_ppo(ppo_config(tiny_models["llama"], files, out, max_steps=2, reward=str(reward), reward_fn="", lora_r=4,
                       gradient_checkpointing=True))
    rows = records(out)
    assert len(rows) == 2 and all(math.isfinite(r["score"]) and r["score_std"] > 0 for r in rows)
    critic = weights(out / "final_critic")
    assert critic["score.weight"].shape[1] == 32 and "model.layers.0.mlp.up_proj.weight" in critic  # a Llama critic


# --------------------------------------------------------------------------------------------------------------- PTX
def ptx_lm_loss(final: Path, files) -> float:
    tokenizer = load_tokenizer(str(final))
    rows = load_examples([str(files["ptx"])], "text").examples
    encoded = [encode_conversation(c, tokenizer, "human-assistant", 128, EncodeStats()) for c in rows]
    return evaluate(load_causal_lm(str(final), tokenizer), encoded, tokenizer.pad_token_id, 16, "float32")["loss"]


@pytest.mark.cpu
def test_ptx_keeps_the_language_model_loss_lower(tiny_models, files, tmp_path):
    """Same seed, same rollouts at the start: with ptx_coef > 0 the LM loss on the pretraining text ends lower."""
    common = dict(max_steps=6, ptx_data=[str(files["ptx"])], ptx_batch_size=8)
    with_ptx = run_ppo(ppo_config(tiny_models["llama"], files, tmp_path / "ptx", ptx_coef=1.0, **common))
    without = run_ppo(ppo_config(tiny_models["llama"], files, tmp_path / "no-ptx", ptx_coef=0.0, **common))
    base = ptx_lm_loss(tiny_models["llama"], files)
    loss_with, loss_without = ptx_lm_loss(with_ptx, files), ptx_lm_loss(without, files)
    assert loss_with < loss_without - 0.5, (base, loss_with, loss_without)
    assert loss_with < base - 0.5
    assert "ptx_loss" in records(tmp_path / "ptx")[-1] and "ptx_loss" not in records(tmp_path / "no-ptx")[-1]


# ----------------------------------------------------------------------------------------------- update mechanics
def test_critic_warmup_leaves_the_actor_unchanged(tiny_models, files, tmp_path):
    final = run_ppo(ppo_config(tiny_models["llama"], files, tmp_path / "warm", max_steps=2, critic_warmup_steps=2))
    start = load_causal_lm(str(tiny_models["llama"]), load_tokenizer(str(tiny_models["llama"])), seed=42)
    trained = weights(final)
    assert_same({k: v for k, v in start.state_dict().items() if k in trained}, trained)
    assert "policy_loss" not in records(tmp_path / "warm")[-1] and records(tmp_path / "warm")[-1]["value_loss"] > 0
    critic_start = load_sequence_classifier(str(tiny_models["llama"]), load_tokenizer(str(tiny_models["llama"])))
    critic = weights(tmp_path / "warm" / "final_critic")
    assert not torch.equal(critic["model.layers.0.mlp.up_proj.weight"],
                           critic_start.state_dict()["model.layers.0.mlp.up_proj.weight"])


@pytest.mark.cpu
@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean"])
def test_micro_batches_accumulate_to_the_minibatch(tiny_models, files, tmp_path, loss_agg):
    """micro_batch_size 2 and 8 make the same updates (up to float summation order). The stop string "e" gives
    responses of different lengths, so micro-batches hold different token counts: averaging each micro-batch over
    its own tokens instead of the minibatch's would show."""
    finals = [run_ppo(ppo_config(tiny_models["gpt2"], files, tmp_path / f"micro{m}", max_steps=2, mini_batch_size=8,
                                 micro_batch_size=m, ptx_data=[str(files["ptx"])], ptx_coef=0.5, loss_agg=loss_agg,
                                 stop_strings=["e"]))
              for m in (2, 8)]
    lengths = {r["response_length"] for r in records(tmp_path / "micro2")}
    assert all(0 < n < 8 for n in lengths)  # some responses stopped early, so lengths vary
    a, b = weights(finals[0]), weights(finals[1])
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=0, msg=k)
    assert any(not torch.equal(v, weights(Path(tiny_models["gpt2"]))[k]) for k, v in a.items()
               if k in weights(Path(tiny_models["gpt2"])))


# ------------------------------------------------------------------------------------------------------------ resume
def check_resume(monkeypatch, tmp_path, make) -> None:
    """Uninterrupted 6 iterations vs a run killed in iteration 4 (checkpoints every 2) and resumed: same bits."""
    full = run_ppo(make(tmp_path / "full"))
    crash_at_call(monkeypatch, ppo_train, "ppo_iteration", 4)
    with pytest.raises(Crash):
        run_ppo(make(tmp_path / "cut"))
    assert sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()) == ["step-00000002"]
    with pytest.raises(ConfigError, match="already holds a run"):
        run_ppo(make(tmp_path / "cut"))
    calls = crash_at_call(monkeypatch, ppo_train, "ppo_iteration", 0)
    resumed = run_ppo(make(tmp_path / "cut", resume="latest"))
    assert calls[0] == 4  # iterations 3..6 only
    for name in ("final", "final_critic", "final_ema"):
        if (full.parent / name).exists():
            assert_same(weights(full.parent / name), weights(resumed.parent / name))
    full_rows, cut_rows = records(tmp_path / "full"), records(tmp_path / "cut")
    assert [r["step"] for r in cut_rows] == [1, 2, 3, 4, 5, 6]
    for key in ("score", "kl", "beta", "policy_loss", "value_loss"):
        assert [r.get(key) for r in cut_rows] == [r.get(key) for r in full_rows], key


def test_resume_is_bitwise_identical_full_model_with_ptx_ema_and_adaptive_kl(tiny_models, files, tmp_path,
                                                                            monkeypatch):
    # GPT-2's config has dropout 0.1 (PPO turns it off); the schedule is cosine so its state matters too.
    def make(out, **extra):
        return ppo_config(tiny_models["gpt2"], files, out, max_steps=6, save_every=2, keep_last=5,
                          lr_schedule="cosine", warmup_steps=2, ptx_data=[str(files["ptx"])], ptx_coef=0.5,
                          ema_decay=0.9, kl_target=1.0, kl_horizon=100, reward_norm="running", mini_batch_size=4,
                          **extra)

    check_resume(monkeypatch, tmp_path, make)
    assert (tmp_path / "full" / "final_ema").is_dir()


def test_resume_is_bitwise_identical_lora_with_reward_model(tiny_models, tokenizer, files, tmp_path, monkeypatch):
    reward = save_model(load_sequence_classifier(str(tiny_models["llama"]), tokenizer, seed=3), tokenizer,
                        tmp_path / "rm", reward_stats={"mean": 0.1, "std": 0.5, "count": 8})

    def make(out, **extra):
        return ppo_config(tiny_models["llama"], files, out, max_steps=6, save_every=2, keep_last=5, lora_r=4,
                          lora_merge=False, reward=str(reward), reward_fn="", **extra)

    check_resume(monkeypatch, tmp_path, make)
    # reward_norm auto uses the statistics stored with the reward model: shaped = (score - 0.1) / 0.5 (no clipping
    # at these magnitudes, so the batch means obey the same line).
    for r in records(tmp_path / "full"):
        assert abs(r["score"]) < 2 and r["shaped_score"] == pytest.approx((r["score"] - 0.1) / 0.5, abs=1e-5)
    adapter = weights(tmp_path / "full" / "final")
    assert any("lora_B" in k and torch.count_nonzero(v) for k, v in adapter.items())


# --------------------------------------------------------------------------------------------------------------- CLI
def rlhfkit(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "rlhfkit", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_cli_ppo_with_reward_model_and_with_reward_function(tiny_models, tokenizer, files, tmp_path, capsys):
    reward = save_model(load_sequence_classifier(str(tiny_models["llama"]), tokenizer), tokenizer, tmp_path / "rm")
    common = ["--actor", str(tiny_models["llama"]), "--prompts", str(files["prompts"]), "--max-steps", "2",
              "--batch-size", "4", "--max-new-tokens", "6", "--sample-every", "1", "--num-samples", "1",
              "--save-every", "1"]
    with_rm = rlhfkit("ppo", *common, "--reward", str(reward), "--output", str(tmp_path / "a"), "--lora-r", "4")
    assert with_rm.returncode == 0, with_rm.stderr[-3000:]
    # The second run in this process (a new one spends ~7 s on imports), through the same command-line entry.
    from rlhfkit.cli import main

    assert main(["ppo", *common, "--reward-fn", f"{files['rewards']}:match_answer", "--ptx-data", str(files["ptx"]),
                 "--output", str(tmp_path / "b")]) == 0
    printed = capsys.readouterr().out
    for run in ("a", "b"):
        out = tmp_path / run
        assert [r["step"] for r in records(out)] == [1, 2]
        assert len((out / "samples.jsonl").read_text().splitlines()) == 2
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000001", "step-00000002"]
        assert {"actor", "critic", "actor.sched.pt", "critic.sched.pt", "rng-0.pt",
                "state.json"} <= {p.name for p in (out / "checkpoints" / "step-00000002").iterdir()}
        # The final actor and critic load with plain transformers.
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        AutoModelForCausalLM.from_pretrained(out / "final")
        AutoModelForSequenceClassification.from_pretrained(out / "final_critic")
    assert "ptx_loss" in records(tmp_path / "b")[-1]
    assert "samples at iteration 2" in printed  # above the progress bar


@pytest.mark.parametrize("args, message", [
    (["--reward-fn", "REWARDS:count_e", "--reward-weights", "1,2"], "reward_weights: 2 weights for 1 reward sources"),
    (["--reward-fn", "missing.py:f"], "reward_fn: missing.py does not exist"),
    (["--reward-fn", "REWARDS:nope"], "has no function 'nope'"),
    (["--reward-fn", "REWARDS:count_e", "--mini-batch-size", "3"],
     "mini_batch_size: 3 must divide the 8 sequences of an iteration"),
    (["--reward-fn", "REWARDS:count_e", "--temperature", "0"], "temperature: must be > 0"),
])
def test_cli_ppo_config_errors_are_one_line(tiny_models, files, tmp_path, capsys, args, message):
    from rlhfkit.cli import main

    args = [a.replace("REWARDS", str(files["rewards"])).replace("RM", str(tiny_models["llama"])) for a in args]
    code = main(["ppo", "--actor", str(tiny_models["llama"]), "--prompts", str(files["prompts"]),
                 "--output", str(tmp_path / "x"), "--batch-size", "8", *args])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "x").exists()  # nothing written before the mistake was found


def test_monitor_fn_is_logged_but_not_trained_on(tiny_models, files, tmp_path):
    """The monitored function sees the same responses as the reward: with the same function, the same numbers; and
    a monitor alone leaves training unchanged (same weights as without it)."""
    monitored = run_ppo(ppo_config(tiny_models["llama"], files, tmp_path / "m", max_steps=2,
                                   monitor_fn=f"{files['rewards']}:count_e"))
    plain = run_ppo(ppo_config(tiny_models["llama"], files, tmp_path / "p", max_steps=2))
    rows = records(tmp_path / "m")
    assert [r["monitor"] for r in rows] == [r["score"] for r in rows]
    assert "monitor" not in records(tmp_path / "p")[-1]
    assert_same(weights(monitored), weights(plain))


def test_passes_are_sized_to_the_actor_unless_set(tiny_models, files, tmp_path):
    tokenizer = load_tokenizer(str(tiny_models["llama"]))
    actor = load_causal_lm(str(tiny_models["llama"]), tokenizer)
    sized = ppo_train.PPOSettings.of(ppo_config(tiny_models["llama"], files, tmp_path), actor)
    assert sized.update.passes.rows(100, "cpu") == sized.rollout.passes.rows(100, "cpu") == 16384 // 100  # 32 x 2
    pinned = ppo_train.PPOSettings.of(ppo_config(tiny_models["llama"], files, tmp_path, micro_batch_tokens=2048), actor)
    assert pinned.update.passes.rows(100, "cpu") == 2048 // 100
