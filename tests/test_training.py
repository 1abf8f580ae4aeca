"""SFT and reward-model training on tiny models: learning, saving, LoRA, head init, resume, bad steps, accumulation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import Crash, color_preference_rows, color_sft_rows, crash_at_call, pair_cases, write_jsonl
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import rlhfkit.models as rlhfkit_models
import rlhfkit.sft.train as sft_train
import rlhfkit.training.loop as loop
from rlhfkit.config import ConfigError, make_config
from rlhfkit.data.encode import EncodeStats, encode_conversation
from rlhfkit.data.loading import load_examples
from rlhfkit.data.templates import resolve_template
from rlhfkit.models import load_causal_lm, load_sequence_classifier, load_tokenizer, score_head
from rlhfkit.data.encode import encode_pairs
from rlhfkit.rm.scoring import score_pairs
from rlhfkit.rm.train import RMConfig, run_rm
from rlhfkit.sft.train import SFTConfig, run_sft
from rlhfkit.training.common import cpu_pass_tokens, make_optimizer, make_scheduler, model_shape, rows_per_pass
from rlhfkit.training.guards import TrainingError
from rlhfkit.training.loop import fit, train_step
from rlhfkit.training.metrics import RunLogger

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    # A skipped first step steps the schedule without the optimizer, as intended (the schedule follows the step count).
    pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before:UserWarning"),
    # peft saves the grown embeddings with an adapter-only model: expected after adding the pad token.
    pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers` to `True`:UserWarning"),
]




@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("train-data")
    return {
        "sft": write_jsonl(root / "sft.jsonl", color_sft_rows(64)),
        "sft_eval": write_jsonl(root / "sft_eval.jsonl", color_sft_rows(16, seed=1)),
        "pref": write_jsonl(root / "pref.jsonl", color_preference_rows(96)),
        "pref_eval": write_jsonl(root / "pref_eval.jsonl", color_preference_rows(32, seed=1)),
    }


def sft_config(model: Path, data, out: Path, **values) -> SFTConfig:
    base = dict(model=str(model), data=[str(data["sft"])], eval_data=[str(data["sft_eval"])], output=str(out),
                batch_size=8, lr=5e-3, save_every=0)
    return make_config(SFTConfig, {**base, **values})


def rm_config(model: Path, data, out: Path, **values) -> RMConfig:
    base = dict(model=str(model), data=[str(data["pref"])], eval_data=[str(data["pref_eval"])], output=str(out),
                batch_size=8, lr=3e-3, save_every=0)
    return make_config(RMConfig, {**base, **values})


@pytest.fixture
def saved_models(monkeypatch) -> list:
    """Every model object a stage hands to save_model (the trained, in-memory model)."""
    seen = []
    original = rlhfkit_models.save_model

    def capture(model, *args, **kwargs):
        seen.append(model)
        return original(model, *args, **kwargs)

    monkeypatch.setattr(rlhfkit_models, "save_model", capture)
    return seen


def records(out: Path, split: str) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def eval_pairs(path: Path, tokenizer) -> list:
    pairs = load_examples([str(path)], "preference").examples
    return encode_pairs(pairs, tokenizer, resolve_template("auto", tokenizer), 512, EncodeStats())


def lm_batch(tokenizer) -> dict:
    rows = ["\n\nHuman: What color is item 3?\n\nAssistant: Item 3 is green.", "\n\nHuman: say red"]
    return tokenizer(rows, return_tensors="pt", padding=True)


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def safetensors_in(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    assert tensors, f"no safetensors in {folder}"
    return tensors


# ------------------------------------------------------------------------------------------------ learning


@pytest.mark.cpu
def test_sft_lowers_eval_loss_on_memorisable_task(tiny_models, data, tmp_path):
    config = sft_config(tiny_models["llama"], data, tmp_path / "sft", max_steps=20, eval_every=10)
    final = run_sft(config)

    tokenizer = load_tokenizer(str(tiny_models["llama"]))
    template = resolve_template("auto", tokenizer)
    rows = load_examples([str(data["sft_eval"])], "sft").examples
    eval_set = [encode_conversation(c, tokenizer, template, 512, EncodeStats()) for c in rows]
    base = load_causal_lm(str(tiny_models["llama"]), tokenizer, seed=config.seed)
    before = sft_train.evaluate(base, eval_set, tokenizer.pad_token_id, 8, "float32")["loss"]

    evals = records(tmp_path / "sft", "eval")
    assert [r["step"] for r in evals] == [10, 20]
    after = evals[-1]["loss"]
    assert before > math.log(len(tokenizer)) - 1.0  # a random model: about log(vocab) per token
    assert after < before - 2.0, (before, after)
    assert evals[-1]["perplexity"] == pytest.approx(math.exp(after), rel=1e-9)
    # The saved model, reloaded with plain transformers, has exactly the logged eval loss.
    reloaded = AutoModelForCausalLM.from_pretrained(final)
    again = sft_train.evaluate(reloaded, eval_set, tokenizer.pad_token_id, 8, "float32")["loss"]
    assert again == pytest.approx(after, rel=1e-6, abs=1e-6)


@pytest.mark.cpu
def test_rm_reaches_high_accuracy_and_writes_reward_stats(tiny_models, data, tmp_path):
    final = run_rm(rm_config(tiny_models["llama"], data, tmp_path / "rm", max_steps=10, eval_every=5))
    evals = records(tmp_path / "rm", "eval")
    assert [r["step"] for r in evals] == [5, 10]
    assert evals[-1]["accuracy"] >= 0.9
    assert evals[-1]["loss"] < 0.2 < math.log(2)  # a fresh head scores about 0 for both: loss log 2
    assert {"loss", "accuracy", "chosen_score", "rejected_score", "margin"} <= set(evals[-1])

    # reward_stats.json: mean and std of every score (chosen and rejected) on the held-out pairs, recomputed.
    stats = json.loads((final / "reward_stats.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(final)
    model = AutoModelForSequenceClassification.from_pretrained(final)
    pairs = eval_pairs(data["pref_eval"], tokenizer)
    chosen, rejected = score_pairs(model, pairs, tokenizer.pad_token_id, 8, "float32")
    scores = torch.cat([chosen, rejected]).double()
    assert stats["count"] == 64 == len(scores)
    assert stats["mean"] == pytest.approx(scores.mean().item(), abs=1e-6)
    assert stats["std"] == pytest.approx(scores.std().item(), abs=1e-6)
    assert (chosen > rejected).double().mean().item() == pytest.approx(evals[-1]["accuracy"], abs=1e-9)
    config = json.loads((final / "config.json").read_text())
    assert config["rlhfkit_reward_mean"] == pytest.approx(stats["mean"], abs=1e-9)
    assert config["rlhfkit_reward_std"] == pytest.approx(stats["std"], abs=1e-9)


# ---------------------------------------------------------------------------------- save and reload (HF format)


@pytest.mark.cpu
@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_sft_then_rm_save_reload_with_plain_transformers(arch, tiny_models, data, tmp_path, saved_models):
    base = tiny_models[arch]
    sft_final = run_sft(sft_config(base, data, tmp_path / "sft", max_steps=2, batch_size=4, lr=1e-2))
    policy = saved_models[-1].eval()
    tokenizer = AutoTokenizer.from_pretrained(sft_final)
    assert tokenizer.pad_token == "<|pad|>" and tokenizer.pad_token_id != tokenizer.eos_token_id
    reloaded = AutoModelForCausalLM.from_pretrained(sft_final).eval()
    assert reloaded.get_input_embeddings().weight.shape[0] == len(tokenizer)
    batch = lm_batch(tokenizer)
    with torch.no_grad():
        expected = policy(**batch).logits
        got = reloaded(**batch).logits
        untrained = load_causal_lm(str(base), tokenizer).eval()(**batch).logits
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert (got - untrained).abs().max().item() > 1e-3  # the saved model is the trained one

    rm_final = run_rm(rm_config(sft_final, data, tmp_path / "rm", max_steps=2, batch_size=4, lr=1e-2))
    rm = saved_models[-1].eval()
    reloaded_rm = AutoModelForSequenceClassification.from_pretrained(rm_final).eval()
    assert reloaded_rm.config.num_labels == 1
    assert reloaded_rm.config.pad_token_id == tokenizer.pad_token_id
    pairs = eval_pairs(data["pref_eval"], tokenizer)[:8]
    c_mem, r_mem = score_pairs(rm, pairs, tokenizer.pad_token_id, 4, "float32")
    c_new, r_new = score_pairs(reloaded_rm, pairs, tokenizer.pad_token_id, 4, "float32")
    torch.testing.assert_close(c_new, c_mem, atol=1e-6, rtol=0)
    torch.testing.assert_close(r_new, r_mem, atol=1e-6, rtol=0)
    # Scores are read at the last real token: padding a sequence further does not change its score.
    single = score_pairs(reloaded_rm, pairs[:1], tokenizer.pad_token_id, 1, "float32")[0]
    torch.testing.assert_close(single, c_new[:1], atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch,lora", [("llama", False), ("gpt2", False), ("opt", False), ("llama", True)])
def test_pair_rows_give_the_scores_and_gradients_of_whole_sequences(arch, lora, tiny_models, tokenizer):
    """The reward model scores each pair in one row, its prompt once: the same chosen and rejected scores and
    parameter gradients as the two sequences apart (with a LoRA adapter too, whose head is peft's trainable copy)."""
    from rlhfkit.data.batching import collate_pair_rows, collate_pairs
    from rlhfkit.models import add_lora
    from rlhfkit.rm.scoring import batch_scores

    model = load_sequence_classifier(str(tiny_models[arch]), tokenizer).eval()
    if lora:
        model = add_lora(model, r=4, alpha=8, dropout=0.0, target_modules=["all-linear"], task="SEQ_CLS")
    pairs = pair_cases(tokenizer)
    results = []
    for batch in (collate_pairs(pairs, tokenizer.pad_token_id), collate_pair_rows(pairs, tokenizer.pad_token_id)):
        model.zero_grad()
        scores = batch_scores(model, batch)
        (scores[:, 0] - 0.5 * scores[:, 1]).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((scores.detach(), grads))
    (apart, apart_grads), (rows, rows_grads) = results
    assert apart.shape == (5, 2) and apart.std() > 0
    torch.testing.assert_close(rows, apart, rtol=0, atol=1e-5)
    assert set(rows_grads) == set(apart_grads) and any("score" in n for n in rows_grads)
    for name, grad in apart_grads.items():
        torch.testing.assert_close(rows_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------------------------------- LoRA RM


def head_params(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if ".score." in f".{n}." or n.startswith("score.")}


@pytest.mark.cpu
@pytest.mark.parametrize("merge", [True, False], ids=["merged", "adapter-only"])
def test_lora_rm_trains_saves_and_reloads_head(merge, tiny_models, data, tmp_path, saved_models):
    base = tiny_models["llama"]
    config = rm_config(base, data, tmp_path / "rm", max_steps=3, lr=1e-2, lora_r=4, lora_merge=merge)
    final = run_rm(config)
    model = saved_models[-1].eval()
    tokenizer = load_tokenizer(str(final))

    trained_heads = {n: p for n, p in head_params(model).items() if p.requires_grad}
    assert trained_heads, "the score head must be trainable under LoRA"
    assert all("modules_to_save" in n for n in trained_heads)
    lora = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    frozen_base = [n for n, p in model.named_parameters() if not p.requires_grad and "q_proj.base_layer" in n]
    assert lora and frozen_base
    (head_weight,) = [p for n, p in trained_heads.items() if n.endswith("weight")]
    initial = score_head(load_sequence_classifier(str(base), tokenizer, seed=config.seed)).weight
    assert (head_weight - initial).abs().max().item() > 1e-3, "the score head did not change in training"

    pairs = eval_pairs(data["pref_eval"], tokenizer)
    pad = tokenizer.pad_token_id
    before = torch.cat(score_pairs(model, pairs, pad, 8, "float32"))

    if merge:
        assert not (final / "adapter_config.json").exists()
        reloaded = AutoModelForSequenceClassification.from_pretrained(final).eval()
        assert torch.equal(reloaded.score.weight, head_weight.detach())
        after = torch.cat(score_pairs(reloaded, pairs, pad, 8, "float32"))
        torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-6)  # merged W + BA: float32 rounding only
    else:
        assert (final / "adapter_config.json").is_file() and not (final / "model.safetensors").exists()
        saved = load_file(str(final / "adapter_model.safetensors"))
        assert any("score" in k for k in saved), "the adapter file must hold the trained score head"
        # Plain peft: the base model with the pad token added (as in training), then the adapter.
        from peft import PeftModel

        plain = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
        plain.resize_token_embeddings(len(tokenizer))
        plain.config.pad_token_id = pad
        plain = PeftModel.from_pretrained(plain, final).eval()
        torch.testing.assert_close(torch.cat(score_pairs(plain, pairs, pad, 8, "float32")), before,
                                   atol=1e-6, rtol=0)
        # rlhfkit's own loader (used by eval-rm and the next stage) reads the adapter folder and merges it into a
        # plain model: float32 rounding of W + BA only, as in the merged case above.
        ours = load_sequence_classifier(str(final), tokenizer).eval()
        assert not hasattr(ours, "peft_config")
        torch.testing.assert_close(torch.cat(score_pairs(ours, pairs, pad, 8, "float32")), before,
                                   atol=1e-5, rtol=1e-6)


# ------------------------------------------------------------------------------------------- score head init


def test_rm_head_from_causal_lm_has_std_one_over_sqrt_hidden_plus_one(tokenizer_dir, tokenizer, tmp_path):
    from rlhfkit.tiny import make_tiny_model

    wide = make_tiny_model("llama", AutoTokenizer.from_pretrained(tokenizer_dir), tmp_path / "wide", hidden=256,
                           layers=1, heads=4, ffn=32)
    model = load_sequence_classifier(str(wide), tokenizer, seed=0)
    weight = score_head(model).weight.detach().double()
    assert weight.shape == (1, 256)
    target = 1 / math.sqrt(257)  # 0.0624; HF's own init would be initializer_range = 0.02
    # The std of 256 draws has a standard error of about target / sqrt(2 * 256) = 0.0028: allow 5 of those.
    assert abs(weight.std().item() - target) < 0.014, weight.std().item()
    assert abs(weight.mean().item()) < 4 * target / 16
    assert score_head(model).bias is None or torch.count_nonzero(score_head(model).bias) == 0
    # Drawn from the seed: the same seed gives the same head (resume rebuilds it), another seed another one.
    same_seed = load_sequence_classifier(str(wide), tokenizer, seed=0)
    assert torch.equal(score_head(same_seed).weight, score_head(model).weight)
    assert not torch.equal(score_head(load_sequence_classifier(str(wide), tokenizer, seed=1)).weight,
                           score_head(model).weight)
    # A model that already has a score head keeps it.
    model.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    again = load_sequence_classifier(str(tmp_path / "rm"), tokenizer, seed=5)
    assert torch.equal(score_head(again).weight, score_head(model).weight)


# ---------------------------------------------------------------------------------------------------- resume


def check_resume(monkeypatch, tmp_path, make, run) -> None:
    """Uninterrupted run vs a run killed in step 4 (checkpoints every 2 steps) then resumed: identical weights."""
    full_final = run(make(tmp_path / "full"))
    full = tmp_path / "full"
    crash_at_call(monkeypatch, loop, "train_step", 4)
    with pytest.raises(Crash):
        run(make(tmp_path / "cut"))
    cut = tmp_path / "cut"
    assert sorted(p.name for p in (cut / "checkpoints").iterdir()) == ["step-00000002"]
    assert not (cut / "final").exists()
    assert [r["step"] for r in records(cut, "train")] == [1, 2, 3]

    with pytest.raises(ConfigError, match="already holds a run"):
        run(make(cut))  # without resume, an output with checkpoints is refused

    calls = crash_at_call(monkeypatch, loop, "train_step", 0)
    resumed = run(make(cut, resume="latest"))
    assert calls[0] == 4  # steps 3..6 only
    assert_same_tensors(safetensors_in(full_final), safetensors_in(resumed))
    # metrics.jsonl: what the crashed run logged after its checkpoint is replaced, each step once.
    assert [r["step"] for r in records(cut, "train")] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records(cut, "train")] == [r["step"] for r in records(full, "train")]
    full_losses = [r["loss"] for r in records(full, "train")]
    assert [r["loss"] for r in records(cut, "train")] == full_losses


