"""PPO experience: padding-invariant forward passes, dropout off, generation and stop handling, the LoRA reference and
the reward model behind a disabled adapter, re-tokenizing for another reward model, reward functions and the shaping
of scores. Every number is compared with the same model run on the sequence alone, or with arithmetic done here."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import corpus, with_eos_bias
from transformers import AutoTokenizer

from rlhfkit.config import ConfigError
from rlhfkit.data.formats import Message, PromptExample
from rlhfkit.models import add_lora, disable_dropout, load_causal_lm, load_sequence_classifier, load_tokenizer
from rlhfkit.rl.rollout import (Rollout, Sampling, concat_rollouts, generate, last_token_scores,
                                left_pad, micro_batches, pad_responses, position_ids, response_logprobs,
                                stop_string_ends, token_values)
from rlhfkit.rl.scoring import (FunctionScorer, RewardModelScorer, RunningMoments, call_reward_fn, load_reward_fn,
                                same_vocabulary, shape_scores)
from rlhfkit.tiny import make_tiny_model, train_tokenizer
from rlhfkit.training.guards import TrainingError

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    # peft warns that GPT-2's Conv1D layers need fan_in_fan_out (and sets it itself).
    pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False:UserWarning"),
]

ARCHS = ("llama", "gpt2", "opt")
TEMPERATURE = 0.7




# ------------------------------------------------------------------------------------------------------- helpers
PROMPT_TEXTS = ["\n\nHuman: What color is item 3?\n\nAssistant:", "Hi", "Item 7 is"]
RESPONSE_TEXTS = [" Item 3 is red.", " blue green yellow purple", " x"]


def padded_batch(tok):
    """Three prompts of lengths 15, 3, 5 left-padded, then responses of lengths 6 (ending with EOS), 4, 2
    right-padded: (prompts, responses, input_ids, attention_mask, P)."""
    prompts = [tok(t)["input_ids"] for t in PROMPT_TEXTS]
    responses = [tok(t, add_special_tokens=False)["input_ids"] for t in RESPONSE_TEXTS]
    responses[0] = responses[0] + [tok.eos_token_id]
    assert len({len(p) for p in prompts}) == 3 and len({len(r) for r in responses}) == 3
    prompt_ids, prompt_mask = left_pad(prompts, tok.pad_token_id)
    longest = max(len(r) for r in responses)
    response_ids = torch.full((3, longest), tok.pad_token_id, dtype=torch.long)
    response_mask = torch.zeros((3, longest), dtype=torch.long)
    for i, r in enumerate(responses):
        response_ids[i, :len(r)] = torch.tensor(r)
        response_mask[i, :len(r)] = 1
    return (prompts, responses, torch.cat([prompt_ids, response_ids], 1), torch.cat([prompt_mask, response_mask], 1),
            prompt_ids.shape[1])


def solo(prompt: list[int], response: list[int]) -> torch.Tensor:
    return torch.tensor([prompt + response])


def randomize_(params) -> None:
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn_like(p) * 0.5)


# ----------------------------------------------------------------------------------------------- padding and positions
def test_left_pad_and_position_ids_exact():
    ids, mask = left_pad([[5, 6, 7], [8], [9, 10]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 9, 10]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    assert ids.dtype == mask.dtype == torch.long
    attention = torch.tensor([[0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1], [0, 1, 1, 0, 0, 0]])
    # Attended tokens count 0, 1, 2, ...; padding never shifts them.
    assert position_ids(attention).tolist() == [[0, 0, 0, 1, 2, 2], [0, 1, 2, 3, 4, 5], [0, 0, 1, 1, 1, 1]]


def test_concat_rollouts_repads_each_ranks_share_exactly():
    """Two ranks' rollouts (prompts of 2 and 3 tokens, responses of 3 and 1) become the one batch a single process
    lays out: prompts left-padded to 3, responses right-padded to 3, masks and stops carried along."""
    first = Rollout(input_ids=torch.tensor([[5, 6, 11, 12, 1]]), attention_mask=torch.tensor([[1, 1, 1, 1, 1]]),
                    prompt_len=2, response_mask=torch.tensor([[True, True, True]]), stopped=torch.tensor([True]))
    second = Rollout(input_ids=torch.tensor([[0, 7, 8, 13], [9, 9, 9, 14]]),
                     attention_mask=torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]), prompt_len=3,
                     response_mask=torch.tensor([[True], [True]]), stopped=torch.tensor([False, False]))
    whole = concat_rollouts([first, second], pad_id=0)
    assert whole.prompt_len == 3
    assert whole.input_ids.tolist() == [[0, 5, 6, 11, 12, 1], [0, 7, 8, 13, 0, 0], [9, 9, 9, 14, 0, 0]]
    assert whole.attention_mask.tolist() == [[0, 1, 1, 1, 1, 1], [0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0]]
    assert whole.response_mask.tolist() == [[True, True, True], [True, False, False], [True, False, False]]
    assert whole.stopped.tolist() == [True, False, False]
    assert pad_responses(torch.tensor([[0.5], [2.0]]), 3).tolist() == [[0.5, 0.0, 0.0], [2.0, 0.0, 0.0]]


@pytest.mark.parametrize("arch", ARCHS)
def test_response_logprobs_ignore_padding(arch, tokenizer, tiny_models):
    model = load_causal_lm(str(tiny_models[arch]), tokenizer).eval()
    prompts, responses, input_ids, attention_mask, P = padded_batch(tokenizer)
    with torch.no_grad():
        logprobs, entropy = response_logprobs(model, input_ids, attention_mask, P, TEMPERATURE, with_entropy=True)
        assert logprobs.shape == entropy.shape == (3, input_ids.shape[1] - P)
        for i, (prompt, response) in enumerate(zip(prompts, responses)):
            alone = solo(prompt, response)
            ref, ref_entropy = response_logprobs(model, alone, torch.ones_like(alone), len(prompt), TEMPERATURE,
                                                 with_entropy=True)
            torch.testing.assert_close(logprobs[i, :len(response)], ref[0], atol=1e-5, rtol=0)
            torch.testing.assert_close(entropy[i, :len(response)], ref_entropy[0], atol=1e-5, rtol=0)
            # And against Hugging Face's own forward on the unpadded sequence, at the sampling temperature.
            logits = model(input_ids=alone).logits[0, len(prompt) - 1:-1].float() / TEMPERATURE
            by_hand = logits.log_softmax(-1).gather(1, torch.tensor(response).unsqueeze(1)).squeeze(1)
            torch.testing.assert_close(logprobs[i, :len(response)], by_hand, atol=1e-5, rtol=0)
    assert torch.isfinite(logprobs).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_token_values_and_last_token_scores_ignore_padding(arch, tokenizer, tiny_models):
    model = load_sequence_classifier(str(tiny_models[arch]), tokenizer).eval()
    prompts, responses, input_ids, attention_mask, P = padded_batch(tokenizer)
    with torch.no_grad():
        values = token_values(model, input_ids, attention_mask)
        scores = last_token_scores(model, input_ids, attention_mask)
        assert values.shape == input_ids.shape and scores.shape == (3,)
        for i, (prompt, response) in enumerate(zip(prompts, responses)):
            alone = solo(prompt, response)
            ref = token_values(model, alone, torch.ones_like(alone))[0]
            start = P - len(prompt)
            torch.testing.assert_close(values[i, start:P + len(response)], ref, atol=1e-5, rtol=0)
            hf_score = model(input_ids=alone).logits[0, 0]
            torch.testing.assert_close(scores[i], hf_score, atol=1e-5, rtol=0)
            torch.testing.assert_close(ref[-1], hf_score, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------------- dropout
@pytest.mark.parametrize("arch", ["gpt2", "opt"])
def test_disable_dropout_makes_train_mode_equal_eval_mode(arch, tokenizer, tiny_models):
    model = load_causal_lm(str(tiny_models[arch]), tokenizer)
    ids = torch.tensor([tokenizer("Item 3 is red. Human: hi")["input_ids"]])
    with torch.no_grad():
        eval_logits = model.eval()(input_ids=ids).logits
        torch.manual_seed(0)
        assert not torch.allclose(model.train()(input_ids=ids).logits, eval_logits, atol=1e-4)  # dropout is on
        disable_dropout(model)
        for seed in (0, 1):
            torch.manual_seed(seed)
            assert torch.equal(model.train()(input_ids=ids).logits, eval_logits)
    assert model.training


# ------------------------------------------------------------------------------------------- frozen models in bf16
@pytest.mark.cpu
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_frozen_copy_for_bf16_keeps_bf16_linear_weights_and_the_same_results(arch, tokenizer, tiny_models):
    """A reference or reward model placed for bf16 compute stores its linear layers in bf16 (autocast would cast them
    at every call): under autocast its logits and scores are the float32 copy's bit for bit. The embeddings stay,
    and so does gpt2's head, which is its input embedding."""
    from rlhfkit.training.distributed import World, place_frozen

    ids = torch.tensor([tokenizer("Item 3 is red. Human: hi")["input_ids"]])
    loaders = [load_causal_lm] + ([load_sequence_classifier] if arch == "llama" else [])
    for load in loaders:
        model = load(str(tiny_models[arch]), tokenizer).eval().requires_grad_(False)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            expected = model(input_ids=ids).logits
        frozen = place_frozen(model, World(), shard=False, dtype="bfloat16")
        linear = {name: m.weight.dtype for name, m in frozen.named_modules() if isinstance(m, torch.nn.Linear)}
        assert frozen.get_input_embeddings().weight.dtype == torch.float32
        if arch == "llama":
            assert len(linear) > 8 and set(linear.values()) == {torch.bfloat16}
        else:  # gpt2's blocks are Conv1D layers, its only Linear the tied head
            assert linear == {"lm_head": torch.float32}
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(frozen(input_ids=ids).logits, expected)


