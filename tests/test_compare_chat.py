"""The evaluation tools: greedy and seeded generation (against a greedy loop written here), `rlhfkit compare` (its
responses and reward-model scores against each model and the reward model run directly) and the chat loop's history
(the prompt the model is given at every turn)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import write_jsonl

from rlhfkit.cli import main
from rlhfkit.config import ConfigError
from rlhfkit.data.encode import EncodeStats, encode_prompt, tokenize_segments
from rlhfkit.data.formats import Message, PromptExample
from rlhfkit.data.templates import render
from rlhfkit.models import load_causal_lm, load_sequence_classifier, load_tokenizer, save_model
from rlhfkit.tools.chat import chat_loop, model_responder, printable
from rlhfkit.tools.compare import compare_models, parse_models
from rlhfkit.tools.generation import generate_responses

pytestmark = [pytest.mark.usefixtures("one_thread")]

TEMPLATE = "human-assistant"  # the test tokenizer has no chat template, so "auto" resolves to this one
USER_TEXTS = ["What color is item 3?", "Name the color of item 7 and say why it is nice."]  # different lengths: padding
EXAMPLES = [PromptExample([Message("user", t)], raw=False) for t in USER_TEXTS]
MAX_NEW = 8


def greedy_by_hand(model, prompt: list[int], eos: int, max_new_tokens: int) -> list[int]:
    """Argmax of the model's next-token logits, one unpadded sequence at a time, up to and including EOS."""
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            out.append(token)
            if token == eos:
                break
            ids.append(token)
    return out


def prompt_ids(tokenizer) -> list[list[int]]:
    return [encode_prompt(ex, tokenizer, TEMPLATE, 512, EncodeStats()) for ex in EXAMPLES]


@pytest.fixture(scope="module")
def stopping_llama(tiny_models, tokenizer, tmp_path_factory):
    """The tiny Llama changed so that greedy decoding of the first prompt ends with EOS and of the second does not:
    EOS's output row becomes 1.01 x the row of a token that only the first continuation writes (from its third step
    on), so EOS wins where that token would. Saved as a model folder; returns its path."""
    model = load_causal_lm(str(tiny_models["llama"]), tokenizer).eval()
    eos = tokenizer.eos_token_id
    first, second = (greedy_by_hand(model, p, eos, MAX_NEW) for p in prompt_ids(tokenizer))
    assert eos not in first + second
    token = next(t for i, t in enumerate(first) if i >= 2 and t not in first[:i] + second)
    with torch.no_grad():
        model.lm_head.weight[eos] = 1.01 * model.lm_head.weight[token]
    return save_model(model, tokenizer, tmp_path_factory.mktemp("stopping_llama"))


# ------------------------------------------------------------------------------------------------------ generation
def test_greedy_generation_equals_a_greedy_loop(stopping_llama, tokenizer):
    model = load_causal_lm(str(stopping_llama), tokenizer)
    eos = tokenizer.eos_token_id
    prompts = prompt_ids(tokenizer)
    assert tokenizer.decode(prompts[0]) == f"<s>\n\nHuman: {USER_TEXTS[0]}\n\nAssistant:"
    expected = [greedy_by_hand(model, p, eos, MAX_NEW) for p in prompts]
    assert expected[0][-1] == eos and 3 <= len(expected[0]) < MAX_NEW  # one stops, the other runs on
    assert eos not in expected[1] and len(expected[1]) == MAX_NEW
    responses = generate_responses(model, tokenizer, EXAMPLES, TEMPLATE, max_new_tokens=MAX_NEW)  # batched, padded
    assert [r.ids for r in responses] == expected
    assert [r.stopped for r in responses] == [True, False]
    assert [r.n_tokens for r in responses] == [len(expected[0]), MAX_NEW]
    assert [r.text for r in responses] == [tokenizer.decode(ids, skip_special_tokens=True) for ids in expected]
    assert "</s>" not in responses[0].text and responses[0].text
    again = generate_responses(model, tokenizer, EXAMPLES, TEMPLATE, max_new_tokens=MAX_NEW, batch_size=1)
    assert [r.ids for r in again] == expected  # deterministic, and the same one prompt at a time