def test_sft_resume_is_bitwise_identical(tiny_models, data, tmp_path, monkeypatch):
    # GPT-2 has dropout, so this also checks that the RNG state is restored.
    def make(out, **extra):
        return sft_config(tiny_models["gpt2"], data, out, max_steps=6, batch_size=4, lr=1e-2, save_every=2,
                          keep_last=5, eval_every=3, **extra)

    check_resume(monkeypatch, tmp_path, make, run_sft)
    final = tmp_path / "full" / "final"
    base = safetensors_in(tiny_models["gpt2"])
    trained = safetensors_in(final)
    assert not torch.equal(trained["transformer.h.0.attn.c_attn.weight"], base["transformer.h.0.attn.c_attn.weight"])


def test_lora_rm_resume_is_bitwise_identical(tiny_models, data, tmp_path, monkeypatch):
    def make(out, **extra):
        return rm_config(tiny_models["llama"], data, out, max_steps=6, batch_size=4, lr=1e-2, save_every=2,
                         keep_last=5, lora_r=4, lora_dropout=0.1, lora_merge=False, **extra)

    check_resume(monkeypatch, tmp_path, make, run_rm)
    adapter = safetensors_in(tmp_path / "full" / "final")
    assert any("lora_B" in k for k in adapter) and any("score" in k for k in adapter)
    assert any(torch.count_nonzero(v) for k, v in adapter.items() if "lora_B" in k)  # B starts at 0: it trained
    assert json.loads((tmp_path / "cut" / "final" / "reward_stats.json").read_text()) == \
        json.loads((tmp_path / "full" / "final" / "reward_stats.json").read_text())


