"""Options that used to crash (a traceback, often after the models loaded) or pass silently: each is now one line,
exit code 2, naming the field, file or function, before any model is loaded where that is possible (issue 14, 5)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml
from conftest import color_preference_rows, color_sft_rows, write_jsonl

from rlhfkit import models
from rlhfkit.cli import main


@pytest.fixture
def paths(tiny_models, tmp_path) -> dict[str, Path]:
    return {"model": tiny_models["llama"], "data": write_jsonl(tmp_path / "sft.jsonl", color_sft_rows(8)),
            "prompts": write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "What color is item 3?"}] * 4),
            "pairs": write_jsonl(tmp_path / "pairs.jsonl", color_preference_rows(4)),
            "output": tmp_path / "out", "dir": tmp_path}


@pytest.fixture
def no_model_loads(monkeypatch):
    """Any model load fails the test: these mistakes must be found before."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    # imported before models is patched, or a module imported now would keep `refuse` for good
    users = [importlib.import_module(name) for name in ("rlhfkit.sft.train", "rlhfkit.rm.train", "rlhfkit.ppo.train",
                                                        "rlhfkit.grpo.train", "rlhfkit.dpo.train", "rlhfkit.rl.setup",
                                                        "rlhfkit.rm.evaluate", "rlhfkit.tools.chat",
                                                        "rlhfkit.tools.compare")]
    for module in [models, *users]:
        for name in ("load_causal_lm", "load_sequence_classifier"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, refuse)


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


def last_line_error(capsys, argv: list[str], *needles: str) -> str:
    """As `one_line_error`, for mistakes found once the run has started (its log lines come first)."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    last = err.rstrip("\n").splitlines()[-1]
    assert last.startswith(f"rlhfkit {argv[0]}: error: "), err
    for needle in needles:
        assert needle in last, (needle, err)
    return last


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


@pytest.mark.parametrize("flags,message", [
    (["--lr", "1"], "lr: must be < 1 (AdamW moves each weight by about lr at every step), got 1.0"),
    (["--lr", "0.1", "--weight-decay", "10"], "weight_decay: lr x weight_decay must be < 1 (AdamW multiplies each "
                                              "decayed weight by 1 - lr x weight_decay at every step), got 0.1 x 10.0"),
])
def test_learning_rates_and_weight_decay_that_adamw_cannot_take(flags, message, paths, capsys, no_model_loads):
    """Used to run on into non-finite weights on a CPU, and to stop in AdamW with a traceback on a GPU (a float32
    overflow of its step's scalars)."""
    one_line_error(capsys, sft_args(paths, *flags), message)
    one_line_error(capsys, ppo_args(paths, "--critic-lr", "2e-3", "--weight-decay", "1000"),
                   "weight_decay: critic_lr x weight_decay must be < 1", "got 0.002 x 1000.0")


def test_non_finite_numbers_in_yaml_and_other_commands(paths, capsys, no_model_loads):
    config = paths["dir"] / "run.yaml"
    config.write_text(yaml.safe_dump({"lora_alpha": float("nan")}), encoding="utf-8")
    one_line_error(capsys, sft_args(paths, "--config", str(config)), "lora_alpha: must be a finite number, got nan")
    one_line_error(capsys, ppo_args(paths, "--critic-lr", "inf"), "critic_lr: must be a finite number, got inf")
    one_line_error(capsys, ["chat", "--model", str(paths["model"]), "--temperature", "nan"],
                   "temperature: must be a finite number, got nan")
    one_line_error(capsys, ["demo", "--seed", str(2**64)], "seed: must be in [0, 4294967295]")
    one_line_error(capsys, ["demo", "--algorithms", "ppo,sac"], "algorithms: unknown sac; choose from ppo, grpo")
    one_line_error(capsys, ["demo", "--algorithms", "dpo,dpo"], "algorithms: each name once")
    one_line_error(capsys, ["demo", "--dtype", "float16"], "dtype")
    one_line_error(capsys, ["demo", "--jobs", "3", "--threads", "2"], "jobs: 3 workers need at least as many threads")
    one_line_error(capsys, ["demo", "--jobs", "-1"], "jobs: must be >= 0")


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


# ------------------------------------------------------------------------------------------ what --model names


@pytest.fixture
def not_models(tmp_path, tokenizer_dir, tiny_models) -> dict[str, tuple[Path, str]]:
    """Folders and files that are no model, each with what the error must say."""
    empty = tmp_path / "empty"
    empty.mkdir()
    a_file = tmp_path / "model.safetensors"
    a_file.write_bytes(b"")
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((tiny_models["llama"] / "config.json").read_text())
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "final" / "config.json").write_text("{}")
    return {"empty": (empty, f"{empty} is not a model folder: it has no config.json (it is empty)"),
            "file": (a_file, f"{a_file} is a file; expected a model folder"),
            "tokenizer only": (tokenizer_dir, f"{tokenizer_dir} is not a model folder: it has no config.json (it "
                                              "holds tokenizer.json, tokenizer_config.json)"),
            "no weights": (no_weights, f"{no_weights} has config.json but no weights"),
            "run folder": (run, f"{run} is not a model folder: it has no config.json (it holds final); did you mean "
                                f"{run / 'final'}?")}


