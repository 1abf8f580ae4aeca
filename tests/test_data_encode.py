"""Token ids and loss masks for every template, truncation, and batch order / padding.

Expected ids are built by hand: the tokenizer applied to each expected piece on its own (no special tokens), plus BOS
at the start and EOS after each assistant reply.
"""

from __future__ import annotations

import pytest
import torch

from rlhfkit.data.batching import _permutation, chunks, pad_right, shared_prompt_len, step_indices
from rlhfkit.data.encode import (EncodeStats, bos_ids, encode_conversation, encode_pair, encode_prompt,
                                 truncate)
from rlhfkit.data.formats import Conversation, Message, PreferencePair, PromptExample, normalise_sft
from rlhfkit.data.readers import Source
from rlhfkit.data.templates import Segment, render, resolve_template

U, A, S = "user", "assistant", "system"
TWO_TURNS = [Message(U, "hi"), Message(A, "hello"), Message(U, "how are you"), Message(A, "fine")]
ALPACA_SYSTEM = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                 "request.")


def pieces(tokenizer, *parts):
    """Expected (ids, mask): each part is (text or an int token id, trained)."""
    ids, mask = [], []
    for part, trained in parts:
        new = [part] if isinstance(part, int) else tokenizer(part, add_special_tokens=False)["input_ids"]
        assert new, part
        ids += new
        mask += [trained] * len(new)
    return ids, mask


def conv(messages, raw=False, fmt="chat"):
    return Conversation(list(messages), raw, Source("t.jsonl", 1), fmt)


def encode(c, tokenizer, template, max_len=10_000, **kw):
    stats = EncodeStats()
    return encode_conversation(c, tokenizer, template, max_len, stats, **kw), stats


def test_tokenizer_specials(tokenizer):
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<s>", "</s>", "<|pad|>")
    assert len({bos, eos, pad}) == 3
    assert bos_ids(tokenizer) == [bos]


def test_human_assistant_two_turns_token_by_token(tokenizer):
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    enc, stats = encode(conv(TWO_TURNS), tokenizer, "human-assistant")
    ids, mask = pieces(tokenizer, (bos, False), ("\n\nHuman: hi", False), ("\n\nAssistant:", False),
                       (" hello", True), (eos, True), ("\n\nHuman: how are you", False), ("\n\nAssistant:", False),
                       (" fine", True), (eos, True))
    assert enc.input_ids == ids
    assert enc.loss_mask == mask
    # the last response starts right after the second assistant header
    start = len(pieces(tokenizer, (bos, False), ("\n\nHuman: hi", False), ("\n\nAssistant:", False), (" hello", True),
                       (eos, True), ("\n\nHuman: how are you", False), ("\n\nAssistant:", False))[0])
    assert enc.response_start == start
    assert tokenizer.decode([i for i, m in zip(enc.input_ids, enc.loss_mask) if m]) == " hello</s> fine</s>"
    assert enc.input_ids.count(eos) == 2 and tokenizer.pad_token_id not in enc.input_ids
    assert [i for i, m in enumerate(enc.loss_mask) if m and enc.input_ids[i] == eos] == \
        [i for i, t in enumerate(enc.input_ids) if t == eos]  # every EOS is trained
    assert (stats.rows, stats.truncated, stats.dropped) == (1, 0, 0)


def test_eos_follows_a_reply_that_contains_the_eos_text(tokenizer):
    # "</s>" is also HTML's strikethrough end tag; the tokenizer reads it as EOS, and the reply must still end with one
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    enc, _ = encode(conv([Message(U, "hi"), Message(A, "<s>old</s> new")]), tokenizer, "human-assistant")
    assert (enc.input_ids, enc.loss_mask) == pieces(tokenizer, (bos, False), ("\n\nHuman: hi", False),
                                                    ("\n\nAssistant:", False), (" <s>old</s> new", True), (eos, True))


def test_loss_on_all_trains_every_token_but_bos(tokenizer):
    enc, _ = encode(conv(TWO_TURNS), tokenizer, "human-assistant", train_all=True)
    plain, _ = encode(conv(TWO_TURNS), tokenizer, "human-assistant")
    assert enc.input_ids == plain.input_ids
    assert enc.loss_mask == [False] + [True] * (len(enc.input_ids) - 1)
    assert enc.response_start == plain.response_start


def test_system_message_with_human_assistant(tokenizer):
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    enc, _ = encode(conv([Message(S, "Be brief.")] + TWO_TURNS[:2]), tokenizer, "human-assistant")
    assert (enc.input_ids, enc.loss_mask) == pieces(tokenizer, (bos, False), ("Be brief.", False),
                                                    ("\n\nHuman: hi", False), ("\n\nAssistant:", False),
                                                    (" hello", True), (eos, True))