def test_resume_latest_without_checkpoints_starts_fresh(tiny_models, data, tmp_path):
    out = tmp_path / "sft"
    final = run_sft(sft_config(tiny_models["llama"], data, out, max_steps=1, resume="latest"))
    assert final.is_dir() and [r["step"] for r in records(out, "train")] == [1]


# ------------------------------------------------------------------------------------------ non-finite losses


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(3, 1)


def micro(kind: str, n: int = 2, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.zeros((n, 4), dtype=torch.long), "attention_mask": torch.ones((n, 4), dtype=torch.long),
            "x": torch.randn(n, 3, generator=g), "y": torch.randn(n, generator=g), "num_items": n, "kind": kind}


def tiny_loss(model, mb):
    pred = model.linear(mb["x"]).squeeze(-1)
    if mb["kind"] == "nan_loss":
        return ((pred - mb["y"]) ** 2).sum() * float("nan"), {}
    if mb["kind"] == "nan_grad":  # a finite loss (0) whose gradient is 0 * inf = nan
        return torch.sqrt((model.linear.weight * 0).sum()) + 0 * pred.sum(), {}
    return ((pred - mb["y"]) ** 2).sum(), {"abs_err": (pred - mb["y"]).abs().sum().item()}


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def setup_tiny(steps: int = 10):
    model = Tiny()
    optimizer = make_optimizer(model, 0.1, 0.0)
    return model, optimizer, make_scheduler(optimizer, "constant", 0, steps)