@pytest.mark.parametrize("kind", ["empty", "file", "tokenizer only", "no weights", "run folder"])
def test_model_that_is_not_a_model_folder(kind, not_models, paths, capsys, no_model_loads):
    path, message = not_models[kind]
    one_line_error(capsys, ["sft", "--model", str(path), "--data", str(paths["data"]), "--output",
                            str(paths["output"])], f"model: {message}")
    assert not paths["output"].exists()


def test_every_model_option_is_checked(not_models, paths, capsys, no_model_loads):
    empty, message = not_models["empty"]
    for field in ("actor", "reward", "critic", "ref"):
        argv = ppo_args(paths)
        if field in ("actor", "reward"):
            argv[argv.index(f"--{field}") + 1] = str(empty)
        else:
            argv += [f"--{field}", str(empty)]
        one_line_error(capsys, argv, f"{field}: {message}")
    one_line_error(capsys, ["eval-rm", "--model", str(empty), "--data", str(paths["data"])], f"model: {message}")
    one_line_error(capsys, ["chat", "--model", str(empty)], f"model: {message}")
    one_line_error(capsys, ["compare", "--models", f"a={empty}", "--prompts", str(paths["prompts"])],
                   f"models: {message}")


def test_missing_relative_model_path_is_not_tried_on_the_hub_for_a_minute(paths, capsys, monkeypatch,
                                                                         no_model_loads):
    import huggingface_hub

    asked = []

    def unreachable(url, timeout=None, **kwargs):  # the tests use no network: the hub's answer is simulated
        asked.append((url, timeout))
        raise OSError("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", unreachable)
    monkeypatch.chdir(paths["dir"])
    one_line_error(capsys, ["sft", "--model", "sft/final", "--data", str(paths["data"]), "--output", "out"],
                   "model: sft/final is not a local folder, and the hub could not provide it (OSError: [Errno -2] "
                   "Name or service not known)")
    assert len(asked) == 1 and asked[0][1] == 10  # one request with a timeout: a download retried for 48 s before
    assert not (paths["dir"] / "out").exists()


def test_model_folder_without_tokenizer(tiny_models, paths, capsys, no_model_loads):
    bare = paths["dir"] / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((tiny_models["llama"] / name).read_bytes())
    # found when the tokenizer loads, after the data report
    last_line_error(capsys, ["sft", "--model", str(bare), "--data", str(paths["data"]), "--output",
                             str(paths["output"])], f"error: {bare}: no tokenizer files (tokenizer.json, "
                    "tokenizer_config.json) beside the model; copy them from the model it was made from")


# ----------------------------------------------------------------------------------------------- attention


def test_unknown_attn_implementation_lists_the_valid_ones(paths, capsys, no_model_loads):
    message = one_line_error(capsys, sft_args(paths, "--attn-implementation", "bogus"),
                             "attn_implementation: expected one of eager, ", "sdpa", "flash_attention_2",
                             "or a hub kernel such as kernels-community/flash-attn2, got 'bogus'")
    one_line_error(capsys, ppo_args(paths, "--attn-implementation", "bogus"), message.split("error: ")[1])
    assert not paths["output"].exists()