def test_alpaca_template(tokenizer):
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    enc, _ = encode(conv(TWO_TURNS), tokenizer, "alpaca")
    assert (enc.input_ids, enc.loss_mask) == pieces(
        tokenizer, (bos, False), (ALPACA_SYSTEM + "\n\n", False), ("### Instruction:\nhi\n\n", False),
        ("### Response:\n", False), ("hello", True), (eos, True), ("\n\n", False),
        ("### Instruction:\nhow are you\n\n", False), ("### Response:\n", False), ("fine", True), (eos, True))
    # an explicit system message replaces the default one
    enc, _ = encode(conv([Message(S, "You name colors.")] + TWO_TURNS[:2]), tokenizer, "alpaca")
    assert (enc.input_ids, enc.loss_mask) == pieces(
        tokenizer, (bos, False), ("You name colors.\n\n", False), ("### Instruction:\nhi\n\n", False),
        ("### Response:\n", False), ("hello", True), (eos, True))


def test_chatml_template(tokenizer):
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    enc, _ = encode(conv([Message(S, "Be brief.")] + TWO_TURNS), tokenizer, "chatml")
    assert (enc.input_ids, enc.loss_mask) == pieces(
        tokenizer, (bos, False), ("<|im_start|>system\nBe brief.<|im_end|>\n", False),
        ("<|im_start|>user\nhi<|im_end|>\n", False), ("<|im_start|>assistant\n", False), ("hello<|im_end|>", True),
        (eos, True), ("\n", False), ("<|im_start|>user\nhow are you<|im_end|>\n", False),
        ("<|im_start|>assistant\n", False), ("fine<|im_end|>", True), (eos, True))


@pytest.fixture
def templated_tokenizer(tokenizer_dir):
    """A fresh copy of the tokenizer with a small chat template that writes EOS itself after assistant turns."""
    from rlhfkit.models import load_tokenizer

    tok = load_tokenizer(str(tokenizer_dir))
    tok.chat_template = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] }}"
                         "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
    return tok


def test_tokenizer_chat_template(templated_tokenizer, tokenizer):
    tok = templated_tokenizer
    bos, eos = tok.bos_token_id, tok.eos_token_id
    assert resolve_template("auto", tok) == "tokenizer" and resolve_template("auto", tokenizer) == "human-assistant"
    assert getattr(tokenizer, "chat_template", None) is None  # the shared session tokenizer is untouched
    with pytest.raises(ValueError, match="the tokenizer has no chat template"):
        resolve_template("tokenizer", tokenizer)
    assert render(TWO_TURNS, "tokenizer", tok, raw=False) == [
        Segment("<|user|>\nhi\n", False), Segment("<|assistant|>\n", False), Segment("hello</s>\n", True, eos=True),
        Segment("<|user|>\nhow are you\n", False), Segment("<|assistant|>\n", False),
        Segment("fine</s>\n", True, eos=True)]
    enc, _ = encode(conv([Message(S, "Be brief.")] + TWO_TURNS), tok, "tokenizer")
    # the template's own EOS is kept and no second one is added
    assert (enc.input_ids, enc.loss_mask) == pieces(
        tok, (bos, False), ("<|system|>\nBe brief.\n", False), ("<|user|>\nhi\n", False),
        ("<|assistant|>\n", False), ("hello", True), (eos, True), ("\n", True), ("<|user|>\nhow are you\n", False),
        ("<|assistant|>\n", False), ("fine", True), (eos, True), ("\n", True))
    prompt = encode_prompt(PromptExample([Message(U, "hi")], False), tok, "tokenizer", 10_000, EncodeStats())
    assert prompt == pieces(tok, (bos, False), ("<|user|>\nhi\n", False), ("<|assistant|>\n", False))[0]


def test_tokenizer_chat_template_without_eos_gets_one(tokenizer_dir):
    from rlhfkit.models import load_tokenizer

    tok = load_tokenizer(str(tokenizer_dir))
    tok.chat_template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}")
    enc, _ = encode(conv(TWO_TURNS[:2]), tok, "tokenizer")
    assert (enc.input_ids, enc.loss_mask) == pieces(tok, (tok.bos_token_id, False), ("user: hi\n", False),
                                                    ("assistant:", False), (" hello\n", True),
                                                    (tok.eos_token_id, True))
    tok.chat_template = "{% for m in messages|reverse %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ValueError, match="does not render conversations incrementally"):
        render(TWO_TURNS, "tokenizer", tok, raw=False)