@pytest.mark.cpu
@pytest.mark.parametrize("bad", ["nan_loss", "nan_grad"])
def test_train_step_skips_non_finite_step(bad):
    model, optimizer, scheduler = setup_tiny()
    start = weights(model)
    # The good micro-batch's gradient is accumulated first; the bad one must still cancel the whole step.
    stats = train_step(model, [micro("good"), micro(bad, seed=1)], tiny_loss, optimizer, scheduler,
                       max_grad_norm=1.0, dtype="float32")
    assert stats.skipped and math.isnan(stats.loss) and stats.extra == {}
    assert_same_tensors(weights(model), start)
    assert all(p.grad is None for p in model.parameters())
    assert not optimizer.state, "AdamW must not count a skipped step"
    assert scheduler.last_epoch == 1  # the schedule still follows the step count
    good = train_step(model, [micro("good")], tiny_loss, optimizer, scheduler, max_grad_norm=1.0, dtype="float32")
    assert not good.skipped and math.isfinite(good.loss)
    assert not torch.equal(weights(model)["linear.weight"], start["linear.weight"])


def run_fit(tmp_path, kinds: list[str], max_bad_steps: int, snapshots: list | None = None):
    model, optimizer, scheduler = setup_tiny(len(kinds))
    logger = RunLogger(tmp_path, total_steps=len(kinds), tensorboard=False)

    def step_batches(step):
        if snapshots is not None:
            snapshots.append(weights(model))
        return [micro(kinds[step], seed=step)]

    try:
        fit(model, loss_fn=tiny_loss, step_batches=step_batches, optimizer=optimizer, scheduler=scheduler,
            start_step=0, max_steps=len(kinds), max_grad_norm=1.0, dtype="float32", logger=logger, eval_fn=None,
            eval_every=0, save_fn=None, save_every=0, max_bad_steps=max_bad_steps)
    finally:
        logger.close()
    return model