# --------------------------------------------------------------------------------------------------- stop handling
def test_stop_string_ends_marks_the_completing_token(tokenizer):
    text = "Item 3 is red. Human: hi"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    other = tokenizer("Item 5 is blue. Human: yes. Human: no", add_special_tokens=False)["input_ids"]
    plain = tokenizer("Item 4 is green.", add_special_tokens=False)["input_ids"]
    longest = max(map(len, (ids, other, plain)))
    rows = torch.full((3, longest), tokenizer.pad_token_id, dtype=torch.long)
    for r, seq in enumerate((ids, other, plain)):
        rows[r, :len(seq)] = torch.tensor(seq)
    marks = stop_string_ends(rows, tokenizer, ("Human:",))
    assert marks.dtype == torch.bool and marks.shape == rows.shape
    assert marks.sum(-1).tolist() == [1, 1, 0]  # the first occurrence only; none where there is none
    for r in range(2):
        k = int(marks[r].nonzero())
        seq = rows[r].tolist()
        assert "Human:" in tokenizer.decode(seq[:k + 1]) and "Human:" not in tokenizer.decode(seq[:k])
    # The tokenizer splits "Human:" as "Human" + ":": the mark is on the colon.
    assert tokenizer.decode([ids[int(marks[0].nonzero())]]) == ":"
    # With several stop strings the earliest completion wins.
    both = stop_string_ends(rows, tokenizer, ("Human:", " red"))
    assert tokenizer.decode(ids[:int(both[0].nonzero()) + 1]) == "Item 3 is red"