@pytest.mark.parametrize("name", ["eager", "sdpa", "flash_attention_2", "flex_attention", "paged|eager",
                                  "kernels-community/flash-attn2", "kernels-community/flash-attn2@v1:fn"])
def test_known_attn_implementations_pass_the_check(name, paths):
    from rlhfkit.config import parse_config
    from rlhfkit.sft.train import SFTConfig

    argv = sft_args(paths, "--attn-implementation", name)[1:]
    assert parse_config(SFTConfig, argv, "rlhfkit sft").attn_implementation == name


def test_attn_implementation_this_machine_lacks_is_one_line(tiny_models, tokenizer):
    import importlib.util

    from rlhfkit.config import ConfigError

    if importlib.util.find_spec("flash_attn") or importlib.util.find_spec("kernels"):
        pytest.skip("flash attention can be loaded here")
    with pytest.raises(ConfigError, match="attn_implementation: flash_attention_2 cannot be used with "):
        models.load_causal_lm(str(tiny_models["llama"]), tokenizer, attn_implementation="flash_attention_2")


# ------------------------------------------------------------------------------------- lengths the model has


def test_max_len_beyond_learned_positions(tiny_models, paths, capsys, no_model_loads):
    gpt2, opt = tiny_models["gpt2"], tiny_models["opt"]
    limit = "exceed the 512 positions of"
    one_line_error(capsys, ["sft", "--model", str(gpt2), "--data", str(paths["data"]), "--output",
                            str(paths["output"]), "--max-len", "1024"],
                   f"max_len: 1024 tokens {limit} model {gpt2} (gpt2 has a learned table", "use at most 512")
    one_line_error(capsys, ["rm", "--model", str(opt), "--data", str(paths["data"]), "--output",
                            str(paths["output"]), "--max-len", "513"], f"max_len: 513 tokens {limit} model {opt}")
    one_line_error(capsys, ["eval-rm", "--model", str(opt), "--data", str(paths["data"]), "--max-len", "600"],
                   f"max_len: 600 tokens {limit} model {opt}")
    one_line_error(capsys, ppo_args(paths, "--reward", str(gpt2), "--max-new-tokens", "300"),
                   f"max_prompt_len + max_new_tokens (256 + 300): 556 tokens {limit} reward {gpt2}")
    one_line_error(capsys, ppo_args(paths, "--actor", str(opt), "--ptx-data", str(paths["data"]), "--max-len", "600"),
                   f"max_len (PTX rows): 600 tokens {limit} actor {opt}")
    one_line_error(capsys, ["chat", "--model", str(gpt2)],
                   f"max_prompt_len + max_new_tokens (512 + 128): 640 tokens {limit} model {gpt2}")
    one_line_error(capsys, ["compare", "--models", f"a={tiny_models['llama']},b={gpt2}", "--prompts",
                            str(paths["prompts"]), "--max-prompt-len", "500"], f"{limit} model {gpt2}")
    assert not paths["output"].exists()


def test_max_len_beyond_rotary_positions_is_a_warning(tiny_models, paths, caplog):
    from rlhfkit.config import parse_config
    from rlhfkit.sft.train import SFTConfig

    config = parse_config(SFTConfig, sft_args(paths, "--max-len", "1024")[1:], "rlhfkit sft")
    assert config.max_len == 1024
    assert "max_len: 1024 tokens exceed the 512 positions model" in caplog.text
    assert "it runs, but the model has not learned such lengths" in caplog.text


# ---------------------------------------------------------------------------------------------------- LoRA


def test_lora_target_module_the_model_lacks(paths, capsys):
    # found once the model is loaded (its module names are the model's), before any training step
    last_line_error(capsys, sft_args(paths, "--lora-r", "4", "--lora-target-modules", "nope", "--max-steps", "1"),
                    "lora_target_modules: no module of this model is named 'nope'; its layers are down_proj, ",
                    "q_proj", "v_proj (or all-linear)")
    assert not (paths["output"] / "final").exists()