@pytest.mark.cpu
def test_fit_skips_bad_step_with_warning(tmp_path, capsys):
    snapshots: list = []
    model = run_fit(tmp_path, ["good", "nan_loss", "good"], max_bad_steps=2, snapshots=snapshots)
    snapshots.append(weights(model))
    assert not torch.equal(snapshots[0]["linear.weight"], snapshots[1]["linear.weight"])  # step 1 trained
    assert_same_tensors(snapshots[1], snapshots[2])  # step 2 was skipped
    assert not torch.equal(snapshots[2]["linear.weight"], snapshots[3]["linear.weight"])  # step 3 trained
    out = capsys.readouterr()
    assert "step 2: non-finite loss or gradient, step skipped (1 in a row)" in out.out + out.err
    train = records(tmp_path, "train")
    assert [r["skipped"] for r in train] == [0.0, 1.0, 0.0]
    assert train[1]["loss"] == "nan" and math.isfinite(train[0]["loss"]) and "abs_err" in train[0]


@pytest.mark.cpu
def test_fit_stops_after_max_bad_steps_in_a_row(tmp_path):
    snapshots: list = []
    with pytest.raises(TrainingError, match="3 non-finite steps in a row at step 3"):
        run_fit(tmp_path, ["nan_loss", "nan_grad", "nan_loss"] + ["good"] * 7, max_bad_steps=3, snapshots=snapshots)
    assert len(snapshots) == 3
    assert_same_tensors(snapshots[0], snapshots[2])


