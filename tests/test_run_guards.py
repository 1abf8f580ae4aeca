"""Nothing silently wrong (issue 14): non-finite weights are never saved, misbehaving reward functions, honest resume,
damaged checkpoints, a full disk, overwriting a finished run. Each case: the exit code, one line naming what is wrong,
no traceback, and what is (or is not) on disk afterwards. The stages run in this process through `rlhfkit.cli.main`."""

from __future__ import annotations

import json
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from conftest import color_preference_rows, color_sft_rows, write_jsonl
from safetensors.torch import load_file

import rlhfkit.training.checkpoint as checkpoint
from rlhfkit.training.distributed import World
from rlhfkit.cli import main

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers` to `True`:UserWarning")]

REWARDS = '''
import math
calls = {"n": 0}


def ok(prompts, responses, **columns):
    return [r.count("e") / 4 for r in responses]


def nan_on_second_call(prompts, responses, **columns):
    calls["n"] += 1
    return [float("nan") if calls["n"] == 2 and i in (1, 3) else 0.5 for i in range(len(responses))]


def always_nan(prompts, responses, **columns):
    return [math.nan] * len(responses)


def raises_on_third_call(prompts, responses, **columns):
    calls["n"] += 1
    if calls["n"] == 3:
        raise KeyError("answer")
    return [0.0] * len(responses)


def returns_none(prompts, responses, **columns):
    return None


def one_too_few(prompts, responses, **columns):
    return [1.0] * (len(responses) - 1)
'''


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("guards")
    write_jsonl(root / "sft.jsonl", color_sft_rows(32))
    write_jsonl(root / "pref.jsonl", color_preference_rows(32))
    write_jsonl(root / "prompts.jsonl", [{"prompt": f"\n\nHuman: What color is item {k}?\n\nAssistant:"}
                                         for k in range(1, 17)])
    (root / "rewards.py").write_text(REWARDS)
    return root


def cli(capsys, *args) -> tuple[int, str]:
    """Run `rlhfkit ARGS` here; (exit code, what it printed: stdout, where the progress bar writes its warnings, then
    stderr, which ends with the error). A traceback would surface as the exception itself."""
    code = main([str(a) for a in args])
    printed = capsys.readouterr()
    assert "Traceback" not in printed.out + printed.err
    return code, printed.out + printed.err


def last_line(err: str) -> str:
    return err.strip().splitlines()[-1]


def sft(model, work, out, *extra) -> list[str]:
    return ["sft", "--model", model, "--data", work / "sft.jsonl", "--output", out, "--batch-size", "4",
            "--max-steps", "4", "--lr", "1e-3", "--eval-split", "0", "--seed", "3", *extra]


def ppo(model, work, out, *extra, reward="ok") -> list[str]:
    return ["ppo", "--actor", model, "--reward-fn", f"{work / 'rewards.py'}:{reward}", "--prompts",
            work / "prompts.jsonl", "--output", out, "--batch-size", "4", "--max-new-tokens", "4", "--lr", "1e-3",
            "--critic-lr", "1e-3", "--max-steps", "4", "--sample-every", "1", "--num-samples", "1", *extra]


def steps_logged(out: Path, file: str = "metrics.jsonl") -> list[int]:
    """The steps of the training records (metrics) or of the samples."""
    rows = [json.loads(line) for line in (out / file).read_text().splitlines()]
    return [r["step"] for r in rows if r.get("split", "train") == "train"]


def checkpoints(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir()) if (out / "checkpoints").is_dir() else []


# ------------------------------------------------------------------------------------- 1. never a non-finite model
@pytest.fixture
def poisoned_steps(monkeypatch):
    """Every AdamW step leaves an infinite weight behind: the first of the decayed weights (the embeddings)."""
    step = torch.optim.AdamW.step

    def poisoned(self, *args, **kwargs):
        result = step(self, *args, **kwargs)
        with torch.no_grad():
            self.param_groups[0]["params"][0].fill_(float("inf"))
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned)


def test_sft_stops_when_the_weights_become_non_finite(tiny_models, work, tmp_path, capsys, poisoned_steps):
    out = tmp_path / "sft"
    code, err = cli(capsys, *sft(tiny_models["llama"], work, out, "--save-every", "1"))
    assert code == 1
    assert last_line(err).startswith("rlhfkit sft: error: sft parameter model.embed_tokens.weight is not finite after "
                                     "the optimizer step of step 1; nothing of it was saved")
    assert not (out / "final").exists() and checkpoints(out) == []


def test_ppo_stops_naming_the_critic_when_its_weights_become_non_finite(tiny_models, work, tmp_path, capsys,
                                                                        poisoned_steps):
    out = tmp_path / "ppo"
    code, err = cli(capsys, *ppo(tiny_models["llama"], work, out, "--save-every", "1"))
    assert code == 1
    assert "error: critic parameter" in last_line(err)
    assert "is not finite after an optimizer step of iteration 1" in last_line(err)
    assert not (out / "final").exists() and not (out / "final_critic").exists() and checkpoints(out) == []


def test_a_non_finite_model_is_never_checkpointed(tiny_models, tokenizer, tmp_path):
    from rlhfkit.models import load_causal_lm
    from rlhfkit.training.guards import TrainingError

    model = load_causal_lm(str(tiny_models["llama"]), tokenizer)
    optimizer = torch.optim.AdamW(model.parameters())
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("inf")
    with pytest.raises(TrainingError, match=r"^model parameter model.layers.1.mlp.up_proj.weight is not finite at "
                                            r"step 7, when its checkpoint was to be written"):
        checkpoint.save_checkpoint(tmp_path, 7, models={"model": (model, optimizer)}, schedulers={}, state={},
                                   keep_last=2)
    assert not (tmp_path / "checkpoints").exists()


def test_a_run_that_skipped_every_step_fails(tiny_models, work, tmp_path, monkeypatch, capsys):
    import rlhfkit.sft.train as sft_train

    def nan_loss(model, batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return logits.sum() * float("nan"), {}

    monkeypatch.setattr(sft_train, "sft_loss", nan_loss)
    out = tmp_path / "sft"
    # 3 steps, fewer than max_bad_steps (5): only the end of the run can see that it never trained.
    code, err = cli(capsys, *sft(tiny_models["llama"], work, out, "--max-steps", "3", "--save-every", "0"))
    assert code == 1
    assert last_line(err) == ("rlhfkit sft: error: every step of this run (3) was skipped for a non-finite loss, "
                              "gradient or reward: the model did not train, so no final model is written")
    assert not (out / "final").exists()


def test_skipped_steps_do_not_leak_the_scheduler_warning(tiny_models, work, tmp_path, monkeypatch, capsys):
    import rlhfkit.sft.train as sft_train

    real, calls = sft_train.sft_loss, [0]

    def nan_once(model, batch):
        calls[0] += 1
        loss, stats = real(model, batch)
        return (loss * float("nan") if calls[0] == 1 else loss), stats

    monkeypatch.setattr(sft_train, "sft_loss", nan_once)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, _ = cli(capsys, *sft(tiny_models["llama"], work, tmp_path / "sft", "--save-every", "0"))
    assert code == 0
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)]


# ----------------------------------------------------------------------------------------- damaged checkpoints
@pytest.fixture(scope="module")
def sft_run(tiny_models, work, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sft-run") / "run"
    assert main([str(a) for a in sft(tiny_models["llama"], work, out, "--save-every", "2", "--keep-last", "3")]) == 0
    return out


def damaged_copy(sft_run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(sft_run, out)
    return out


def flip_bytes(file: Path, at: int = 200) -> None:
    data = bytearray(file.read_bytes())
    for i in range(at, min(at + 4, len(data))):
        data[i] ^= 0xFF
    file.write_bytes(bytes(data))


@pytest.mark.parametrize("name", ["model/__0_0.distcp", "state.json", "model.sched.pt", "rng-0.pt",
                                  "model/.metadata"])
def test_resume_names_a_damaged_checkpoint_file_and_the_previous_intact_one(tiny_models, work, sft_run, tmp_path,
                                                                            capsys, name):
    out = damaged_copy(sft_run, tmp_path)
    damaged = out / "checkpoints" / "step-00000004" / name
    flip_bytes(damaged, at=min(200, damaged.stat().st_size // 2))
    metrics_before = (out / "metrics.jsonl").read_text()
    code, err = cli(capsys, *sft(tiny_models["llama"], work, out, "--save-every", "2", "--resume"))
    assert code == 2
    intact = out / "checkpoints" / "step-00000002"
    assert last_line(err) == (f"rlhfkit sft: error: resume: {damaged} is damaged (its checksum does not match the one "
                              f"written with it); the previous intact checkpoint is {intact}: continue from it with "
                              f"--resume {intact}")
    assert (out / "metrics.jsonl").read_text() == metrics_before  # nothing was touched


def test_resume_from_the_offered_checkpoint_trains_on(tiny_models, work, sft_run, tmp_path, capsys):
    out = damaged_copy(sft_run, tmp_path)
    flip_bytes(out / "checkpoints" / "step-00000004" / "model" / "__0_0.distcp")
    intact = out / "checkpoints" / "step-00000002"
    code, err = cli(capsys, *sft(tiny_models["llama"], work, out, "--save-every", "2", "--resume", intact))
    assert code == 0, err
    final = load_file(str(out / "final" / "model.safetensors"))
    reference = load_file(str(sft_run / "final" / "model.safetensors"))
    assert final.keys() == reference.keys() and all(torch.equal(final[k], reference[k]) for k in final)


def test_a_checkpoint_without_checksums_still_names_an_unreadable_file(tiny_models, work, sft_run, tmp_path, capsys):
    out = damaged_copy(sft_run, tmp_path)
    last = out / "checkpoints" / "step-00000004"
    (last / "checksums.json").unlink()  # as written before checkpoints carried checksums
    (last / "model.sched.pt").write_bytes(b"not a pickle")
    code, err = cli(capsys, *sft(tiny_models["llama"], work, out, "--save-every", "2", "--resume"))
    assert code == 2
    assert last_line(err).startswith(f"rlhfkit sft: error: resume: {last / 'model.sched.pt'} could not be read (")
    assert last_line(err).endswith(f"the previous intact checkpoint is {out / 'checkpoints' / 'step-00000002'}: "
                                   f"continue from it with --resume {out / 'checkpoints' / 'step-00000002'}")


def test_resume_refuses_a_final_model_and_another_stages_checkpoint(tiny_models, work, sft_run, tmp_path, capsys):
    code, err = cli(capsys, *sft(tiny_models["llama"], work, tmp_path / "a", "--resume", sft_run / "final"))
    assert code == 2
    assert last_line(err) == (f"rlhfkit sft: error: resume: {sft_run / 'final'} is a saved model, not a checkpoint "
                              "(checkpoints are OUTPUT/checkpoints/step-N); no earlier intact checkpoint is left")
    rm_args = ["rm", "--model", tiny_models["llama"], "--data", work / "pref.jsonl", "--output", tmp_path / "b",
               "--batch-size", "4", "--eval-split", "0", "--lr", "1e-3", "--seed", "3",
               "--resume", sft_run / "checkpoints" / "step-00000002"]
    code, err = cli(capsys, *rm_args)
    assert code == 2
    assert last_line(err) == (f"rlhfkit rm: error: resume: {sft_run / 'checkpoints' / 'step-00000002'} is a "
                              "checkpoint of `rlhfkit sft`, not of `rlhfkit rm`")


# ------------------------------------------------------------------------------------------ 3. --resume is honest
def test_resume_refuses_changed_settings_and_names_both_values(tiny_models, work, sft_run, tmp_path, capsys):
    out = damaged_copy(sft_run, tmp_path)
    code, err = cli(capsys, *sft(tiny_models["llama"], work, out, "--save-every", "2", "--resume", "--lr", "0.01",
                                 "--batch-size", "8", "--seed", "4"))
    assert code == 2
    assert last_line(err) == (f"rlhfkit sft: error: resume: these settings differ from the run in "
                              f"{out / 'checkpoints' / 'step-00000004'}: batch_size 4 -> 8, lr 0.001 -> 0.01, "
                              "seed 3 -> 4. Resume with the checkpoint's values, or pass --resume-allow "
                              "batch_size,lr,seed to use the new ones from step 4 on")
    assert yaml.safe_load((out / "config.yaml").read_text())["lr"] == 0.001  # not rewritten by the refused run


def test_resume_may_change_logging_saving_and_length(tiny_models, work, sft_run, tmp_path, capsys):
    out = damaged_copy(sft_run, tmp_path)
    code, err = cli(capsys, *sft(tiny_models["llama"], work, out, "--resume", "--max-steps", "6", "--save-every",
                                 "3", "--log-every", "2", "--keep-last", "1"))
    assert code == 0, err
    assert steps_logged(out) == [1, 2, 3, 4, 6]  # 1-4 from the first run (log_every 1), then every 2nd and the last
    assert checkpoints(out) == ["step-00000006"]


def ppo_run(tiny_models, work, out: Path, capsys, *extra) -> tuple[int, str]:
    return cli(capsys, *ppo(tiny_models["llama"], work, out, "--save-every", "2", "--lr-schedule", "constant",
                            *extra))


def test_ppo_resume_allow_uses_the_new_lr_and_kl_coef(tiny_models, work, tmp_path, capsys):
    out = tmp_path / "ppo"
    assert ppo_run(tiny_models, work, out, capsys, "--max-steps", "2")[0] == 0
    code, err = ppo_run(tiny_models, work, out, capsys, "--resume", "--lr", "0.01", "--kl-coef", "0.5")
    assert code == 2
    assert "lr 0.001 -> 0.01, kl_coef 0.05 -> 0.5" in last_line(err) or \
        "kl_coef 0.05 -> 0.5, lr 0.001 -> 0.01" in last_line(err)
    assert "--resume-allow kl_coef,lr" in last_line(err) or "--resume-allow lr,kl_coef" in last_line(err)
    code, err = ppo_run(tiny_models, work, out, capsys, "--resume", "--lr", "0.01", "--kl-coef", "0.5",
                        "--resume-allow", "lr,kl_coef")
    assert code == 0, err
    train = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert [r["actor_lr"] for r in train] == [1e-3, 1e-3, 1e-2, 1e-2]  # constant schedule: the peak, then the new one
    assert [r["beta"] for r in train] == [0.05, 0.05, 0.5, 0.5]
    assert [r["critic_lr"] for r in train] == [1e-3] * 4
    written = yaml.safe_load((out / "config.yaml").read_text())
    assert written["lr"] == 0.01 and written["kl_coef"] == 0.5 and written["resume_allow"] == ["lr", "kl_coef"]
    assert steps_logged(out, "samples.jsonl") == [1, 2, 3, 4]


def test_resume_tolerates_a_cut_last_line_and_logs_no_step_twice(tiny_models, work, tmp_path, capsys):
    out = tmp_path / "ppo"
    assert ppo_run(tiny_models, work, out, capsys, "--max-steps", "3")[0] == 0  # checkpoint at 2; 3 logged past it
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "split": "tr')  # what a crash in the middle of a write leaves
    code, err = ppo_run(tiny_models, work, out, capsys, "--resume", "--max-steps", "4")
    assert code == 0, err
    assert steps_logged(out) == [1, 2, 3, 4]
    assert steps_logged(out, "samples.jsonl") == [1, 2, 3, 4]


def test_resume_true_in_yaml_means_the_latest_checkpoint(tiny_models, work, sft_run, tmp_path, capsys):
    out = damaged_copy(sft_run, tmp_path)
    (tmp_path / "run.yaml").write_text("resume: true\nmax_steps: 6\n")
    code, err = cli(capsys, *sft(tiny_models["llama"], work, out, "--save-every", "2", "--config",
                                 tmp_path / "run.yaml"))
    assert code == 0, err
    assert "resumed from" in err and "step-00000004 at step 4" in err


# -------------------------------------------------------------------------------------- 2. misbehaving reward fns
def test_a_nan_reward_skips_that_iteration_and_names_the_function_and_rows(tiny_models, work, tmp_path, capsys):
    out = tmp_path / "ppo"
    code, err = cli(capsys, *ppo(tiny_models["llama"], work, out, "--save-every", "0", reward="nan_on_second_call"))
    assert code == 0, err
    warning = next(line for line in err.splitlines() if "skipped" in line)
    assert warning.startswith(f"warning: iteration 2 skipped: --reward-fn {work / 'rewards.py'}:nan_on_second_call "
                              "returned a non-finite score for 2 of 4 responses: row 1 (nan, response ")
    assert "row 3 (nan, response " in warning
    train = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in train] == [0.0, 1.0, 0.0, 0.0]
    assert (out / "final").is_dir()


def test_a_non_finite_ppo_gradient_skips_the_step_with_a_warning(tiny_models, work, tmp_path, capsys, monkeypatch):
    """A NaN policy loss in iteration 2 (its only optimizer step: one epoch, one minibatch): the step engine steps
    neither actor nor critic, the run says so and goes on."""
    import rlhfkit.ppo.train as ppo_train

    real, calls = ppo_train.policy_loss, [0]

    def nan_in_iteration_2(*args, **kwargs):
        calls[0] += 1
        loss, stats = real(*args, **kwargs)
        return (loss * float("nan"), stats) if calls[0] == 2 else (loss, stats)

    monkeypatch.setattr(ppo_train, "policy_loss", nan_in_iteration_2)
    out = tmp_path / "ppo"
    code, err = cli(capsys, *ppo(tiny_models["llama"], work, out, "--ppo-epochs", "1", "--save-every", "0"))
    assert code == 0, err
    assert "warning: iteration 2: non-finite loss or gradient, 100% of its optimizer steps skipped" in err
    train = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in train] == [0.0, 1.0, 0.0, 0.0]


def test_always_nan_rewards_stop_the_run(tiny_models, work, tmp_path, capsys):
    out = tmp_path / "ppo"
    code, err = cli(capsys, *ppo(tiny_models["llama"], work, out, "--max-bad-steps", "2", reward="always_nan"))
    assert code == 1
    assert last_line(err) == ("rlhfkit ppo: error: 2 iterations in a row skipped (non-finite gradients or scores) at "
                              "iteration 2: lower the learning rates, check the reward, or use float32")
    assert not (out / "final").exists()


def test_nan_from_the_monitor_function_skips_the_iteration_too(tiny_models, work, tmp_path, capsys):
    out = tmp_path / "ppo"
    code, err = cli(capsys, *ppo(tiny_models["llama"], work, out, "--max-steps", "2", "--monitor-fn",
                                 f"{work / 'rewards.py'}:always_nan"))
    assert code == 1
    assert f"warning: iteration 1 skipped: --monitor-fn {work / 'rewards.py'}:always_nan returned" in err
    assert "every iteration of this run (2) was skipped" in last_line(err)


@pytest.mark.parametrize("reward, message", [
    ("raises_on_third_call", "raised KeyError: 'answer' (called on 4 responses)"),
    ("returns_none", "returned NoneType None; expected one number per response (4)"),
    ("one_too_few", "returned 3 values for 4 responses; expected one number per response"),
])
def test_a_broken_reward_function_is_one_line_and_keeps_the_checkpoints(tiny_models, work, tmp_path, capsys, reward,
                                                                         message):
    out = tmp_path / "ppo"
    code, err = cli(capsys, *ppo(tiny_models["llama"], work, out, "--save-every", "2", reward=reward))
    assert code == 1
    assert last_line(err) == f"rlhfkit ppo: error: --reward-fn {work / 'rewards.py'}:{reward} {message}"
    if reward == "raises_on_third_call":  # iterations 1-2 trained and were checkpointed; the checkpoint resumes
        assert checkpoints(out) == ["step-00000002"]
        assert checkpoint.checkpoint_problem(out / "checkpoints" / "step-00000002") is None
    assert not (out / "final").exists()


# ------------------------------------------------------------------------------------------------- 6. a full disk
def test_a_checkpoint_write_that_fills_the_disk(tiny_models, work, tmp_path, monkeypatch, capsys):
    real, calls = torch.save, [0]

    def save_until_full(obj, f, *args, **kwargs):  # the second checkpoint's RNG file hits a full disk half-way
        calls[0] += str(f).endswith("rng-0.pt")
        if calls[0] == 2 and str(f).endswith("rng-0.pt"):
            Path(f).write_bytes(b"\0" * 100)
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", save_until_full)
    out = tmp_path / "sft"
    code, err = cli(capsys, *sft(tiny_models["llama"], work, out, "--save-every", "2"))
    assert code == 1
    assert last_line(err) == (f"rlhfkit sft: error: no space left on device while writing checkpoint step-00000004 "
                              f"to {out / 'checkpoints'}; checkpoint step-00000002 is intact")
    assert checkpoints(out) == ["step-00000002"]  # no .tmp-step-00000004 left behind
    assert not (out / "final").exists()


def test_a_final_save_that_fills_the_disk(tiny_models, work, tmp_path, monkeypatch, capsys):
    import errno

    import rlhfkit.models as models

    def fills_the_disk(model, tokenizer, folder, **kwargs):  # the config is written, the weights are not
        Path(folder).mkdir(parents=True)
        (Path(folder) / "config.json").write_text("{}")
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(folder) / "model.safetensors"))

    monkeypatch.setattr(models, "save_model", fills_the_disk)
    out = tmp_path / "sft"
    code, err = cli(capsys, *sft(tiny_models["llama"], work, out, "--save-every", "2"))
    assert code == 1
    assert last_line(err) == (f"rlhfkit sft: error: no space left on device while writing the final model to "
                              f"{out / 'final'}; checkpoint step-00000004 is intact")
    assert not (out / "final").exists() and not (out / ".tmp-final").exists()


def mounted(folder: Path, options: str):
    """A tmpfs at `folder` (root only; the test is skipped where mounting is not allowed)."""
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


@pytest.fixture
def small_disk(tmp_path):
    yield from mounted(tmp_path / "disk", "size=1400k")


@pytest.fixture
def read_only(tmp_path):
    yield from mounted(tmp_path / "ro", "ro,size=64k")


def test_a_really_full_disk(tiny_models, work, small_disk, capsys):
    out = small_disk / "sft"
    # Each checkpoint holds the weights and two Adam moments (about 0.8 MB): the second does not fit.
    code, err = cli(capsys, *sft(tiny_models["llama"], work, out, "--save-every", "2", "--keep-last", "2"))
    assert code == 1
    assert last_line(err) == (f"rlhfkit sft: error: no space left on device while writing checkpoint step-00000004 "
                              f"to {out / 'checkpoints'}; checkpoint step-00000002 is intact")
    assert checkpoints(out) == ["step-00000002"]
    # Resuming on the still-full disk fails the same way, in one line, and leaves the intact checkpoint alone.
    code, err = cli(capsys, *sft(tiny_models["llama"], work, out, "--save-every", "2", "--keep-last", "2",
                                 "--resume"))
    assert code == 1
    assert "no space left on device" in last_line(err)
    assert checkpoints(out) == ["step-00000002"]
    assert checkpoint.checkpoint_problem(out / "checkpoints" / "step-00000002") is None


# ---------------------------------------------------------------------------------------------- 7. overwriting
def test_a_second_run_into_the_same_output_is_refused_unless_asked(tiny_models, work, tmp_path, capsys):
    out = tmp_path / "sft"
    assert cli(capsys, *sft(tiny_models["llama"], work, out, "--save-every", "0"))[0] == 0
    metrics = (out / "metrics.jsonl").read_text()
    code, err = cli(capsys, *sft(tiny_models["llama"], work, out, "--save-every", "0", "--lr", "1e-2"))
    assert code == 2
    assert last_line(err) == (f"rlhfkit sft: error: output: {out} already holds a run (final, metrics.jsonl, "
                              "tensorboard); pass --resume to continue it, --overwrite to replace it, or choose "
                              "another --output")
    assert (out / "metrics.jsonl").read_text() == metrics
    code, err = cli(capsys, *sft(tiny_models["llama"], work, out, "--save-every", "0", "--lr", "1e-2", "--overwrite"))
    assert code == 0, err
    assert (out / "metrics.jsonl").read_text() != metrics and steps_logged(out) == [1, 2, 3, 4]


def test_output_that_is_a_file_or_cannot_be_written(tiny_models, work, tmp_path, capsys):
    (tmp_path / "taken").write_text("x")
    code, err = cli(capsys, *sft(tiny_models["llama"], work, tmp_path / "taken"))
    assert code == 2
    assert last_line(err) == f"rlhfkit sft: error: output: {tmp_path / 'taken'} is a file, not a folder"
    code, err = cli(capsys, *sft(tiny_models["llama"], work, tmp_path / "taken" / "below"))
    assert code == 2
    assert last_line(err).startswith(f"rlhfkit sft: error: output: cannot write into {tmp_path / 'taken' / 'below'} (")


def test_a_merged_lora_model_that_overflows_is_not_written(tiny_models, tokenizer, tmp_path):
    from rlhfkit.models import add_lora, load_causal_lm
    from rlhfkit.training.common import write_model
    from rlhfkit.training.guards import TrainingError, nonfinite_parameter

    model = add_lora(load_causal_lm(str(tiny_models["llama"]), tokenizer), r=4, alpha=4.0, dropout=0.0,
                     target_modules=["all-linear"], task="CAUSAL_LM")
    with torch.no_grad():  # finite factors whose product (1e40) overflows float32 once merged into the weight
        for name, p in model.named_parameters():
            if "layers.0.mlp.down_proj.lora_" in name:
                p.fill_(1e20)
    assert nonfinite_parameter(model) is None
    with pytest.raises(TrainingError, match=r"^final: tensor model.layers.0.mlp.down_proj.weight of the model as "
                                            r"written is not finite"):
        write_model(model, tokenizer, tmp_path / "final", World(), merge_lora=True)
    assert list(tmp_path.iterdir()) == []


def test_a_read_only_output_folder(tiny_models, work, read_only, capsys):
    # Root ignores permission bits: only a read-only mount refuses root's writes, and only a write finds out.
    code, err = cli(capsys, *sft(tiny_models["llama"], work, read_only))
    assert code == 2
    assert last_line(err) == f"rlhfkit sft: error: output: cannot write into {read_only} (Read-only file system)"