def test_stop_string_ends_reads_the_prompt_tail(tokenizer):
    """A stop string completed in the response counts even when it began in the prompt; one that lies wholly in the
    prompt does not."""
    enc = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    responses = torch.tensor([enc(": hi")[:2], enc(": hi")[:2]])
    prompts = [enc("Item 3 is red. Human"), enc("Item 3 is red. Human:")]
    marks = stop_string_ends(responses, tokenizer, ("Human:",), prompts)
    assert marks.tolist() == [[True, False], [False, False]]
    assert not stop_string_ends(responses, tokenizer, ("Human:",)).any()  # without the prompt: no stop at all


class ScriptedActor(torch.nn.Module):
    """An actor whose generate returns fixed responses (what Hugging Face would return), recording its arguments."""

    def __init__(self, responses: torch.Tensor):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.responses, self.calls = responses, []

    def generate(self, input_ids, attention_mask, generation_config, logits_processor=(), **kwargs):
        self.calls.append({"input_ids": input_ids, "attention_mask": attention_mask, "config": generation_config,
                           **kwargs})
        vocab = int(self.responses.max()) + 1
        for step in range(self.responses.shape[1]):  # as Hugging Face does: each step's logits to the processors
            for processor in logits_processor:
                processor(torch.cat([input_ids, self.responses[:, :step]], 1), torch.zeros(len(input_ids), vocab))
        return torch.cat([input_ids, self.responses], 1)


def test_generate_cuts_after_eos_and_stop_strings(tokenizer):
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    stop = tokenizer("Item 3 is red. Human: hi", add_special_tokens=False)["input_ids"]  # ':' at index 8
    words = tokenizer(" blue green yellow purple red blue", add_special_tokens=False)["input_ids"]
    R = len(stop)
    raw = torch.tensor([stop,
                        words[:3] + [eos] + (words * 3)[3:R - 1],  # EOS, then tokens a batch-mate kept generating
                        (words * 3)[:R]])  # neither: cut off by max_new_tokens
    prompts = [tokenizer(t)["input_ids"] for t in PROMPT_TEXTS]
    actor = ScriptedActor(raw)
    rollout = generate(actor, prompts, tokenizer, Sampling(max_new_tokens=R, temperature=0.9, top_p=0.8, top_k=5,
                                                           stop_strings=("Human:",)))
    prompt_ids, prompt_mask = left_pad(prompts, pad)
    P = prompt_ids.shape[1]
    assert rollout.prompt_len == P
    assert torch.equal(rollout.input_ids[:, :P], prompt_ids) and torch.equal(rollout.attention_mask[:, :P], prompt_mask)
    lengths = [9, 4, R]  # up to and including the colon; up to and including EOS; everything
    expected_mask = torch.tensor([[j < n for j in range(R)] for n in lengths])
    assert torch.equal(rollout.response_mask, expected_mask)
    assert torch.equal(rollout.responses, raw.masked_fill(~expected_mask, pad))
    assert torch.equal(rollout.attention_mask, torch.cat([prompt_mask, expected_mask.long()], 1))
    assert rollout.stopped.tolist() == [True, True, False]
    # What the actor was asked for: its own config (no model generation_config leaks in), left-padded prompts.
    call = actor.calls[0]
    assert torch.equal(call["input_ids"], prompt_ids) and torch.equal(call["attention_mask"], prompt_mask)
    config = call["config"]
    assert (config.do_sample, config.temperature, config.top_p, config.top_k, config.max_new_tokens) == \
        (True, 0.9, 0.8, 5, R)
    assert (config.eos_token_id, config.pad_token_id, list(config.stop_strings)) == (eos, pad, ["Human:"])
    assert call["tokenizer"] is tokenizer
    assert not actor.training
    # Without stop strings the same text is not cut, and no tokenizer is passed.
    actor = ScriptedActor(raw)
    rollout = generate(actor, prompts, tokenizer, Sampling(max_new_tokens=R))
    assert rollout.response_mask.sum(-1).tolist() == [R, 4, R] and rollout.stopped.tolist() == [False, True, False]
    assert "tokenizer" not in actor.calls[0] and not actor.calls[0]["config"].stop_strings


def eos_biased_llama(tiny_models, tokenizer, bias: float, arch: str = "llama"):
    """The tiny Llama (or `arch`) with an lm_head bias that makes EOS likely at each step (about 1 in 6 for bias 3)."""
    return with_eos_bias(load_causal_lm(str(tiny_models[arch]), tokenizer), tokenizer.eos_token_id, bias)


def check_rollout_layout(rollout: Rollout, prompts, tokenizer, max_new_tokens: int) -> None:
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    prompt_ids, prompt_mask = left_pad(prompts, pad)
    P, R = prompt_ids.shape[1], rollout.response_mask.shape[1]
    assert rollout.prompt_len == P and rollout.input_ids.shape == (len(prompts), P + R) and R <= max_new_tokens
    assert torch.equal(rollout.input_ids[:, :P], prompt_ids)
    assert torch.equal(rollout.attention_mask, torch.cat([prompt_mask, rollout.response_mask.long()], 1))
    mask = rollout.response_mask
    lengths = mask.sum(-1)
    assert torch.equal(mask, torch.arange(R).unsqueeze(0) < lengths.unsqueeze(1))  # ones, then zeros
    assert (rollout.responses[~mask] == pad).all()
    for row, n in zip(rollout.responses.tolist(), lengths.tolist()):
        assert n >= 1 and eos not in row[:n - 1]  # EOS only as a valid response's last token
    if not rollout.stopped.all():
        assert R == max_new_tokens
    assert (lengths[~rollout.stopped] == R).all()  # a response that never stopped ran to max_new_tokens