@pytest.mark.cpu
def test_fit_counts_only_bad_steps_in_a_row(tmp_path):
    model = run_fit(tmp_path, ["nan_loss", "nan_loss", "good", "nan_grad", "nan_loss", "good"], max_bad_steps=3)
    assert torch.isfinite(model.linear.weight).all()
    assert [r["skipped"] for r in records(tmp_path, "train")] == [1.0, 1.0, 0.0, 1.0, 1.0, 0.0]


def test_cli_exits_1_when_training_cannot_go_on(tiny_models, data, tmp_path, monkeypatch, capsys):
    from rlhfkit.cli import main

    def nan_loss(model, batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return logits.sum() * float("nan"), {}

    monkeypatch.setattr(sft_train, "sft_loss", nan_loss)
    code = main(["sft", "--model", str(tiny_models["llama"]), "--data", str(data["sft"]), "--output",
                 str(tmp_path / "out"), "--max-steps", "5", "--max-bad-steps", "2"])
    err = capsys.readouterr().err
    assert code == 1
    assert "2 non-finite steps in a row at step 2" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------- gradient accumulation


@pytest.mark.cpu
@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_gradient_accumulation_matches_one_big_batch(stage, tiny_models, data, tmp_path):
    # A small lr keeps AdamW from amplifying float rounding in near-zero gradients past the 1e-6 tolerance.
    make, run = (sft_config, run_sft) if stage == "sft" else (rm_config, run_rm)
    outs = [tmp_path / f"micro{m}" for m in (2, 8)]
    finals = [run(make(tiny_models["llama"], data, out, max_steps=3, batch_size=8, micro_batch_size=m, lr=1e-5,
                       lr_schedule="constant", eval_data=[])) for out, m in zip(outs, (2, 8))]
    accumulated, whole = safetensors_in(finals[0]), safetensors_in(finals[1])
    assert sorted(accumulated) == sorted(whole)
    for name in accumulated:
        torch.testing.assert_close(accumulated[name], whole[name], atol=1e-6, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
    base = safetensors_in(tiny_models["llama"])
    moved = (whole["model.layers.0.mlp.up_proj.weight"] - base["model.layers.0.mlp.up_proj.weight"]).abs().max()
    assert moved > 2e-5  # three steps at lr 1e-5 moved the weights well past the tolerance
    # AdamW hides a constant gradient scale; the logged loss and (pre-clipping) gradient norm do not.
    a, b = records(outs[0], "train"), records(outs[1], "train")
    assert [r["step"] for r in a] == [1, 2, 3]
    for ra, rb in zip(a, b):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-6)
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-5)


