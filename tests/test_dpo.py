"""`rlhfkit dpo`: each loss against hand-computed numbers, the shared sequence log-prob against a loop, and training on
tiny models: ln 2 at the first step, learning, accumulation, precomputed reference, resume, LoRA, bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import Crash, color_preference_rows, crash_at_call, encoded, pair_cases, write_jsonl
from safetensors.torch import load_file

import rlhfkit.dpo.train as dpo_train
import rlhfkit.training.loop as loop
from rlhfkit.cli import main
from rlhfkit.config import ConfigError, make_config
from rlhfkit.dpo.losses import PreferenceLoss, preference_loss
from rlhfkit.dpo.train import DPOConfig, run_dpo
from rlhfkit.logprobs import sequence_logprobs
from rlhfkit.models import load_causal_lm

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers` to `True`:UserWarning")]

LN2 = math.log(2)


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def log_sigmoid(z: float) -> float:
    return -math.log(1 + math.exp(-z))


# ----------------------------------------------------------------------------------------------- losses by hand
# Two pairs. Pair 0: policy chosen -10, rejected -14, reference -11 and -12, lengths 4 and 8 tokens.
PAIRS = dict(chosen_logps=t([-10.0, -3.0]), rejected_logps=t([-14.0, -2.5]), ref_chosen_logps=t([-11.0, -3.0]),
             ref_rejected_logps=t([-12.0, -3.5]), chosen_tokens=t([4.0, 2.0]), rejected_tokens=t([8.0, 1.0]))
# delta = (-10 + 11) - (-14 + 12) = 3 for pair 0; (0) - (1) = -1 for pair 1.
DELTA = [3.0, -1.0]


def losses(name: str, **numbers):
    settings = PreferenceLoss(name, **{"beta": 0.1, **numbers})
    return preference_loss(settings, *PAIRS.values())


def test_sigmoid_is_dpo_and_its_rewards_are_beta_times_the_log_ratios():
    loss, chosen, rejected = losses("sigmoid", beta=0.5)
    torch.testing.assert_close(loss, t([-log_sigmoid(0.5 * 3.0), -log_sigmoid(0.5 * -1.0)]), rtol=0, atol=1e-12)
    torch.testing.assert_close(chosen, t([0.5 * 1.0, 0.0]), rtol=0, atol=1e-12)
    torch.testing.assert_close(rejected, t([0.5 * -2.0, 0.5 * 1.0]), rtol=0, atol=1e-12)
    assert loss[0].item() == pytest.approx(0.2014132779827524, abs=1e-12)  # -log sigmoid(1.5)


def test_label_smoothing_is_cdpo():
    loss, _, _ = losses("sigmoid", beta=0.5, label_smoothing=0.2)
    expected = [-0.8 * log_sigmoid(0.5 * d) - 0.2 * log_sigmoid(-0.5 * d) for d in DELTA]
    torch.testing.assert_close(loss, t(expected), rtol=0, atol=1e-12)


def test_robust_dpo_is_the_unbiased_loss_under_label_noise():
    loss, _, _ = losses("robust", beta=0.5, label_smoothing=0.2)
    expected = [(0.8 * -log_sigmoid(0.5 * d) - 0.2 * -log_sigmoid(-0.5 * d)) / 0.6 for d in DELTA]
    torch.testing.assert_close(loss, t(expected), rtol=0, atol=1e-12)
    assert losses("robust", beta=0.5)[0].tolist() == losses("sigmoid", beta=0.5)[0].tolist()


def test_ipo_squares_the_length_averaged_log_ratio_gap():
    loss, _, _ = losses("ipo", beta=0.25)
    # pair 0: chosen log-ratio 1 over 4 tokens, rejected -2 over 8: h = 0.25 + 0.25 = 0.5; 1 / (2 beta) = 2
    # pair 1: 0 / 2 - 1 / 1 = -1
    torch.testing.assert_close(loss, t([(0.5 - 2.0) ** 2, (-1.0 - 2.0) ** 2]), rtol=0, atol=1e-12)


def test_simpo_is_reference_free_and_length_normalised():
    settings = PreferenceLoss("simpo", beta=2.0, simpo_gamma=0.5)
    assert not settings.uses_reference
    p = PAIRS
    loss, chosen, rejected = preference_loss(settings, p["chosen_logps"], p["rejected_logps"], None, None,
                                             p["chosen_tokens"], p["rejected_tokens"])
    # pair 0: averages -10/4 = -2.5 and -14/8 = -1.75: z = 2 * (-0.75) - 0.5 = -2; pair 1: -1.5 and -2.5: z = 1.5
    torch.testing.assert_close(loss, t([-log_sigmoid(-2.0), -log_sigmoid(1.5)]), rtol=0, atol=1e-12)
    torch.testing.assert_close(chosen, t([-5.0, -3.0]), rtol=0, atol=1e-12)
    torch.testing.assert_close(rejected, t([-3.5, -5.0]), rtol=0, atol=1e-12)


def test_rpo_adds_the_chosen_per_token_nll():
    base, _, _ = losses("sigmoid")
    with_nll, _, _ = losses("sigmoid", rpo_alpha=0.5)
    torch.testing.assert_close(with_nll - base, t([0.5 * 10 / 4, 0.5 * 3 / 2]), rtol=0, atol=1e-12)


def test_every_loss_starts_where_the_papers_say_when_the_policy_is_the_reference():
    same = dict(PAIRS, ref_chosen_logps=PAIRS["chosen_logps"], ref_rejected_logps=PAIRS["rejected_logps"])
    for name, numbers, expected in (("sigmoid", {}, LN2), ("sigmoid", {"label_smoothing": 0.3}, LN2),
                                    ("robust", {"label_smoothing": 0.3}, LN2), ("ipo", {"beta": 0.1}, 25.0)):
        loss, chosen, rejected = preference_loss(PreferenceLoss(name, **{"beta": 0.1, **numbers}), *same.values())
        torch.testing.assert_close(loss, t([expected, expected]), rtol=0, atol=1e-12)
        assert chosen.tolist() == rejected.tolist() == [0.0, 0.0]


# ------------------------------------------------------------------------------------- the shared log-prob
def test_sequence_logprobs_equal_a_loop_over_the_loss_tokens(tiny_models, tokenizer):
    model = load_causal_lm(str(tiny_models["gpt2"]), tokenizer).eval()
    ids = torch.tensor([[5, 9, 14, 22, 7, 3], [8, 2, 11, 4, 0, 0]])
    attention = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    loss_mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 0, 0]], dtype=torch.bool)
    with torch.no_grad():
        sums, counts = sequence_logprobs(model, ids, attention, loss_mask)
        logits = model(input_ids=ids, attention_mask=attention).logits.double()
    expected = [sum(torch.log_softmax(logits[b, j - 1], -1)[ids[b, j]].item() for j in range(6) if loss_mask[b, j])
                for b in range(2)]
    torch.testing.assert_close(sums.double(), t(expected), rtol=0, atol=1e-5)
    assert counts.tolist() == [3.0, 3.0]


def test_pair_row_layout():
    """A pair's prompt is what its sequences share before either carries loss; its row holds that prompt, the rest of
    the chosen sequence, then the rest of the rejected one, whose tokens see the prompt and each other only, at the
    positions they have in their own sequence."""
    from rlhfkit.data.batching import collate_pair_rows, shared_prompt_len

    a, b = encoded([5, 6, 7], [8, 9]), encoded([5, 6, 7], [10])
    assert shared_prompt_len(a, b) == 3
    assert shared_prompt_len(encoded([5, 6, 7], [8]), encoded([5, 6, 7], [8], loss_from=2)) == 2  # loss stops it
    assert shared_prompt_len(encoded([5, 6], [7, 8]), encoded([5, 9], [7, 8])) == 1
    batch = collate_pair_rows([(a, b, 0.5), (encoded([4], [11, 12, 13]), encoded([4], [14]), 0.0)], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10], [4, 11, 12, 13, 14, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3], [0, 1, 2, 3, 1, 0]]
    assert batch["loss_mask"].int().tolist() == [[0, 0, 0, 1, 1, 1], [0, 1, 1, 1, 1, 0]]
    assert batch["source"].tolist() == [[0, 0, 1, 2, 3, 2], [0, 0, 1, 2, 0, 0]]
    assert batch["segment"].tolist() == [[0, 0, 0, 0, 0, 1], [2, 2, 2, 2, 3, 2]]
    assert batch["ends"].tolist() == [[4, 5], [3, 4]]
    assert batch["attention_mask"].shape == (2, 1, 6, 6)
    assert batch["attention_mask"][1, 0].int().tolist() == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0],
                                                            [1, 1, 1, 1, 0, 0], [1, 0, 0, 0, 1, 0], [1, 0, 0, 0, 0, 1]]
    assert batch["attention_mask"][0, 0, 5].int().tolist() == [1, 1, 1, 0, 0, 1]  # rejected: prompt and itself
    assert (batch["num_items"], batch["num_sequences"], batch["num_tokens"]) == (2, 4, 15)
    assert batch["margin"].tolist() == [0.5, 0.0]
    # Sequences that share no first token: each row holds both whole, and each sequence's first token never counts.
    apart = collate_pair_rows([(encoded([1], [2]), encoded([3], [4]), 0.0)], pad_id=0)
    assert apart["position_ids"].tolist() == [[0, 1, 0, 1]]
    assert apart["loss_mask"].int().tolist() == [[0, 1, 0, 1]]
    assert apart["source"][0, [1, 3]].tolist() == [0, 2]
    assert apart["attention_mask"][0, 0, 3].int().tolist() == [0, 0, 1, 1]


def test_which_models_take_pair_rows(tiny_models, tokenizer):
    """sdpa applies the row's mask as given; eager attention (which adds the mask) and sliding windows do not."""
    from rlhfkit.models import takes_pair_rows

    assert takes_pair_rows(load_causal_lm(str(tiny_models["llama"]), tokenizer))
    assert not takes_pair_rows(load_causal_lm(str(tiny_models["llama"]), tokenizer, attn_implementation="eager"))
    windowed = load_causal_lm(str(tiny_models["llama"]), tokenizer)
    windowed.config.sliding_window = 16
    assert not takes_pair_rows(windowed)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_pair_rows_give_the_log_probs_and_gradients_of_whole_sequences(arch, tiny_models, tokenizer):
    """DPO computes each pair in one row, its prompt once: the same log-prob sums, token counts and parameter
    gradients as the whole sequences, for prompts and responses of several lengths."""
    from rlhfkit.data.batching import collate_pair_rows, collate_pairs

    model = load_causal_lm(str(tiny_models[arch]), tokenizer).eval()
    pairs = pair_cases(tokenizer)
    results = []
    for batch in (collate_pairs(pairs, 0), collate_pair_rows(pairs, 0)):
        model.zero_grad()
        logps = dpo_train.pair_logprobs(model, batch)
        (logps[:, 0] - 0.5 * logps[:, 1]).sum().backward()
        results.append((logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (whole, whole_grads), (rows, rows_grads) = results
    torch.testing.assert_close(rows, whole, rtol=0, atol=1e-5)
    assert rows[:, 2:].tolist() == [[3.0, 5.0], [2.0, 2.0], [6.0, 1.0], [1.0, 4.0], [3.0, 2.0]]
    for name, grad in whole_grads.items():
        torch.testing.assert_close(rows_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


# ------------------------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dpo-data")
    return {"pairs": write_jsonl(root / "pairs.jsonl", color_preference_rows(96)),
            "eval": write_jsonl(root / "eval.jsonl", color_preference_rows(32, seed=1))}


def config(model: Path, data, out: Path, **values) -> DPOConfig:
    base = dict(model=str(model), data=[str(data["pairs"])], eval_data=[str(data["eval"])], output=str(out),
                batch_size=8, lr=1e-3, save_every=0, max_steps=4)
    return make_config(DPOConfig, {**base, **values})


def records(out: Path, split: str) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["split"] == split]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def count_loads(monkeypatch) -> list[str]:
    """The model paths DPO loads causal LMs from (the policy, and a reference when it has one)."""
    paths, real = [], dpo_train.load_causal_lm

    def counting(path, *args, **kwargs):
        paths.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(dpo_train, "load_causal_lm", counting)
    return paths


def test_first_loss_is_exactly_ln2_and_held_out_accuracy_reaches_0_9(tiny_models, data, tmp_path):
    out = tmp_path / "dpo"
    run_dpo(config(tiny_models["llama"], data, out, max_steps=20, eval_every=10))
    train = records(out, "train")
    assert train[0]["loss"] == float(torch.tensor(LN2, dtype=torch.float32))  # policy == reference, bit for bit
    assert train[0]["rewards/margins"] == 0.0 and train[0]["rewards/accuracies"] == 0.0
    assert train[0]["logps/chosen"] < train[0]["logps/rejected"] < 0  # the chosen replies are longer
    held_out = records(out, "eval")
    assert [r["step"] for r in held_out] == [10, 20]
    assert held_out[-1]["rewards/accuracies"] >= 0.9 and held_out[-1]["loss"] < 0.5
    assert held_out[-1]["rewards/margins"] > 0.3
    assert (out / "final" / "tokenizer.json").is_file()


@pytest.mark.parametrize("loss, numbers, first", [("ipo", {"beta": 0.5}, 1.0), ("robust", {"label_smoothing": 0.2}, LN2),
                                                  ("sigmoid", {"label_smoothing": 0.2, "rpo_alpha": 0.0}, LN2)])
def test_each_loss_trains_from_its_value_at_the_reference(loss, numbers, first, tiny_models, data, tmp_path):
    out = tmp_path / loss
    run_dpo(config(tiny_models["llama"], data, out, loss=loss, max_steps=6, **numbers))
    train = records(out, "train")
    assert train[0]["loss"] == pytest.approx(first, rel=1e-6)
    assert train[-1]["loss"] < train[0]["loss"]
    assert records(out, "eval")[-1]["rewards/margins"] > 0


def test_simpo_loads_no_reference_and_learns(tiny_models, data, tmp_path, monkeypatch):
    loads = count_loads(monkeypatch)
    out = tmp_path / "simpo"
    run_dpo(config(tiny_models["llama"], data, out, loss="simpo", beta=2.0, simpo_gamma=0.5, max_steps=10))
    assert len(loads) == 1  # the policy only
    train, held_out = records(out, "train"), records(out, "eval")
    assert train[-1]["loss"] < train[0]["loss"]
    # SimPO's rewards are beta x the length-averaged log-probs: below zero, and the chosen ones moved up.
    assert held_out[-1]["rewards/chosen"] < 0 and held_out[-1]["rewards/accuracies"] >= 0.9


def test_precomputed_reference_matches_the_reference_model(tiny_models, data, tmp_path):
    live, pre = tmp_path / "live", tmp_path / "pre"
    run_dpo(config(tiny_models["llama"], data, live, micro_batch_size=4))
    run_dpo(config(tiny_models["llama"], data, pre, micro_batch_size=4, precompute_ref=True))
    for split in ("train", "eval"):
        for a, b in zip(records(live, split), records(pre, split)):
            for key in ("loss", "rewards/chosen", "rewards/margins", "logps/chosen"):
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (split, key)
    for name, tensor in weights(live / "final").items():
        torch.testing.assert_close(weights(pre / "final")[name], tensor, rtol=0, atol=1e-6)


@pytest.mark.cpu
def test_accumulation_matches_one_big_batch(tiny_models, data, tmp_path):
    outs = [tmp_path / f"micro{m}" for m in (2, 8)]
    for out, micro in zip(outs, (2, 8)):
        run_dpo(config(tiny_models["llama"], data, out, micro_batch_size=micro, lr=1e-5, lr_schedule="constant",
                       max_steps=3, eval_data=[]))
    for a, b in zip(records(outs[0], "train"), records(outs[1], "train")):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
        # a margin is beta times a difference of log-prob sums of about -50: float32 leaves it ~1e-7 (each
        # micro-batch pads its prompts on the left to its own width)
        assert a["rewards/margins"] == pytest.approx(b["rewards/margins"], rel=1e-5, abs=1e-7)
    accumulated, whole = weights(outs[0] / "final"), weights(outs[1] / "final")
    for name in whole:
        torch.testing.assert_close(accumulated[name], whole[name], rtol=0, atol=1e-6)


@pytest.mark.cpu
def test_resume_with_precomputed_reference_is_bitwise_and_does_not_recompute_it(tiny_models, data, tmp_path,
                                                                                 monkeypatch):
    def make(out, **extra):
        return config(tiny_models["llama"], data, out, max_steps=6, save_every=2, keep_last=5, eval_every=3,
                      precompute_ref=True, **extra)

    full = run_dpo(make(tmp_path / "full"))
    crash_at_call(monkeypatch, loop, "train_step", 4)
    with pytest.raises(Crash):
        run_dpo(make(tmp_path / "cut"))
    monkeypatch.undo()
    loads = count_loads(monkeypatch)
    resumed = run_dpo(make(tmp_path / "cut", resume="latest"))
    assert loads == [str(tiny_models["llama"])]  # the policy; the reference's log-probs came from the checkpoint
    a, b = weights(full), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in records(tmp_path / "cut", "train")] == [r["loss"] for r in records(tmp_path / "full",
                                                                                                  "train")]
    assert [r["loss"] for r in records(tmp_path / "cut", "eval")] == [r["loss"] for r in records(tmp_path / "full",
                                                                                                 "eval")]


def test_lora_reference_is_the_adapter_disabled_policy(tiny_models, data, tmp_path, monkeypatch):
    loads = count_loads(monkeypatch)
    out = tmp_path / "lora"
    final = run_dpo(config(tiny_models["llama"], data, out, lora_r=8, lr=1e-2, max_steps=8))
    assert loads == [str(tiny_models["llama"])]  # no second copy of the weights
    train = records(out, "train")
    assert train[0]["loss"] == float(torch.tensor(LN2, dtype=torch.float32))
    assert records(out, "eval")[-1]["rewards/margins"] > 0  # the adapter learned; the reference stayed put
    base = weights(tiny_models["llama"])
    merged = weights(final)
    assert not torch.equal(merged["model.layers.0.self_attn.q_proj.weight"],
                           base["model.layers.0.self_attn.q_proj.weight"])


def test_gradient_checkpointing_changes_nothing_but_memory(tiny_models, data, tmp_path):
    runs = [tmp_path / "plain", tmp_path / "checkpointed"]
    for out, on in zip(runs, (False, True)):
        run_dpo(config(tiny_models["llama"], data, out, max_steps=3, gradient_checkpointing=on, eval_data=[]))
    for a, b in zip(records(runs[0], "train"), records(runs[1], "train")):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6) and a["grad_norm"] == pytest.approx(b["grad_norm"],
                                                                                                   rel=1e-5)


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("values, message", [
    ({"loss": "simpo", "ref": "x"}, "ref: --loss simpo is reference-free"),
    ({"loss": "ipo", "label_smoothing": 0.1}, "label_smoothing: IPO has no label smoothing"),
    ({"beta": 0.0}, "beta: must be > 0"),
    ({"label_smoothing": 0.5}, "label_smoothing: must be in [0, 0.5)"),
    ({"lora_r": 4, "lora_dropout": 0.1}, "lora_dropout: DPO turns dropout off"),
    ({"ref": "/nonexistent/model"}, "ref:"),
])
def test_bad_options_are_one_line_before_anything_loads(values, message, tiny_models, data, tmp_path):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(")", r"\)")):
        config(tiny_models["llama"], data, tmp_path / "x", **values)


def test_a_bad_row_names_its_file_and_line(tiny_models, tmp_path, capsys):
    rows = color_preference_rows(8)
    rows[5] = {"prompt": "hi", "chosen": "a"}  # no rejected
    bad = write_jsonl(tmp_path / "bad.jsonl", rows)
    code = main(["dpo", "--model", str(tiny_models["llama"]), "--data", str(bad), "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and f"{bad}:6" in err and "Traceback" not in err
