"""Reward-model pairwise losses and the SFT token loss against numbers computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from rlhfkit.rm.losses import log_exp_loss, log_sigmoid_loss, pairwise_loss
from rlhfkit.training.lm_loss import collate, sft_loss

ATOL = 1e-6

# Several pairs: (chosen score r_c, rejected score r_r, margin m).
PAIRS = [(1.5, 0.5, 0.2), (0.0, 1.0, 0.0), (-2.0, -2.5, 1.0), (3.0, 3.0, -0.5), (0.25, -4.0, 2.0)]


def by_hand_log_sig(c: float, r: float, m: float) -> float:
    """-log sigmoid(r_c - r_r - m), with sigmoid(x) = 1 / (1 + exp(-x)) written out."""
    return -math.log(1.0 / (1.0 + math.exp(-(c - r - m))))


def by_hand_log_exp(c: float, r: float, m: float) -> float:
    """log(1 + exp(r_r - r_c + m))."""
    return math.log(1.0 + math.exp(r - c + m))


def tensors(pairs=PAIRS):
    chosen = torch.tensor([p[0] for p in pairs])
    rejected = torch.tensor([p[1] for p in pairs])
    margin = torch.tensor([p[2] for p in pairs])
    return chosen, rejected, margin


def test_known_values_written_out():
    # The first pair worked through: 1.5 - 0.5 - 0.2 = 0.8; -log(1/(1+exp(-0.8))) = log(1 + exp(-0.8)) = 0.371101...
    assert by_hand_log_sig(1.5, 0.5, 0.2) == pytest.approx(0.37110066594777763, abs=1e-12)
    # A tie with no margin costs log 2.
    assert by_hand_log_exp(3.0, 3.0, 0.0) == pytest.approx(math.log(2.0), abs=1e-12)


@pytest.mark.parametrize("name, loss_fn, by_hand", [("log_sig", log_sigmoid_loss, by_hand_log_sig),
                                                     ("log_exp", log_exp_loss, by_hand_log_exp)])
def test_losses_match_hand_computed_values_with_margin(name, loss_fn, by_hand):
    chosen, rejected, margin = tensors()
    expected = torch.tensor([by_hand(*p) for p in PAIRS])
    got = loss_fn(chosen, rejected, margin)
    assert got.shape == (len(PAIRS),)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(pairwise_loss(name, chosen, rejected, margin), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["log_sig", "log_exp"])
def test_scalar_margin_and_default_margin(name):
    chosen, rejected, _ = tensors()
    hand = by_hand_log_sig if name == "log_sig" else by_hand_log_exp
    expected = torch.tensor([hand(c, r, 0.7) for c, r, _ in PAIRS])
    torch.testing.assert_close(pairwise_loss(name, chosen, rejected, 0.7), expected, atol=ATOL, rtol=0)
    no_margin = torch.tensor([hand(c, r, 0.0) for c, r, _ in PAIRS])
    torch.testing.assert_close(pairwise_loss(name, chosen, rejected), no_margin, atol=ATOL, rtol=0)


def test_margin_raises_the_loss_of_a_pair():
    chosen, rejected = torch.tensor([1.0]), torch.tensor([0.0])
    assert log_sigmoid_loss(chosen, rejected, 0.5).item() > log_sigmoid_loss(chosen, rejected, 0.0).item()
    # log(1 + exp(0 - 1 + 0.5)) = log(1 + exp(-0.5))
    assert log_exp_loss(chosen, rejected, 0.5).item() == pytest.approx(math.log(1 + math.exp(-0.5)), abs=ATOL)


def test_both_losses_agree():
    chosen, rejected, margin = tensors()
    torch.testing.assert_close(log_sigmoid_loss(chosen, rejected, margin), log_exp_loss(chosen, rejected, margin),
                               atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["log_sig", "log_exp"])
def test_large_differences_stay_finite(name):
    chosen = torch.tensor([1000.0, -1000.0, 80.0, -80.0], requires_grad=True)
    rejected = torch.tensor([-1000.0, 1000.0, -80.0, 80.0])
    loss = pairwise_loss(name, chosen, rejected)
    assert torch.isfinite(loss).all()
    # r_c - r_r = +2000: loss log(1 + exp(-2000)) = 0; -2000: loss = 2000 (exp(2000) overflows if computed naively).
    torch.testing.assert_close(loss.detach(), torch.tensor([0.0, 2000.0, 0.0, 160.0]), atol=ATOL, rtol=1e-7)
    loss.sum().backward()
    assert torch.isfinite(chosen.grad).all()
    # d/dr_c of -log sigmoid(d) = -(1 - sigmoid(d)): 0 when d = +2000, -1 when d = -2000.
    torch.testing.assert_close(chosen.grad, torch.tensor([0.0, -1.0, 0.0, -1.0]), atol=ATOL, rtol=0)


def test_unknown_loss_name():
    with pytest.raises(ValueError, match="log_sig"):
        pairwise_loss("hinge", torch.zeros(1), torch.zeros(1))


# ---------------------------------------------------------------------------------------------------- SFT loss


@pytest.fixture(scope="module")
def llama(tiny_models, tokenizer):
    from rlhfkit.models import load_causal_lm

    model = load_causal_lm(str(tiny_models["llama"]), tokenizer)
    model.eval()
    return model


def sft_batch():
    """Two right-padded sequences; loss only on some tokens (the 'response'), never on pads."""
    from rlhfkit.data.encode import Encoded

    examples = [
        Encoded([1, 40, 41, 42, 43, 44, 45, 46], [False, False, False, False, True, True, True, False], 4),
        Encoded([1, 50, 51, 52, 53], [False, False, True, True, True], 2),
    ]
    return collate(examples, pad_id=7)


def hand_sft_loss(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> float:
    """sum over b, t with loss_mask[b, t] of -log_softmax(logits[b, t - 1])[input_ids[b, t]] (float64)."""
    total = 0.0
    for b in range(input_ids.shape[0]):
        for t in range(1, input_ids.shape[1]):
            if loss_mask[b, t]:
                log_probs = torch.log_softmax(logits[b, t - 1].double(), dim=-1)
                total += -log_probs[input_ids[b, t]].item()
    return total


def test_sft_loss_equals_hand_sum_over_masked_targets(llama):
    batch = sft_batch()
    assert batch["num_items"] == 3 + 3  # the trained tokens: targets of positions 1..T-1
    with torch.no_grad():
        loss, extra = sft_loss(llama, batch)
        logits = llama(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = hand_sft_loss(logits, batch["input_ids"], batch["loss_mask"])
    assert extra == {}
    assert loss.ndim == 0
    assert loss.item() == pytest.approx(expected, rel=1e-6, abs=ATOL)
    # A random tiny model is far from perfect, so each trained token costs about log(vocab).
    assert expected > 6 * 3.0


def test_masked_tokens_do_not_contribute(llama):
    batch = sft_batch()
    with torch.no_grad():
        base, _ = sft_loss(llama, batch)
        # The last token of sequence 0 is masked (and last, so no later position sees it): change it.
        changed = {k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()}
        changed["input_ids"][0, 7] = 99
        same, _ = sft_loss(llama, changed)
        # The pads after sequence 1 are masked and unattended: change them too.
        changed["input_ids"][1, 5:] = 123
        same_again, _ = sft_loss(llama, changed)
        # Control: changing a trained target does change the loss.
        control = {k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()}
        control["input_ids"][0, 6] = 99
        different, _ = sft_loss(llama, control)
    assert same.item() == base.item()
    assert same_again.item() == base.item()
    assert abs(different.item() - base.item()) > 1e-3


def test_unmasking_a_token_adds_exactly_its_term(llama):
    batch = sft_batch()
    with torch.no_grad():
        base, _ = sft_loss(llama, batch)
        logits = llama(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        more = dict(batch, loss_mask=batch["loss_mask"].clone())
        more["loss_mask"][0, 7] = True  # now also train token 7 of sequence 0, predicted from position 6
        extended, _ = sft_loss(llama, more)
    term = -torch.log_softmax(logits[0, 6].double(), dim=-1)[batch["input_ids"][0, 7]].item()
    assert extended.item() - base.item() == pytest.approx(term, rel=1e-5, abs=1e-5)