# ------------------------------------------------------------------------------------ adapter output as next input
def test_adapter_only_output_starts_the_next_stage_as_a_plain_trainable_model(tmp_path, tiny_models):
    """A `lora_merge: false` SFT output given as --model loads merged: full fine-tuning trains every weight of it."""
    data = write_jsonl(tmp_path / "sft.jsonl", color_sft_rows(16))
    first = run_sft(make_config(SFTConfig, {"model": str(tiny_models["llama"]), "data": [str(data)],
                                            "output": str(tmp_path / "lora"), "max_steps": 2, "batch_size": 8,
                                            "lr": 1e-2, "lora_r": 4, "lora_merge": False, "eval_split": 0.0}))
    assert (first / "adapter_config.json").is_file()
    tokenizer = load_tokenizer(str(first))
    model = load_causal_lm(str(first), tokenizer)
    assert not hasattr(model, "peft_config")
    assert all(p.requires_grad for p in model.parameters())
    base = load_causal_lm(str(tiny_models["llama"]), tokenizer)
    changed = [n for n, p in model.named_parameters()
               if not torch.equal(p, dict(base.named_parameters())[n]) and "embed" not in n]
    assert changed, "the adapter's update must be merged into the weights"
    second = run_sft(make_config(SFTConfig, {"model": str(first), "data": [str(data)], "output": str(tmp_path / "full"),
                                             "max_steps": 1, "batch_size": 8, "lr": 1e-3, "eval_split": 0.0}))
    after = AutoModelForCausalLM.from_pretrained(second)
    moved = [n for n, p in after.named_parameters() if not torch.equal(p, dict(model.named_parameters())[n])]
    assert len(moved) == len(list(after.parameters())), "full fine-tuning must update every weight"


# ------------------------------------------------------------------------------------------- gradient checkpointing
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_models, tokenizer):
    """Recomputing activations in the backward pass must not change the numbers, only the memory."""
    from rlhfkit.data.batching import pad_right

    ids = [tokenizer("Item 3 is red.")["input_ids"], tokenizer("What color is item 7?")["input_ids"]]
    batch = pad_right(ids, tokenizer.pad_token_id, [[True] * len(s) for s in ids])
    grads = []
    for checkpointing in (False, True):
        model = load_causal_lm(str(tiny_models["llama"]), tokenizer, gradient_checkpointing=checkpointing)
        model.train()
        assert rlhfkit_models.checkpoints_activations(model) == checkpointing
        loss, _ = sft_train.sft_loss(model, batch)
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss_a, grad_a), (loss_b, grad_b) = grads
    assert torch.equal(loss_a, loss_b)
    assert grad_a.keys() == grad_b.keys() and len(grad_a) > 10
    for name in grad_a:
        torch.testing.assert_close(grad_b[name], grad_a[name], atol=1e-6, rtol=0)