def test_each_lora_target_must_name_a_layer(tiny_models, tokenizer):
    from rlhfkit.config import ConfigError

    def lora(arch: str, targets: list[str]):
        model = models.load_causal_lm(str(tiny_models[arch]), tokenizer)
        return models.add_lora(model, r=2, alpha=4.0, dropout=0.0, target_modules=targets, task="CAUSAL_LM")

    with pytest.raises(ConfigError, match=r"no module of this model is named 'c_atn'; its layers are c_attn, c_fc, "):
        lora("gpt2", ["c_proj", "c_atn"])  # peft alone adapts c_proj and says nothing of c_atn
    with pytest.raises(ConfigError, match=r"'self_attn' is a LlamaAttention, not a layer LoRA can adapt"):
        lora("llama", ["self_attn"])
    adapted = lora("llama", ["q_proj,v_proj"])  # a comma-separated flag value is one item
    assert adapted.peft_config["default"].target_modules == {"q_proj", "v_proj"}


# -------------------------------------------------------------------------------------------------- template


def test_tokenizer_template_without_one(paths, capsys, no_model_loads):
    message = (f"template: 'tokenizer' asked for, but the tokenizer has no chat template ({paths['model']}); choose "
               "auto, human-assistant, alpaca or chatml")
    last_line_error(capsys, sft_args(paths, "--template", "tokenizer"), message)
    last_line_error(capsys, ["eval-rm", "--model", str(paths["model"]), "--data", str(paths["pairs"]), "--template",
                             "tokenizer"], message)
    last_line_error(capsys, ["compare", "--models", f"a={paths['model']}", "--prompts", str(paths["prompts"]),
                             "--max-prompt-len", "256", "--template", "tokenizer"], message)
    last_line_error(capsys, ["chat", "--model", str(paths["model"]), "--max-prompt-len", "256", "--template",
                             "tokenizer"], message)


# ---------------------------------------------------------------------------------------- tools' output files


def test_output_file_that_cannot_be_written(paths, capsys, no_model_loads):
    folder = paths["dir"]
    eval_rm = ["eval-rm", "--model", str(paths["model"]), "--data", str(paths["pairs"]), "--output"]
    one_line_error(capsys, eval_rm + [str(folder)],
                   f"output: {folder} is a folder; give the file to write, e.g. {folder / 'results.json'}")
    one_line_error(capsys, eval_rm + [str(paths["data"] / "scores.json")],
                   f"output: cannot create {paths['data'] / 'scores.json'}: {paths['data']} is a file")
    one_line_error(capsys, ["compare", "--models", f"a={paths['model']}", "--prompts", str(paths["prompts"]),
                            "--max-prompt-len", "256", "--output", str(folder)], f"output: {folder} is a folder")


def test_eval_rm_table_shows_brackets_in_the_data_as_text(paths, capsys):
    pairs = write_jsonl(paths["dir"] / "brackets.jsonl", [{"prompt": "Say [/bold] or [red]", "chosen": " [b]yes",
                                                            "rejected": " no"}])
    assert main(["eval-rm", "--model", str(paths["model"]), "--data", str(pairs)]) == 0  # a MarkupError before
    out = " ".join(capsys.readouterr().out.split())
    assert "[/bold] or [red]" in out and "[b]yes" in out


# --------------------------------------------------------------------------------------------- reward functions


REWARD_FNS = """
def no_arguments():
    return []

def one_argument(responses):
    return [0.0] * len(responses)

def extra_positional_only(prompts, responses, answer, /):
    return [0.0] * len(responses)

def needs_answer(prompts, responses, answer, *, weight=1.0):
    return [weight * (a in r) for r, a in zip(responses, answer)]
"""


@pytest.mark.parametrize("name,signature,reason", [
    ("no_arguments", "()", "too many positional arguments"),
    ("one_argument", "(responses)", "too many positional arguments"),
    ("extra_positional_only", "(prompts, responses, answer, /)", "missing a required argument: 'answer'"),
])
def test_reward_function_with_the_wrong_signature(name, signature, reason, paths, capsys, no_model_loads):
    rewards = paths["dir"] / "rewards.py"
    rewards.write_text(REWARD_FNS)
    spec = f"{rewards}:{name}"
    for field, flags in (("reward_fn", ["--reward-fn", spec]),
                         ("monitor_fn", ["--reward", str(paths["model"]), "--monitor-fn", spec])):
        one_line_error(capsys, ["ppo", "--actor", str(paths["model"]), *flags, "--prompts", str(paths["prompts"]),
                                "--output", str(paths["output"])],
                       f"{field}: {spec} takes {signature}, but is called as fn(prompts, responses, "
                       f"**prompt_columns) ({reason})")
    assert not paths["output"].exists()