def test_raw_prompt_completion_ends_with_real_eos(tokenizer):
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    [c] = normalise_sft({"prompt": "Is the review positive?\n", "completion": "Positive<|endoftext|>"},
                        Source("t.jsonl", 1))
    enc, _ = encode(c, tokenizer, "human-assistant")
    assert (enc.input_ids, enc.loss_mask) == pieces(tokenizer, (bos, False), ("Is the review positive?\n", False),
                                                    ("Positive", True), (eos, True))
    marker = tokenizer("<|endoftext|>", add_special_tokens=False)["input_ids"]
    assert len(marker) > 1 and not any(enc.input_ids[i:i + len(marker)] == marker for i in range(len(enc.input_ids)))


def test_text_kind_trains_everything_and_cuts_on_the_right(tokenizer):
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    c = conv([Message(A, "Item 3 is red. Item 4 is blue.")], raw=True, fmt="text")
    full, stats = encode(c, tokenizer, "human-assistant")
    ids, mask = pieces(tokenizer, (bos, False), ("Item 3 is red. Item 4 is blue.", True), (eos, True))
    assert (full.input_ids, full.loss_mask, stats.truncated) == (ids, mask, 0)
    cut, stats = encode(c, tokenizer, "human-assistant", max_len=5)
    assert (cut.input_ids, cut.loss_mask) == (ids[:5], mask[:5])
    assert (stats.rows, stats.truncated, stats.dropped) == (1, 1, 0)


def test_pair_encoding(tokenizer):
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pair = PreferencePair([Message(U, "What color is item 3?")], [Message(A, "Item 3 is red.")], [Message(A, "No.")],
                          raw=False)
    stats = EncodeStats()
    chosen, rejected = encode_pair(pair, tokenizer, "human-assistant", 10_000, stats)
    head = pieces(tokenizer, (bos, False), ("\n\nHuman: What color is item 3?", False), ("\n\nAssistant:", False))
    for enc, text in ((chosen, " Item 3 is red."), (rejected, " No.")):
        assert (enc.input_ids, enc.loss_mask) == pieces(tokenizer, *zip(head[0], head[1]), (text, True), (eos, True))
        assert enc.response_start == len(head[0])
    raw = PreferencePair([Message(U, " Human: hi Assistant:")], [Message(A, " yes")], [Message(A, " no")], raw=True)
    chosen, _ = encode_pair(raw, tokenizer, "human-assistant", 10_000, stats)
    assert (chosen.input_ids, chosen.loss_mask) == pieces(tokenizer, (bos, False), (" Human: hi Assistant:", False),
                                                          (" yes", True), (eos, True))
    assert (stats.rows, stats.truncated, stats.dropped) == (2, 0, 0)


# ------------------------------------------------------------------------------------------------------ truncation
LONG_PROMPT = [Message(U, "What color is item 1? What color is item 2? What color is item 3?"),
               Message(A, "Item 3 is red.")]


def test_prompt_side_truncation_keeps_bos_and_the_response(tokenizer):
    full, _ = encode(conv(LONG_PROMPT), tokenizer, "human-assistant")
    n, start = len(full.input_ids), full.response_start
    cut, stats = encode(conv(LONG_PROMPT), tokenizer, "human-assistant", max_len=n - 3)
    assert cut.input_ids == full.input_ids[:1] + full.input_ids[4:]
    assert cut.loss_mask == full.loss_mask[:1] + full.loss_mask[4:]
    assert cut.input_ids[0] == tokenizer.bos_token_id and cut.response_start == start - 3
    assert cut.input_ids[cut.response_start:] == full.input_ids[start:]
    assert (stats.rows, stats.truncated, stats.dropped) == (1, 1, 0)
    # the tightest fit leaves BOS and one prompt token before the response
    response = n - start
    tight, stats = encode(conv(LONG_PROMPT), tokenizer, "human-assistant", max_len=response + 2)
    assert tight.input_ids == [tokenizer.bos_token_id, full.input_ids[start - 1]] + full.input_ids[start:]
    assert (stats.truncated, stats.dropped) == (1, 0)
    fits, stats = encode(conv(LONG_PROMPT), tokenizer, "human-assistant", max_len=n)
    assert fits.input_ids == full.input_ids and (stats.truncated, stats.dropped) == (0, 0)


def test_response_that_does_not_fit_is_dropped(tokenizer):
    full, _ = encode(conv(LONG_PROMPT), tokenizer, "human-assistant")
    response = len(full.input_ids) - full.response_start
    dropped, stats = encode(conv(LONG_PROMPT), tokenizer, "human-assistant", max_len=response + 1)
    assert dropped is None and (stats.rows, stats.truncated, stats.dropped) == (1, 0, 1)
    assert truncate(full, response + 1, keep_start=1) == (None, False)