def test_cpu_bf16_attention_is_float32_where_gradients_flow(tiny_models, tokenizer):
    """torch's CPU flash-attention backward is several times slower in bf16 than in float32 (README "bf16 on CPUs"),
    so rlhfkit's loaders make `sdpa` compute in float32 where a backward pass will go through it; forward-only passes
    (sampling, reference and reward scoring) keep bf16."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model = load_causal_lm(str(tiny_models["llama"]), tokenizer)
    attention, module = ALL_ATTENTION_FUNCTIONS["sdpa"], model.model.layers[0].self_attn
    g = torch.Generator().manual_seed(0)
    heads, dim = model.config.num_attention_heads, model.config.hidden_size // model.config.num_attention_heads
    # What a layer hands it under autocast: q and k in float32 (out of the rotary embedding), v in bf16.
    q, k, v = (torch.randn(2, heads, 7, dim, generator=g) for _ in range(3))
    v = v.bfloat16()
    kw = dict(dropout=0.0, scaling=module.scaling)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain, _ = sdpa_attention_forward(module, q, k, v, None, **kw)  # transformers' own: bf16 inside
        forward_only, _ = attention(module, q, k, v, None, **kw)
        q_trained = q.clone().requires_grad_()
        trained, _ = attention(module, q_trained, k, v, None, **kw)
    q_exact = q.clone().requires_grad_()
    exact, _ = sdpa_attention_forward(module, q_exact, k, v.float(), None, **kw)
    assert forward_only.dtype == trained.dtype == torch.bfloat16
    assert torch.equal(forward_only, plain)
    assert torch.equal(trained, exact.bfloat16()) and not torch.equal(trained, plain)
    trained.float().pow(2).sum().backward()
    exact.bfloat16().float().pow(2).sum().backward()
    assert torch.equal(q_trained.grad, q_exact.grad)


def test_rows_per_pass_fills_the_token_budget():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert rows_per_pass(4, 0, 1000, cpu) == 4  # an explicit micro_batch_size wins
    assert rows_per_pass(0, 0, 176, cpu) == 11  # 2048 // 176
    assert rows_per_pass(0, 0, 176, gpu) == 93  # 16384 // 176
    assert rows_per_pass(0, 1000, 176, cpu) == 5
    assert rows_per_pass(0, 100, 176, cpu) == 1  # at least one row
    assert rows_per_pass(0, 0, 176, cpu, 8192) == 46  # a budget sized to the model (cpu_pass_tokens)
    assert rows_per_pass(0, 0, 176, gpu, 8192) == 93  # GPUs keep 16384
    assert rows_per_pass(0, 1000, 176, cpu, 8192) == 5  # an explicit budget wins


def test_cpu_pass_tokens_scale_with_the_model_and_bound_the_logits():
    assert cpu_pass_tokens(512 * 8, 2048) == 2048  # the 30M Llama the budget was measured on
    assert cpu_pass_tokens(2048 * 24, 32000) == 2048  # never below 2048
    assert cpu_pass_tokens(256 * 4, 453) == 8192  # 4x narrower per token: 4x the tokens
    assert cpu_pass_tokens(128 * 4, 600) == 16384  # the demo's model: capped
    assert cpu_pass_tokens(32 * 2, 0) == 16384  # vocabulary unknown: no logits bound
    assert cpu_pass_tokens(256 * 4, 16384) == 4096  # logits of 2048 x 32768 at most
    assert cpu_pass_tokens(64 * 8, 50257) == 2048  # a small model with a large vocabulary keeps 2048
    assert cpu_pass_tokens(0, 0) == 2048  # nothing known: the plain default


def test_model_shape_reads_the_config_through_peft(tiny_models):
    from peft import LoraConfig, get_peft_model

    tokenizer = load_tokenizer(str(tiny_models["llama"]))
    model = load_causal_lm(str(tiny_models["llama"]), tokenizer)
    shape = (32 * 2, model.config.vocab_size)
    assert model_shape(model) == shape
    lora = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    assert model_shape(lora) == shape
    assert model_shape(torch.nn.Linear(2, 2)) == (0, 0)  # no config: the plain default