def test_generate_end_to_end_eos(tokenizer, tiny_models):
    model = eos_biased_llama(tiny_models, tokenizer, bias=3.0)
    prompts = [tokenizer(t)["input_ids"] for t in PROMPT_TEXTS] * 3
    torch.manual_seed(0)
    rollout = generate(model, prompts, tokenizer, Sampling(max_new_tokens=8))
    check_rollout_layout(rollout, prompts, tokenizer, 8)
    has_eos = (rollout.responses == tokenizer.eos_token_id).any(-1)
    assert torch.equal(rollout.stopped, has_eos)
    assert 0 < int(rollout.stopped.sum()) < len(prompts)  # both kinds of row are exercised
    # The last valid token of a stopped row is its EOS.
    last = rollout.responses.gather(1, (rollout.response_mask.sum(-1, keepdim=True) - 1)).squeeze(1)
    assert torch.equal(last == tokenizer.eos_token_id, rollout.stopped)


def test_generate_end_to_end_stop_string(tokenizer, tiny_models):
    model = eos_biased_llama(tiny_models, tokenizer, bias=2.0)
    prompts = [tokenizer(t)["input_ids"] for t in PROMPT_TEXTS] * 3
    torch.manual_seed(0)
    stop = "e"  # in many tokens of this vocabulary, so a random model writes it soon
    rollout = generate(model, prompts, tokenizer, Sampling(max_new_tokens=8, stop_strings=(stop,)))
    check_rollout_layout(rollout, prompts, tokenizer, 8)
    by_string = 0
    for row, n, stopped in zip(rollout.responses.tolist(), rollout.response_mask.sum(-1).tolist(),
                               rollout.stopped.tolist()):
        valid = row[:n]
        assert stop not in tokenizer.decode(valid[:-1])  # cut at the first stop, never later
        ends_with_eos = valid[-1] == tokenizer.eos_token_id
        assert stopped == (ends_with_eos or stop in tokenizer.decode(valid))
        by_string += stopped and not ends_with_eos
    assert by_string > 0


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generate_keeps_the_sampled_tokens_logprobs(arch, tokenizer, tiny_models):
    """The old log-probs kept while sampling are those of a full forward pass over the finished rollout (what PPO
    computed before), at the sampling temperature, over the whole vocabulary even with top-k and top-p; 0 where
    masked. Rows stop at different steps and prompts have different lengths."""
    model = eos_biased_llama(tiny_models, tokenizer, bias=0.5, arch=arch).eval()
    prompts = [tokenizer(t)["input_ids"] for t in PROMPT_TEXTS] * 2
    torch.manual_seed(0)
    rollout = generate(model, prompts, tokenizer, Sampling(max_new_tokens=7, temperature=TEMPERATURE, top_k=20,
                                                           top_p=0.9))
    assert 0 < int(rollout.stopped.sum()) < len(prompts)
    with torch.no_grad():
        full, _ = response_logprobs(model, rollout.input_ids, rollout.attention_mask, rollout.prompt_len, TEMPERATURE)
    mask = rollout.response_mask
    torch.testing.assert_close(rollout.logprobs[mask], full[mask], atol=2e-5, rtol=0)
    assert (rollout.logprobs[~mask] == 0).all() and (rollout.logprobs[mask] < 0).all()
    # One row alone, unpadded, gives the same numbers.
    n = int(mask[0].sum())
    with torch.no_grad():
        logits = model(solo(prompts[0], rollout.responses[0, :n].tolist())).logits[0, -n - 1:-1] / TEMPERATURE
    alone = logits.log_softmax(-1).gather(1, rollout.responses[0, :n].unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(rollout.logprobs[0, :n], alone, atol=2e-5, rtol=0)
    # Greedy decoding keeps none.
    assert generate(model, prompts, tokenizer, Sampling(max_new_tokens=3, temperature=0)).logprobs is None


def test_micro_batches_group_like_lengths_and_drop_their_padding():
    """Rows sorted longest first, `size` at a time; each micro-batch keeps the prompt columns its rows attend and the
    response columns up to its longest response, exactly."""
    # P = 3, R = 3. Row: (prompt length, response length) = 0: (1, 1), 1: (3, 3), 2: (2, 1), 3: (1, 2)
    ids = torch.tensor([[0, 0, 5, 11, 0, 0], [6, 7, 8, 12, 13, 14], [0, 9, 9, 15, 0, 0], [0, 0, 4, 16, 17, 0]])
    attention = (ids != 0).long()
    rollout = Rollout(input_ids=ids, attention_mask=attention, prompt_len=3,
                      response_mask=attention[:, 3:].bool(), stopped=torch.tensor([True, False, True, True]))
    parts = micro_batches(rollout, [0, 1, 2, 3], 2)
    assert [mb.rows for mb in parts] == [[1, 2], [3, 0]]  # lengths 6, 3, 3, 2: ties keep their order
    first, second = parts
    assert (first.prompt_len, first.response_len) == (3, 3) and torch.equal(first.input_ids, ids[[1, 2]])
    assert (second.prompt_len, second.response_len) == (1, 2)
    assert second.input_ids.tolist() == [[4, 16, 17], [5, 11, 0]]
    assert second.attention_mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    values = torch.arange(12.0).view(4, 3)
    assert second.take(values).tolist() == [[9.0, 10.0], [0.0, 1.0]]
    assert [mb.rows for mb in micro_batches(rollout, [2, 0], 8)] == [[2, 0]]  # a subset, as a rank's share


def test_micro_batches_give_the_logprobs_of_the_whole_batch(tokenizer, tiny_models):
    model = load_causal_lm(str(tiny_models["llama"]), tokenizer).eval()
    _, _, input_ids, attention_mask, P = padded_batch(tokenizer)
    rollout = Rollout(input_ids=input_ids, attention_mask=attention_mask, prompt_len=P,
                      response_mask=attention_mask[:, P:].bool(), stopped=torch.tensor([True, False, False]))
    with torch.no_grad():
        whole, _ = response_logprobs(model, input_ids, attention_mask, P, TEMPERATURE)
        pieces = torch.zeros_like(whole)
        for mb in micro_batches(rollout, [0, 1, 2], 2):
            pieces[mb.rows, :mb.response_len] = response_logprobs(model, mb.input_ids, mb.attention_mask,
                                                                  mb.prompt_len, TEMPERATURE)[0]
    mask = rollout.response_mask
    torch.testing.assert_close(pieces[mask], whole[mask], atol=1e-5, rtol=0)


def test_entropy_is_detached_unless_it_is_trained(tokenizer, tiny_models):
    model = load_causal_lm(str(tiny_models["llama"]), tokenizer)
    _, _, input_ids, attention_mask, P = padded_batch(tokenizer)
    logprobs, logged = response_logprobs(model, input_ids, attention_mask, P, 1.0, with_entropy=True)
    _, trained = response_logprobs(model, input_ids, attention_mask, P, 1.0, with_entropy=True, entropy_grad=True)
    assert logprobs.requires_grad and not logged.requires_grad and trained.requires_grad
    torch.testing.assert_close(logged, trained.detach(), atol=0, rtol=0)


def test_generate_stop_string_across_the_prompt_boundary(tokenizer, tiny_models):
    """A stop string begun in the prompt and finished in the response stops the row, as it stops generate."""
    model = eos_biased_llama(tiny_models, tokenizer, bias=0.0)
    colon = tokenizer(":", add_special_tokens=False)["input_ids"]
    assert len(colon) == 1
    with torch.no_grad():
        model.lm_head.bias[colon[0]] = 50.0  # the model always writes ':'
    prompts = [tokenizer("Item 3 is red. Human")["input_ids"], tokenizer("Item 3 is red.")["input_ids"]]
    torch.manual_seed(0)
    rollout = generate(model, prompts, tokenizer, Sampling(max_new_tokens=6, stop_strings=("Human:",)))
    # Row 0 reads "... Human" + ":": generation stopped after one token (Hugging Face padded the rest).
    assert rollout.responses[0, 0].item() == colon[0]
    assert (rollout.responses[0, 1:] == tokenizer.pad_token_id).all()
    assert rollout.response_mask[0].tolist() == [True] + [False] * 5
    assert rollout.stopped.tolist() == [True, False]


# --------------------------------------------------------------------------------------------------- reward shaping
def test_shape_scores_by_hand():
    scores = torch.tensor([1.0, 3.0, -2.0, 10.0])
    stopped = torch.tensor([True, False, True, False])
    mean, std = 0.5, 2.0
    normalised = [(s - mean) / std for s in (1.0, 3.0, -2.0, 10.0)]  # 0.25, 1.25, -1.25, 4.75
    out = shape_scores(scores, stopped, mean=mean, std=std, missing_eos_penalty=0.0, missing_eos_score=None, clip=0)
    torch.testing.assert_close(out, torch.tensor(normalised), atol=1e-7, rtol=0)
    # The penalty only for rows that did not stop.
    out = shape_scores(scores, stopped, mean=mean, std=std, missing_eos_penalty=1.5, missing_eos_score=None, clip=0)
    torch.testing.assert_close(out, torch.tensor([0.25, -0.25, -1.25, 3.25]), atol=1e-7, rtol=0)
    # A fixed score replaces theirs (the penalty does not apply on top).
    out = shape_scores(scores, stopped, mean=mean, std=std, missing_eos_penalty=1.5, missing_eos_score=-3.0, clip=0)
    torch.testing.assert_close(out, torch.tensor([0.25, -3.0, -1.25, -3.0]), atol=1e-7, rtol=0)
    # Clipping to +-clip, after the penalty.
    out = shape_scores(scores, stopped, mean=mean, std=std, missing_eos_penalty=1.5, missing_eos_score=None, clip=1.0)
    torch.testing.assert_close(out, torch.tensor([0.25, -0.25, -1.0, 1.0]), atol=1e-7, rtol=0)
    out = shape_scores(scores, stopped, mean=mean, std=std, missing_eos_penalty=0.0, missing_eos_score=-3.0, clip=2.0)
    torch.testing.assert_close(out, torch.tensor([0.25, -2.0, -1.25, -2.0]), atol=1e-7, rtol=0)
    # Everything stopped: only normalisation.
    out = shape_scores(scores, torch.ones(4, dtype=torch.bool), mean=mean, std=std, missing_eos_penalty=5.0,
                       missing_eos_score=-9.0, clip=0)
    torch.testing.assert_close(out, torch.tensor(normalised), atol=1e-7, rtol=0)


def test_running_moments_match_the_concatenation():
    torch.manual_seed(0)
    a = torch.randn(7, dtype=torch.float64) * 3 + 2
    b = torch.randn(13, dtype=torch.float64) * 0.5 - 1
    c = torch.tensor([4.25], dtype=torch.float64)
    moments = RunningMoments()
    assert moments.std == 1.0  # nothing seen yet
    moments.update(a)
    assert moments.mean == pytest.approx(a.mean().item(), abs=1e-12)
    assert moments.std == pytest.approx(a.std().item(), abs=1e-12)
    moments.update(b)
    both = torch.cat([a, b])
    assert moments.count == 20
    assert moments.mean == pytest.approx(both.mean().item(), abs=1e-10)
    assert moments.std == pytest.approx(both.std(unbiased=True).item(), abs=1e-10)
    moments.update(c)
    everything = torch.cat([a, b, c])
    assert moments.mean == pytest.approx(everything.mean().item(), abs=1e-10)
    assert moments.std == pytest.approx(everything.std().item(), abs=1e-10)
    # A single value: std 1 until there are two.
    one = RunningMoments()
    one.update(torch.tensor([3.0], dtype=torch.float64))
    assert (one.mean, one.std) == (3.0, 1.0)


# ------------------------------------------------------------------------------------ LoRA reference and reward model
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lora_actor_with_adapter_disabled_is_the_reference(arch, tokenizer, tiny_models):
    original = load_causal_lm(str(tiny_models[arch]), tokenizer).eval()
    actor = add_lora(load_causal_lm(str(tiny_models[arch]), tokenizer), r=4, alpha=16, dropout=0.0,
                     target_modules=["all-linear"], task="CAUSAL_LM").eval()
    lora_b = [p for n, p in actor.named_parameters() if "lora_B" in n]
    assert lora_b
    torch.manual_seed(0)
    randomize_(lora_b)
    _, _, input_ids, attention_mask, P = padded_batch(tokenizer)
    mask = attention_mask[:, P:].bool()
    with torch.no_grad():
        expected, _ = response_logprobs(original, input_ids, attention_mask, P, TEMPERATURE)
        adapted, _ = response_logprobs(actor, input_ids, attention_mask, P, TEMPERATURE)
        with actor.disable_adapter():
            reference, _ = response_logprobs(actor, input_ids, attention_mask, P, TEMPERATURE)
        again, _ = response_logprobs(actor, input_ids, attention_mask, P, TEMPERATURE)
    torch.testing.assert_close(reference[mask], expected[mask], atol=1e-6, rtol=0)
    assert (adapted[mask] - expected[mask]).abs().max() > 1e-2  # the adapter does change the policy
    torch.testing.assert_close(again, adapted, atol=0, rtol=0)  # and is back on after the context


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lora_critic_with_adapter_disabled_is_the_reward_model(arch, tokenizer, tiny_models):
    reward_model = load_sequence_classifier(str(tiny_models[arch]), tokenizer).eval()
    critic = add_lora(load_sequence_classifier(str(tiny_models[arch]), tokenizer), r=4, alpha=16, dropout=0.0,
                      target_modules=["all-linear"], task="SEQ_CLS").eval()
    head_copy = [p for n, p in critic.named_parameters() if "modules_to_save" in n]
    lora_b = [p for n, p in critic.named_parameters() if "lora_B" in n]
    assert head_copy and lora_b and all(p.requires_grad for p in head_copy)
    torch.manual_seed(0)
    randomize_(lora_b + head_copy)
    prompts, responses, input_ids, attention_mask, P = padded_batch(tokenizer)
    with torch.no_grad():
        expected = torch.stack([reward_model(input_ids=solo(p, r)).logits[0, 0] for p, r in zip(prompts, responses)])
        critic_scores = last_token_scores(critic, input_ids, attention_mask)
        with critic.disable_adapter():
            disabled = last_token_scores(critic, input_ids, attention_mask)
        # Both the adapters and the score head's trainable copy were perturbed: equality needs peft to restore both.
        torch.testing.assert_close(disabled, expected, atol=1e-6, rtol=0)
        assert (critic_scores - expected).abs().min() > 1e-3
        # The scorer that PPO builds for this case: the same numbers, in micro-batches of 2.
        rollout = Rollout(input_ids=input_ids, attention_mask=attention_mask, prompt_len=P,
                          response_mask=attention_mask[:, P:].bool(), stopped=torch.tensor([True, False, False]))
        scorer = RewardModelScorer(critic, tokenizer, adapter_disabled=True, same_tokenizer=True,
                                   template="human-assistant", max_len=64)
        examples = [PromptExample(prompt=[Message("user", t)], raw=True) for t in PROMPT_TEXTS]
        scores = scorer(rollout, examples, RESPONSE_TEXTS, 2)
        torch.testing.assert_close(scores, expected, atol=1e-6, rtol=0)
        # The critic's own values are unaffected afterwards.
        torch.testing.assert_close(last_token_scores(critic, input_ids, attention_mask), critic_scores, atol=0, rtol=0)


# --------------------------------------------------------------------------------------- a reward model of its own
@pytest.fixture(scope="module")
def other_reward_model(tmp_path_factory):
    """A GPT-2 reward model with its own tokenizer: no BOS, 300 tokens, trained on half the corpus."""
    root = tmp_path_factory.mktemp("other-rm")
    train_tokenizer(corpus()[::2], root / "tok", vocab_size=300, bos=False)
    path = make_tiny_model("gpt2", AutoTokenizer.from_pretrained(root / "tok"), root / "rm", hidden=32, layers=2,
                           heads=4, seed=3)
    rm_tokenizer = load_tokenizer(str(path))
    return load_sequence_classifier(str(path), rm_tokenizer).eval(), rm_tokenizer


def test_same_vocabulary(tokenizer, tokenizer_dir, other_reward_model):
    _, rm_tokenizer = other_reward_model
    assert not same_vocabulary(tokenizer, rm_tokenizer)
    assert not same_vocabulary(rm_tokenizer, tokenizer)
    assert same_vocabulary(tokenizer, load_tokenizer(str(tokenizer_dir)))
    # Same EOS and pad ids, one token more: another vocabulary.
    grown = load_tokenizer(str(tokenizer_dir))
    grown.add_tokens(["<extra_token>"])
    assert (grown.eos_token_id, grown.pad_token_id) == (tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert not same_vocabulary(tokenizer, grown)
    # Same vocabulary, another pad token: the ids would be read differently.
    repadded = load_tokenizer(str(tokenizer_dir))
    repadded.pad_token = repadded.bos_token
    assert repadded.get_vocab() == tokenizer.get_vocab() and repadded.pad_token_id != tokenizer.pad_token_id
    assert not same_vocabulary(tokenizer, repadded)


def test_retokenize_for_another_reward_model(tokenizer, other_reward_model):
    rm, rm_tok = other_reward_model
    eos = rm_tok.eos_token_id
    examples = [PromptExample(prompt=[Message("user", "What color is item 3?")], raw=False, extra={"answer": "red"}),
                PromptExample(prompt=[Message("user", "What color is item 5?")], raw=False),
                PromptExample(prompt=[Message("user", "\n\nHuman: say blue\n\nAssistant:")], raw=True)]
    responses = ["Item 3 is red.", "It is blue and", " blue"]
    stopped = [True, False, True]
    scorer = RewardModelScorer(rm, rm_tok, adapter_disabled=False, same_tokenizer=False, template="human-assistant",
                               max_len=64)

    def pieces(*texts):
        return [t for text in texts for t in rm_tok(text, add_special_tokens=False)["input_ids"]]

    expected = [pieces("\n\nHuman: What color is item 3?", "\n\nAssistant:", " Item 3 is red.") + [eos],
                pieces("\n\nHuman: What color is item 5?", "\n\nAssistant:", " It is blue and"),
                pieces("\n\nHuman: say blue\n\nAssistant:", " blue") + [eos]]
    batch = scorer.retokenize(examples, responses, stopped)
    lengths = batch["attention_mask"].sum(-1).tolist()
    got = [row[:n] for row, n in zip(batch["input_ids"].tolist(), lengths)]
    assert got == expected
    assert rm_tok.decode(got[0]) == "\n\nHuman: What color is item 3?\n\nAssistant: Item 3 is red." + rm_tok.eos_token
    assert rm_tok.decode(got[1]) == "\n\nHuman: What color is item 5?\n\nAssistant: It is blue and"
    assert [ids[-1] == eos for ids in got] == stopped
    assert (batch["input_ids"][batch["attention_mask"] == 0] == rm_tok.pad_token_id).all()
    # The scores are the reward model's on each sequence alone; the rollout's ids (another vocabulary) are not read.
    actor_ids = torch.full((3, 4), 10**6)  # out of any vocabulary: an error if used
    rollout = Rollout(input_ids=actor_ids, attention_mask=torch.ones(3, 4, dtype=torch.long), prompt_len=2,
                      response_mask=torch.ones(3, 2, dtype=torch.bool), stopped=torch.tensor(stopped))
    with torch.no_grad():
        scores = scorer(rollout, examples, responses, 2)
        alone = torch.stack([rm(input_ids=torch.tensor([ids])).logits[0, 0] for ids in expected])
    torch.testing.assert_close(scores, alone, atol=1e-5, rtol=0)
    # Too long: the prompt loses its start, the response and its EOS stay.
    short = RewardModelScorer(rm, rm_tok, adapter_disabled=False, same_tokenizer=False, template="human-assistant",
                              max_len=8)
    batch = short.retokenize(examples[:1], responses[:1], [True])
    assert batch["input_ids"][0].tolist() == expected[0][-8:]


def test_retokenize_keeps_bos_when_truncating(tokenizer):
    example = PromptExample(prompt=[Message("user", "What color is item 3?")], raw=False)
    scorer = RewardModelScorer(None, tokenizer, adapter_disabled=False, same_tokenizer=False,
                               template="human-assistant", max_len=10)
    full = RewardModelScorer(None, tokenizer, adapter_disabled=False, same_tokenizer=False,
                             template="human-assistant", max_len=100)
    whole = full.retokenize([example], [" Item 3 is red."], [False])["input_ids"][0].tolist()
    assert whole[0] == tokenizer.bos_token_id and whole[-1] != tokenizer.eos_token_id and len(whole) > 10
    cut = scorer.retokenize([example], [" Item 3 is red."], [False])["input_ids"][0].tolist()
    assert cut == [tokenizer.bos_token_id] + whole[-9:]


# ------------------------------------------------------------------------------------------------ reward functions
@pytest.fixture
def forget_new_modules():
    """Drop the modules a test imported (reward files, test modules), so nothing leaks into other tests."""
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith(("rlhfkit_reward_", "rlhfkit_test_")):
            del sys.modules[name]


def test_load_reward_fn_from_file_and_module(tmp_path, monkeypatch, forget_new_modules):
    file = tmp_path / "my_rewards.py"
    file.write_text("def length(prompts, responses):\n    return [float(len(r)) for r in responses]\n")
    fn = load_reward_fn(f"{file}:length")
    assert fn(["p"], ["abc"]) == [3.0]
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "rlhfkit_test_reward_module.py").write_text("def one(prompts, responses):\n    return [1.0]\n")
    monkeypatch.syspath_prepend(str(package))
    fn = load_reward_fn("rlhfkit_test_reward_module:one")
    assert fn([], []) == [1.0]


def test_load_reward_fn_errors_name_the_problem(tmp_path, monkeypatch, forget_new_modules):
    file = tmp_path / "rewards_ok.py"
    file.write_text("def score(prompts, responses):\n    return [0.0] * len(responses)\nNOT_A_FUNCTION = 3\n")
    broken = tmp_path / "rewards_broken.py"
    broken.write_text("raise RuntimeError('cannot load the judge')\n")
    with pytest.raises(ConfigError, match="does not exist"):
        load_reward_fn(f"{tmp_path / 'missing.py'}:score")
    with pytest.raises(ConfigError, match="has no function 'nope'"):
        load_reward_fn(f"{file}:nope")
    with pytest.raises(ConfigError, match="has no function 'NOT_A_FUNCTION'"):
        load_reward_fn(f"{file}:NOT_A_FUNCTION")
    with pytest.raises(ConfigError, match="importing .*rewards_broken.py failed: RuntimeError: cannot load the judge"):
        load_reward_fn(f"{broken}:score")
    with pytest.raises(ConfigError, match="importing rlhfkit_no_such_module_xyz failed: ModuleNotFoundError"):
        load_reward_fn("rlhfkit_no_such_module_xyz:score")
    (tmp_path / "rlhfkit_test_broken_module.py").write_text("import json\njson.loads('{')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match="importing rlhfkit_test_broken_module failed: JSONDecodeError"):
        load_reward_fn("rlhfkit_test_broken_module:score")
    for spec in ("rewards.py", "just_a_name", f"{file}:", ":score"):
        with pytest.raises(ConfigError, match="expected module:function or path/to/file.py:function"):
            load_reward_fn(spec)


def test_call_reward_fn_passes_columns_by_name():
    examples = [PromptExample(prompt=[Message("user", "q1")], raw=False, extra={"answer": "red", "id": 1}),
                PromptExample(prompt=[Message("user", "q2")], raw=False, extra={"answer": "blue", "id": 2})]
    seen = {}

    def exact(prompts, responses, answer):
        seen["exact"] = (prompts, responses, answer)
        return [float(a in r) for a, r in zip(answer, responses)]

    def everything(prompts, responses, **columns):
        seen["everything"] = columns
        return torch.tensor([0.5, -1.5], dtype=torch.float64)

    def texts_only(prompts, responses):
        return (1, 2)

    rewards = call_reward_fn(exact, ["P1", "P2"], ["it is red", "green"], examples)
    assert seen["exact"] == (["P1", "P2"], ["it is red", "green"], ["red", "blue"])
    assert rewards.dtype == torch.float32 and rewards.tolist() == [1.0, 0.0]
    assert call_reward_fn(everything, ["P1", "P2"], ["a", "b"], examples).tolist() == [0.5, -1.5]
    assert seen["everything"] == {"answer": ["red", "blue"], "id": [1, 2]}
    assert call_reward_fn(texts_only, ["P1", "P2"], ["a", "b"], examples).tolist() == [1.0, 2.0]


@pytest.mark.parametrize("result, message", [
    ([1.0], "returned 1 values for 2 responses; expected one number per response"),
    ([1.0, 2.0, 3.0], "returned 3 values for 2 responses"),
    (["good", "bad"], "returned list ['good', 'bad']; expected one number per response (2)"),
    ("0.5", "returned str '0.5'; expected one number per response (2)"),
    (None, "returned NoneType None; expected one number per response (2)"),
    ({"a": 1.0}, "returned dict {'a': 1.0}"),
    (torch.ones(2, 2), "returned Tensor"),
])
def test_call_reward_fn_rejects_bad_returns(result, message):
    def judge(prompts, responses):
        return result

    examples = [PromptExample(prompt=[Message("user", "q")], raw=False)] * 2
    with pytest.raises(TrainingError) as caught:
        call_reward_fn(judge, ["p", "p"], ["a", "b"], examples, "--reward-fn r.py:judge")
    assert str(caught.value).startswith(f"--reward-fn r.py:judge {message}")


@pytest.mark.parametrize("result", [[1.0, float("nan")], (float("inf"), 0), torch.tensor([[0.5], [float("nan")]])])
def test_call_reward_fn_passes_non_finite_scores_on(result):
    """The iteration is skipped by the caller, which names the rows; the scores must come through as they are."""
    examples = [PromptExample(prompt=[Message("user", "q")], raw=False)] * 2
    scores = call_reward_fn(lambda prompts, responses: result, ["p", "p"], ["a", "b"], examples)
    assert scores.shape == (2,) and int((~torch.isfinite(scores)).sum()) == 1


def test_call_reward_fn_names_the_exception():
    def judge(prompts, responses):
        return [len(r) / 0 for r in responses]

    examples = [PromptExample(prompt=[Message("user", "q")], raw=False)] * 2
    with pytest.raises(TrainingError, match=r"^--reward-fn r.py:judge raised ZeroDivisionError: division by zero "
                                            r"\(called on 2 responses\)$"):
        call_reward_fn(judge, ["p", "p"], ["a", "b"], examples, "--reward-fn r.py:judge")


def test_function_scorer_sees_decoded_prompts(tokenizer):
    prompts = [tokenizer(t)["input_ids"] for t in PROMPT_TEXTS]
    prompt_ids, prompt_mask = left_pad(prompts, tokenizer.pad_token_id)
    rollout = Rollout(input_ids=prompt_ids, attention_mask=prompt_mask, prompt_len=prompt_ids.shape[1],
                      response_mask=torch.zeros(3, 0, dtype=torch.bool), stopped=torch.ones(3, dtype=torch.bool))
    seen = {}

    def fn(prompts, responses, answer):
        seen.update(prompts=prompts, responses=responses, answer=answer)
        return [len(r) for r in responses]

    examples = [PromptExample(prompt=[Message("user", "x")], raw=True, extra={"answer": k}) for k in range(3)]
    scores = FunctionScorer(fn, tokenizer)(rollout, examples, ["a", "bb", "ccc"])
    assert scores.tolist() == [1.0, 2.0, 3.0]
    assert seen == {"prompts": PROMPT_TEXTS, "responses": ["a", "bb", "ccc"], "answer": [0, 1, 2]}