def test_pair_truncation_and_dropping(tokenizer):
    pair = PreferencePair([Message(U, "What color is item 1? What color is item 2?")],
                          [Message(A, "Item 2 is green. Item 1 is blue.")], [Message(A, "No.")], raw=False)
    full_chosen, full_rejected = encode_pair(pair, tokenizer, "human-assistant", 10_000, EncodeStats())
    stats = EncodeStats()
    max_len = len(full_chosen.input_ids) - 2
    chosen, rejected = encode_pair(pair, tokenizer, "human-assistant", max_len, stats)
    assert chosen.input_ids == full_chosen.input_ids[:1] + full_chosen.input_ids[3:]
    # The rejected sequence fits, but loses the same prompt tokens: both answers keep the same context.
    assert rejected.input_ids == full_rejected.input_ids[:1] + full_rejected.input_ids[3:]
    assert shared_prompt_len(chosen, rejected) == full_chosen.response_start - 2
    assert (stats.rows, stats.truncated, stats.dropped) == (1, 1, 0)
    chosen_response = len(full_chosen.input_ids) - full_chosen.response_start
    assert encode_pair(pair, tokenizer, "human-assistant", chosen_response + 1, stats) is None
    assert (stats.rows, stats.truncated, stats.dropped) == (2, 1, 1)


def test_encode_prompt_cuts_from_the_left(tokenizer):
    bos = tokenizer.bos_token_id
    example = PromptExample([Message(U, "What color is item 1? What color is item 2?")], False)
    stats = EncodeStats()
    full = encode_prompt(example, tokenizer, "human-assistant", 10_000, stats)
    assert full == pieces(tokenizer, (bos, False), ("\n\nHuman: What color is item 1? What color is item 2?", False),
                          ("\n\nAssistant:", False))[0]
    cut = encode_prompt(example, tokenizer, "human-assistant", 6, stats)
    assert cut == [bos] + full[-5:]
    assert (stats.rows, stats.truncated) == (2, 1)
    raw = encode_prompt(PromptExample([Message(U, " Human: hi Assistant:")], True), tokenizer, "human-assistant", 100,
                        stats)
    assert raw == pieces(tokenizer, (bos, False), (" Human: hi Assistant:", False))[0]


# -------------------------------------------------------------------------------------------------------- batching
def test_step_indices_are_seeded_permutations_across_epochs():
    n, batch = 10, 4
    stream = [i for step in range(5) for i in step_indices(n, batch, seed=3, step=step)]
    assert len(stream) == 20
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    assert stream[:10] != stream[10:]  # a fresh permutation each epoch
    assert stream[:10] != list(range(10))
    # step 2 crosses the epoch boundary: the end of epoch 0, then the start of epoch 1
    assert step_indices(n, batch, 3, 2) == list(_permutation(n, 3, 0)[8:]) + list(_permutation(n, 3, 1)[:2])
    assert step_indices(n, batch, 3, 2) == stream[8:12]
    # a function of (seed, step) alone: the same whatever was asked before, and after the cache is cleared
    _permutation.cache_clear()
    assert [step_indices(n, batch, 3, s) for s in (4, 0, 2)] == [stream[16:20], stream[0:4], stream[8:12]]
    assert [i for s in range(5) for i in step_indices(n, batch, 4, s)] != stream
    epoch2 = [i for s in range(5, 7) for i in step_indices(n, batch, 3, s)] + step_indices(n, batch, 3, 7)[:2]
    assert sorted(epoch2) == list(range(10)) and epoch2 == list(_permutation(n, 3, 2))


def test_step_indices_later_epochs_and_batch_larger_than_data():
    seen = [step_indices(3, 3, seed=0, step=s) for s in range(6)]
    assert all(sorted(s) == [0, 1, 2] for s in seen)
    big = step_indices(3, 7, seed=0, step=0)
    assert sorted(big[:3]) == sorted(big[3:6]) == [0, 1, 2] and len(big) == 7
    assert big[:6] == seen[0] + seen[1]


def test_pad_right_shapes_and_masks():
    batch = pad_right([[5, 6, 7], [8], [9, 10]], pad_id=99, masks=[[False, True, True], [True], [False, True]])
    assert torch.equal(batch["input_ids"], torch.tensor([[5, 6, 7], [8, 99, 99], [9, 10, 99]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0]]))
    assert torch.equal(batch["loss_mask"], torch.tensor([[False, True, True], [True, False, False],
                                                         [False, True, False]]))
    assert (batch["input_ids"].dtype, batch["attention_mask"].dtype, batch["loss_mask"].dtype) == (
        torch.long, torch.long, torch.bool)
    plain = pad_right([[1], [2, 3]], pad_id=0)
    assert set(plain) == {"input_ids", "attention_mask"} and plain["input_ids"].shape == (2, 2)
    assert chunks([1, 2, 3, 4, 5], 2) == [[1, 2], [3, 4], [5]]