def test_reward_function_needing_a_column_the_prompts_lack(paths, capsys):
    rewards = paths["dir"] / "rewards.py"
    rewards.write_text(REWARD_FNS)
    # the prompts' columns are known once they are read: found then, before any model loads
    last_line_error(capsys, ["ppo", "--actor", str(paths["model"]), "--reward-fn", f"{rewards}:needs_answer",
                             "--prompts", str(paths["prompts"]), "--output", str(paths["output"]), "--batch-size", "2",
                             "--max-new-tokens", "2", "--max-steps", "1"],
                    f"reward_fn {rewards}:needs_answer: requires the prompt column 'answer', which the prompt rows do "
                    "not have (their columns: none besides the prompt)")
    assert not (paths["output"] / "final").exists()


# ------------------------------------------------------------------------------------ chat prints safe text


def test_chat_shows_control_characters_as_escapes():
    from rlhfkit.tools.chat import Turn, chat_loop
    from rlhfkit.tools.generation import Response

    raw = "fine\rHACKED \x1b[2J\x07 tab\there\nnext line \x85 caf\u00e9 \u2014 \U0001f600 \x7f"
    written = []
    turns = chat_loop(["hi"], written.append, lambda history: Turn([], "", Response(raw, True, 1, [])))
    assert written == ["assistant> fine\\rHACKED \\x1b[2J\\x07 tab\there\nnext line \\x85 caf\u00e9 \u2014 "
                       "\U0001f600 \\x7f"]
    assert turns[0].reply.text == raw  # the history keeps what the model wrote: only the display is escaped


# -------------------------------------------------------------------------------------------------- the docs


def test_docs_state_k3_and_the_value_loss_as_computed():
    import dataclasses

    import torch

    from rlhfkit.ppo import core as ppo_core
    from rlhfkit.ppo.config import PPOConfig
    from rlhfkit.rl import core

    help_text = next(f.metadata["help"] for f in dataclasses.fields(PPOConfig) if f.name == "kl_estimator")
    assert "r = log pi - log pi_ref" in help_text and "k3 = exp(-r) - 1 + r" in help_text
    assert "ratio = pi_ref/pi" in help_text  # "ratio - 1 - log ratio" holds only for this ratio
    r = torch.tensor([[0.5]])
    assert core.kl_estimate(r, torch.zeros(1, 1), "k3").item() == pytest.approx(float(torch.exp(-r) - 1 + r))
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    assert help_text in readme  # the configuration reference repeats the help
    assert "loss 0.5 x max((V - G)^2, (V_old + clip(V - V_old, -c, c) - G)^2)" in readme
    values, returns = torch.tensor([[3.0]]), torch.tensor([[1.0]])
    loss, _ = ppo_core.value_loss(values, values, returns, torch.ones(1, 1, dtype=torch.bool), 0.2)
    assert loss.item() == pytest.approx(0.5 * 2.0 ** 2)


def test_more_ranks_than_gpus_is_one_line_before_any_rank_starts(paths, capsys, monkeypatch):
    """Each local rank takes a GPU of its own: on a machine with one GPU, --nproc 2 used to stop in every rank with
    CUDA's 'invalid device ordinal' traceback."""
    import torch

    from rlhfkit.training import distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(distributed, "launch", lambda *args: pytest.fail("the ranks were started"))
    one_line_error(capsys, sft_args(paths, "--nproc", "2", "--strategy", "ddp"),
                   "nproc: 2 ranks on this machine need 2 GPUs, one each, and it has 1; use --nproc 1, or run the "
                   "ranks on the CPU with CUDA_VISIBLE_DEVICES= (empty)")


def test_a_rank_started_by_torchrun_without_a_gpu_of_its_own_says_so(monkeypatch):
    import torch

    from rlhfkit.config import ConfigError
    from rlhfkit.training.distributed import init_world

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: pytest.fail("set_device was reached"))
    for name, value in dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT="29999").items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=r"^nproc: 2 ranks on this machine need 2 GPUs, one each, and it has 1; use "
                                          r"torchrun --nproc-per-node 1, or run the ranks on the CPU"):
        init_world("ddp", 5)