def test_sampling_is_a_function_of_the_seed_and_leaves_the_global_rng_alone(tiny_models, tokenizer):
    model = load_causal_lm(str(tiny_models["llama"]), tokenizer)

    def sample(seed: int) -> list[list[int]]:
        return [r.ids for r in generate_responses(model, tokenizer, EXAMPLES, TEMPLATE, max_new_tokens=MAX_NEW,
                                                  temperature=1.0, seed=seed)]

    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = sample(5)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random stream is untouched
    torch.manual_seed(456)  # another global state gives the same samples: only the seed counts
    assert sample(5) == first
    assert sample(6) != first
    greedy = [r.ids for r in generate_responses(model, tokenizer, EXAMPLES, TEMPLATE, max_new_tokens=MAX_NEW)]
    assert first != greedy  # temperature 1 really samples


# --------------------------------------------------------------------------------------------------------- compare
def direct_score(reward_model, tokenizer, user_text: str, response: dict) -> float:
    """The reward model's own forward on one unpadded sequence: prompt + response (+ EOS only if it stopped)."""
    segments = render([Message("user", user_text), Message("assistant", response["text"])], TEMPLATE, tokenizer,
                      raw=False)
    ids = tokenize_segments(segments, tokenizer).input_ids
    assert ids[-1] == tokenizer.eos_token_id
    if not response["stopped"]:
        ids = ids[:-1]
    with torch.no_grad():
        return reward_model(input_ids=torch.tensor([ids])).logits[0, 0].item()


def test_compare_models_with_reward_scores(stopping_llama, tiny_models, tokenizer, tmp_path):
    reward_model = load_sequence_classifier(str(tiny_models["opt"]), tokenizer, seed=1)
    rm_dir = save_model(reward_model, tokenizer, tmp_path / "rm")
    models = {"llama": str(stopping_llama), "gpt2": str(tiny_models["gpt2"])}
    rows = compare_models(models, EXAMPLES, max_new_tokens=MAX_NEW, reward_model=str(rm_dir))
    assert [row["prompt"] for row in rows] == USER_TEXTS
    for name, path in models.items():
        tok = load_tokenizer(path)
        direct = generate_responses(load_causal_lm(path, tok), tok, EXAMPLES, TEMPLATE, max_new_tokens=MAX_NEW)
        got = [row["responses"][name] for row in rows]
        assert [(g["text"], g["stopped"], g["n_tokens"]) for g in got] == \
            [(d.text, d.stopped, d.n_tokens) for d in direct], name
    assert rows[0]["responses"]["llama"]["stopped"] and not rows[1]["responses"]["llama"]["stopped"]
    scores = [row["responses"][name]["score"] for row in rows for name in models]
    expected = [direct_score(reward_model.eval(), tokenizer, text, row["responses"][name])
                for text, row in zip(USER_TEXTS, rows) for name in models]
    assert scores == pytest.approx(expected, abs=1e-5)
    assert len(set(round(s, 4) for s in scores)) == 4  # four different inputs, four different scores
    # Without a reward model there is no score.
    plain = compare_models({"gpt2": models["gpt2"]}, EXAMPLES[:1], max_new_tokens=2)
    assert plain[0]["responses"]["gpt2"]["score"] is None and plain[0]["responses"]["gpt2"]["n_tokens"] == 2


def test_parse_models():
    assert parse_models(["base=a,sft=runs/sft/final", " ppo = c "]) == {"base": "a", "sft": "runs/sft/final",
                                                                        "ppo": "c"}
    assert list(parse_models(["z=1,a=2"])) == ["z", "a"]  # columns keep the order given
    for items, needle in [(["base"], "'base'"), (["=a"], "'=a'"), (["a=1,b="], "'b='"), (["a=1", "a=2"], "twice")]:
        with pytest.raises(ConfigError, match=needle):
            parse_models(items)


def test_compare_cli_writes_json_and_prints_table(stopping_llama, tiny_models, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [
        {"messages": [{"role": "user", "content": USER_TEXTS[0]}]},
        {"prompt": "\n\nHuman: Hi\n\nAssistant:"},  # raw: used verbatim
        {"prompt": "never answered: --num-prompts 2"}])
    out = tmp_path / "results.json"
    code = main(["compare", "--models", f"base={tiny_models['gpt2']}", f"tuned={stopping_llama}",
                 "--prompts", str(prompts), "--num-prompts", "2", "--max-new-tokens", str(MAX_NEW),
                 "--max-prompt-len", "256", "--output", str(out)])  # prompt + response within GPT-2's 512 positions
    printed = capsys.readouterr().out
    assert code == 0
    results = json.loads(out.read_text())
    assert results["models"] == {"base": str(tiny_models["gpt2"]), "tuned": str(stopping_llama)}
    rows = results["rows"]
    assert [row["prompt"] for row in rows] == [USER_TEXTS[0], "\n\nHuman: Hi\n\nAssistant:"]
    assert [list(row["responses"]) for row in rows] == [["base", "tuned"]] * 2
    assert rows[0]["responses"]["tuned"]["stopped"] and rows[0]["responses"]["tuned"]["score"] is None
    assert "responses side by side" in printed and "base" in printed and "tuned" in printed
    assert USER_TEXTS[0] in printed and "mean score" not in printed
    table = " ".join(printed.split())
    for row in rows:
        for response in row["responses"].values():
            words = response["text"].split()
            assert " ".join(words[:2]) in table  # the first words of every response are in the table


def test_compare_cli_bad_models_item_is_one_line(tiny_models, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Hi"}])
    code = main(["compare", "--models", f"base={tiny_models['gpt2']},sft", "--prompts", str(prompts)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines() == ["rlhfkit compare: error: models: expected NAME=PATH, got 'sft'"]


# ------------------------------------------------------------------------------------------------------------ chat
def lines_read(lines: list[str], log: list[str]):
    for line in lines:
        log.append(line)
        yield line


def test_chat_clear_and_exit(tiny_models, tokenizer):
    model = load_causal_lm(str(tiny_models["llama"]), tokenizer)
    respond = model_responder(model, tokenizer, TEMPLATE, max_new_tokens=4, temperature=0.0, top_p=1.0, seed=0,
                              max_prompt_len=512)
    written, consumed = [], []
    turns = chat_loop(lines_read(["hello", "/clear", "hi again", "/exit", "never read"], consumed), written.append,
                      respond)
    assert consumed == ["hello", "/clear", "hi again", "/exit"]
    assert len(turns) == 2
    assert turns[0].prompt == "<s>\n\nHuman: hello\n\nAssistant:"
    assert turns[1].prompt == "<s>\n\nHuman: hi again\n\nAssistant:"  # the first turn is forgotten
    # the tiny model's replies hold control characters (\x12): printed as escapes
    assert written == [f"assistant> {printable(turns[0].reply.text)}", "(history cleared)",
                       f"assistant> {printable(turns[1].reply.text)}"]
    assert turns[0].reply.n_tokens == 4 and turns[0].reply.text


def test_chat_keeps_the_history_and_cuts_it_from_the_left(tiny_models, tokenizer):
    model = load_causal_lm(str(tiny_models["llama"]), tokenizer)

    def session(max_prompt_len: int, lines: list[str]):
        respond = model_responder(model, tokenizer, TEMPLATE, max_new_tokens=4, temperature=1.0, top_p=1.0, seed=7,
                                  max_prompt_len=max_prompt_len)
        return chat_loop(iter(lines), lambda line: None, respond)  # ends at the end of input, no /exit

    turns = session(512, ["hello", "what next"])
    first = turns[0].reply.text
    assert first and turns[0].prompt == "<s>\n\nHuman: hello\n\nAssistant:"
    # The reply is in the history as the template writes an assistant turn (with EOS, even if it was cut off).
    assert turns[1].prompt == f"<s>\n\nHuman: hello\n\nAssistant: {first}</s>\n\nHuman: what next\n\nAssistant:"
    replay = session(512, ["hello", "what next"])
    assert [(t.prompt, t.reply.ids) for t in replay] == [(t.prompt, t.reply.ids) for t in turns]  # seeded per turn
    repeated = session(512, ["hello", "/clear", "hello"])  # the same prompt twice: turn k draws from seed + k
    assert repeated[0].prompt == repeated[1].prompt and repeated[0].reply.ids != repeated[1].reply.ids
    # A prompt budget smaller than the history: the oldest tokens go, BOS and the latest turn stay.
    latest = encode_prompt(PromptExample([Message("user", "what next")], raw=False), tokenizer, TEMPLATE, 512,
                           EncodeStats())
    budget = len(latest) + 3
    short = session(budget, ["hello there my friend", "what next"])
    ids = short[1].prompt_ids
    assert len(ids) == budget and ids[0] == tokenizer.bos_token_id and ids[-(len(latest) - 1):] == latest[1:]
    assert short[1].prompt.endswith("\n\nHuman: what next\n\nAssistant:") and "hello" not in short[1].prompt
    assert ids[-len(latest)] == tokenizer.eos_token_id  # the kept tokens before the turn end the last reply
