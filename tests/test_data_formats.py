"""Reading and normalising every supported data format and file type, the real files in ../shared/datasets, and the
handling of bad rows (exact messages naming file, line and field)."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import pytest

from conftest import write_jsonl
from rlhfkit.data.formats import (Conversation, Message, PreferencePair, PromptExample, normalise_preference,
                                  normalise_prompt, normalise_sft, normalise_text, strip_end_marker)
from rlhfkit.data.loading import apply_weight, load_examples, parse_spec, split_eval
from rlhfkit.data.readers import DataError, Source, read_rows

SRC = Source("data.jsonl", 7)
U, A, S = "user", "assistant", "system"


def msgs(*pairs: tuple[str, str]) -> list[Message]:
    return [Message(role, content) for role, content in pairs]


def error_of(fn, row: dict) -> str:
    with pytest.raises(DataError) as info:
        fn(row, SRC)
    return str(info.value)


# ----------------------------------------------------------------------------------------------------------- SFT
def test_alpaca_with_input_without_input_and_id():
    with_input = normalise_sft({"instruction": "Translate.", "input": "bonjour", "output": "hello", "id": "a1"}, SRC)
    assert with_input == [Conversation(msgs((U, "Translate.\n\nbonjour"), (A, "hello")), False, SRC, "alpaca")]
    for row in ({"instruction": "Say hi.", "input": "", "output": "hi"}, {"instruction": "Say hi.", "output": "hi"},
                {"instruction": "Say hi.", "input": None, "output": "hi"}):
        assert normalise_sft(row, SRC) == [Conversation(msgs((U, "Say hi."), (A, "hi")), False, SRC, "alpaca")]


def test_nested_instances_give_one_example_each():
    row = {"id": "seed_task_1", "instruction": "Classify the sentiment.", "is_classification": True,
           "instances": [{"input": "I love it", "output": "Positive"}, {"input": "", "output": "Negative</s>"},
                         {"input": "meh", "output": "Neutral"}]}
    assert normalise_sft(row, SRC) == [
        Conversation(msgs((U, "Classify the sentiment.\n\nI love it"), (A, "Positive")), False, SRC, "instances"),
        Conversation(msgs((U, "Classify the sentiment."), (A, "Negative")), False, SRC, "instances"),
        Conversation(msgs((U, "Classify the sentiment.\n\nmeh"), (A, "Neutral")), False, SRC, "instances"),
    ]
    assert error_of(normalise_sft, {"instruction": "x", "instances": []}) == \
        "data.jsonl:7: field 'instances': expected a non-empty list of {input, output}"
    assert error_of(normalise_sft, {"instruction": "x", "instances": [{"input": "a", "output": "b"}, "c"]}) == \
        "data.jsonl:7: field 'instances[1]': expected an object, got str"
    assert error_of(normalise_sft, {"instruction": "x", "instances": [{"input": "a"}]}) == \
        "data.jsonl:7: field 'instances[0].output': missing (expected a string)"


def test_prompt_completion_end_marker_is_stripped_not_kept_as_text():
    row = {"prompt": "Review: great\nIs the review positive or negative?\n", "completion": "Positive<|endoftext|>"}
    assert normalise_sft(row, SRC) == [Conversation(
        msgs((U, "Review: great\nIs the review positive or negative?\n"), (A, "Positive")), True, SRC,
        "prompt-completion")]
    # trailing whitespace after the marker, and other tokenizers' markers
    assert normalise_sft({"prompt": "Q", "completion": " yes <|endoftext|>\n"}, SRC)[0].messages[1].content == " yes "
    for marker in ("</s>", "<|im_end|>", "<|eot_id|>", "<|end|>", "<eos>"):
        assert strip_end_marker(f"ok{marker}") == "ok"
    assert strip_end_marker("no marker  ") == "no marker  "
    assert error_of(normalise_sft, {"prompt": "Q", "completion": "<|endoftext|>"}) == \
        "data.jsonl:7: field 'completion': empty response (only an end marker)"


def test_a_response_that_is_only_an_end_marker_is_an_error_in_every_sft_format():
    assert error_of(normalise_sft, {"instruction": "Say hi.", "output": "</s>"}) == \
        "data.jsonl:7: field 'output': empty response (only an end marker)"
    assert error_of(normalise_sft, {"instruction": "Say hi.", "instances": [{"input": "", "output": " <|endoftext|>"}]}
                    ) == "data.jsonl:7: field 'instances[0].output': empty response (only an end marker)"
    assert error_of(normalise_sft, {"messages": [{"role": "user", "content": "q"},
                                                 {"role": "assistant", "content": "<|im_end|>"}]}) == \
        "data.jsonl:7: field 'messages[1].content': empty assistant response"
    assert error_of(normalise_text, {"text": "<|endoftext|>"}) == \
        "data.jsonl:7: field 'text': empty text (only an end marker)"


def test_chat_messages_role_content_and_from_value():
    row = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                        {"role": "assistant", "content": "hello<|im_end|>"}]}
    assert normalise_sft(row, SRC) == [Conversation(msgs((S, "Be brief."), (U, "hi"), (A, "hello")), False, SRC,
                                                    "chat")]
    row = {"messages": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "hi"},
                        {"from": "gpt", "value": "hello"}, {"from": "Human", "value": "again"},
                        {"from": "assistant", "value": "hello again"}]}
    assert normalise_sft(row, SRC) == [Conversation(
        msgs((S, "Be brief."), (U, "hi"), (A, "hello"), (U, "again"), (A, "hello again")), False, SRC, "chat")]


def test_sharegpt_conversations_multi_turn():
    row = {"id": "x", "conversations": [{"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1"},
                                        {"from": "human", "value": "q2"}, {"from": "gpt", "value": "a2"}]}
    assert normalise_sft(row, SRC) == [Conversation(msgs((U, "q1"), (A, "a1"), (U, "q2"), (A, "a2")), False, SRC,
                                                    "sharegpt")]
    assert error_of(normalise_sft, {"messages": [{"role": "user", "content": "q"}]}) == \
        "data.jsonl:7: field 'messages': no assistant turn to train on"


def test_plain_text_for_sft_and_text_kinds():
    expected = [Conversation(msgs((A, "Once upon a time.")), True, SRC, "text")]
    assert normalise_sft({"text": "Once upon a time.</s>"}, SRC) == expected
    assert normalise_text({"text": "Once upon a time.", "meta": 1}, SRC) == expected
    assert error_of(normalise_sft, {"question": "q", "answer": "a"}) == (
        "data.jsonl:7: no SFT format matches the keys ['answer', 'question'] (expected messages, conversations, "
        "instruction+output, instruction+instances, prompt+completion or text)")


# ---------------------------------------------------------------------------------------------------- preference
def test_preference_prompt_chosen_rejected_strings_are_raw():
    row = {"prompt": " Human: What color is the sky? Assistant:", "chosen": " Blue.<|endoftext|>",
           "rejected": " No."}
    assert normalise_preference(row, SRC) == [PreferencePair(
        msgs((U, " Human: What color is the sky? Assistant:")), msgs((A, " Blue.")), msgs((A, " No.")), True, 0.0, SRC,
        "prompt-chosen-rejected")]


def test_preference_hh_rlhf_transcripts_split_at_the_last_assistant_turn():
    shared = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: what color is it?"
    row = {"chosen": shared + "\n\nAssistant: It is red.", "rejected": shared + "\n\nAssistant: I won't say."}
    assert normalise_preference(row, SRC) == [PreferencePair(
        msgs((U, "hi"), (A, "hello"), (U, "what color is it?")), msgs((A, "It is red.")), msgs((A, "I won't say.")),
        False, 0.0, SRC, "hh-rlhf")]
    # a repeated speaker is one turn split by a literal marker
    row = {"chosen": "\n\nHuman: a\n\nHuman: b\n\nAssistant: c", "rejected": "\n\nHuman: a\n\nHuman: b\n\nAssistant: d"}
    assert normalise_preference(row, SRC)[0].prompt == msgs((U, "a\n\nb"))
    assert error_of(normalise_preference, {"chosen": "no transcript", "rejected": "\n\nHuman: a\n\nAssistant: b"}) == \
        "data.jsonl:7: field 'chosen': expected a transcript of '\\n\\nHuman:' / '\\n\\nAssistant:' turns"
    empty_final = {"chosen": shared + "\n\nAssistant: ", "rejected": shared + "\n\nAssistant: x"}
    assert error_of(normalise_preference, empty_final) == \
        "data.jsonl:7: field 'chosen': empty assistant response after the shared dialogue"


def test_preference_colossalchat_context_messages_and_margin():
    row = {"context": [{"from": "human", "content": "Name a color."}],
           "chosen": [{"from": "assistant", "content": "Red."}], "rejected": [{"from": "assistant", "content": "No."}],
           "margin": 2}
    assert normalise_preference(row, SRC) == [PreferencePair(
        msgs((U, "Name a color.")), msgs((A, "Red.")), msgs((A, "No.")), False, 2.0, SRC, "context-messages")]


def test_preference_prompt_messages_and_conversation_pairs():
    row = {"prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "hi"}],
           "chosen": [{"role": "assistant", "content": "hello"}], "rejected": "go away", "margin": 0.5}
    assert normalise_preference(row, SRC) == [PreferencePair(
        msgs((S, "Be kind."), (U, "hi")), msgs((A, "hello")), msgs((A, "go away")), False, 0.5, SRC,
        "prompt-messages")]
    row = {"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "good"}],
           "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "bad"}], "margin": None}
    assert normalise_preference(row, SRC) == [PreferencePair(
        msgs((U, "q")), msgs((A, "good")), msgs((A, "bad")), False, 0.0, SRC, "conversation-pair")]
    # conversations that part before their last turn: the prompt is the shared run up to its last user turn
    row = {"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                      {"role": "user", "content": "more?"}, {"role": "assistant", "content": "yes"}],
           "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                        {"role": "user", "content": "less?"}, {"role": "assistant", "content": "no"}]}
    assert normalise_preference(row, SRC) == [PreferencePair(
        msgs((U, "q")), msgs((A, "a"), (U, "more?"), (A, "yes")), msgs((A, "a"), (U, "less?"), (A, "no")), False, 0.0,
        SRC, "conversation-pair")]
    bad_margin = {"prompt": "q", "chosen": "a", "rejected": "b", "margin": "high"}
    assert error_of(normalise_preference, bad_margin) == "data.jsonl:7: field 'margin': expected a number, got str"
    assert error_of(normalise_preference, dict(bad_margin, margin=True)) == \
        "data.jsonl:7: field 'margin': expected a number, got bool"


# -------------------------------------------------------------------------------------------------------- prompts
def test_prompt_kind_formats_keep_extra_columns():
    assert normalise_prompt({"prompt": " Human: hi Assistant:", "id": 3, "meta": {"a": 1}}, SRC) == [PromptExample(
        msgs((U, " Human: hi Assistant:")), True, {"id": 3, "meta": {"a": 1}}, SRC, "prompt")]
    assert normalise_prompt({"instruction": "Translate.", "input": "bonjour", "lang": "fr"}, SRC) == [PromptExample(
        msgs((U, "Translate.\n\nbonjour")), False, {"lang": "fr"}, SRC, "instruction")]
    assert normalise_prompt({"instruction": "Say hi.", "input": ""}, SRC)[0].prompt == msgs((U, "Say hi."))
    row = {"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                        {"role": "user", "content": "q2"}], "source": "web"}
    assert normalise_prompt(row, SRC) == [PromptExample(msgs((U, "q1"), (A, "a1"), (U, "q2")), False,
                                                        {"source": "web"}, SRC, "messages")]
    assert normalise_prompt({"context": [{"from": "human", "value": "q"}], "k": 1}, SRC) == [PromptExample(
        msgs((U, "q")), False, {"k": 1}, SRC, "context")]
    assert normalise_prompt({"context": "plain", "k": 1}, SRC) == [PromptExample(msgs((U, "plain")), True, {"k": 1},
                                                                                 SRC, "context")]
    hh = {"chosen": "\n\nHuman: q1\n\nAssistant: a1\n\nHuman: q2\n\nAssistant: a2", "rejected": "x", "score": 1}
    assert normalise_prompt(hh, SRC) == [PromptExample(msgs((U, "q1"), (A, "a1"), (U, "q2")), False, {"score": 1}, SRC,
                                                       "hh-rlhf")]


def test_prompt_messages_must_end_on_a_user_turn():
    row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    assert error_of(normalise_prompt, row) == "data.jsonl:7: field 'messages': a prompt must end on a user turn"
    for key in ("prompt", "context"):  # the same rule for message lists under the other keys
        assert error_of(normalise_prompt, {key: row["messages"]}) == \
            f"data.jsonl:7: field '{key}': a prompt must end on a user turn"
    assert error_of(normalise_prompt, {"question": "q"}) == (
        "data.jsonl:7: no prompt format matches the keys ['question'] (expected prompt, context, instruction or "
        "messages)")


# ---------------------------------------------------------------------------------------------------- file types
SFT_ROWS = [{"instruction": "What color is item 1?", "input": "", "output": "Item 1 is blue."},
            {"instruction": "Name it.", "input": "item 2", "output": "Item 2 is green.", "id": "b"}]
SFT_EXPECTED = [msgs((U, "What color is item 1?"), (A, "Item 1 is blue.")),
                msgs((U, "Name it.\n\nitem 2"), (A, "Item 2 is green."))]


def load_sft(path) -> list:
    loaded = load_examples([str(path)], "sft")
    return [(ex.messages, str(ex.source)) for ex in loaded.examples]


def test_json_array_with_element_lines(tmp_path):
    path = tmp_path / "d.json"
    path.write_text("[\n  " + json.dumps(SFT_ROWS[0]) + ",\n\n  " + json.dumps(SFT_ROWS[1], indent=1) + "\n]\n")
    assert load_sft(path) == [(SFT_EXPECTED[0], f"{path}:2"), (SFT_EXPECTED[1], f"{path}:4")]


def test_jsonl_and_jsonl_gz_with_blank_lines(tmp_path):
    text = json.dumps(SFT_ROWS[0]) + "\n\n" + json.dumps(SFT_ROWS[1]) + "\n"
    plain, packed = tmp_path / "d.jsonl", tmp_path / "d.jsonl.gz"
    plain.write_text(text)
    with gzip.open(packed, "wt") as f:
        f.write(text)
    assert load_sft(plain) == [(SFT_EXPECTED[0], f"{plain}:1"), (SFT_EXPECTED[1], f"{plain}:3")]
    assert load_sft(packed) == [(SFT_EXPECTED[0], f"{packed}:1"), (SFT_EXPECTED[1], f"{packed}:3")]


def test_parquet_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in ("instruction", "input", "output")} for r in SFT_ROWS]
                                        + [{"instruction": "x", "input": "", "output": None}]), path)
    loaded = load_examples([str(path)], "sft", skip_invalid=True)
    assert [(ex.messages, str(ex.source)) for ex in loaded.examples] == [
        (SFT_EXPECTED[0], f"{path} row 1"), (SFT_EXPECTED[1], f"{path} row 2")]
    [(error, row)] = loaded.problems
    assert str(error) == f"{path} row 3: field 'output': missing (expected a string)"
    assert error.as_record(row) == {"file": str(path), "row": {"instruction": "x", "input": "", "output": None},
                                    "field": "output", "reason": "missing (expected a string)"}


def test_csv_lines_count_multiline_cells(tmp_path):
    path = tmp_path / "d.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, ["instruction", "input", "output"])
        writer.writeheader()
        writer.writerow({"instruction": "What color is item 1?", "input": "", "output": "Item 1\nis blue."})
        writer.writerow({k: SFT_ROWS[1][k] for k in ("instruction", "input", "output")})
    assert load_sft(path) == [(msgs((U, "What color is item 1?"), (A, "Item 1\nis blue.")), f"{path}:2"),
                              (SFT_EXPECTED[1], f"{path}:4")]


def test_folder_of_files_in_sorted_order(tmp_path):
    folder = tmp_path / "data"
    (folder / "sub").mkdir(parents=True)
    write_jsonl(folder / "b.jsonl", [SFT_ROWS[1]])
    (folder / "sub" / "c.json").write_text(json.dumps([SFT_ROWS[0]]))
    write_jsonl(folder / "a.jsonl", [SFT_ROWS[0]])
    (folder / "notes.txt").write_text("not data")
    assert load_sft(folder) == [(SFT_EXPECTED[0], f"{folder}/a.jsonl:1"), (SFT_EXPECTED[1], f"{folder}/b.jsonl:1"),
                                (SFT_EXPECTED[0], f"{folder}/sub/c.json:1")]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"^folder .*empty holds no \.jsonl\.gz, \.json\.gz, \.jsonl, \.json, "
                                        r"\.parquet, \.csv files$"):
        load_examples([str(tmp_path / "empty")], "sft")
    with pytest.raises(DataError, match=r"missing\.jsonl: no such file or folder$"):
        load_examples([str(tmp_path / "missing.jsonl")], "sft")


def test_mixing_weights(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"a{i}"} for i in range(4)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"b{i}"} for i in range(6)])
    assert parse_spec(f"{a}:2") == (str(a), 2.0) and parse_spec(str(a)) == (str(a), 1.0)

    def texts(specs, seed=0):
        loaded = load_examples(specs, "text", seed=seed)
        return [ex.messages[0].content for ex in loaded.examples], [(r.rows, r.examples, r.used) for r in
                                                                     loaded.reports]

    got, reports = texts([f"{a}:2", f"{b}:0.5"])
    assert got[:8] == ["a0", "a1", "a2", "a3"] * 2
    half = got[8:]
    assert len(half) == 3 and len(set(half)) == 3 and set(half) <= {f"b{i}" for i in range(6)}
    assert half == sorted(half)  # the sample keeps the file's order
    assert reports == [(4, 4, 8), (6, 6, 3)]
    assert texts([f"{a}:2", f"{b}:0.5"]) == (got, reports)  # deterministic
    assert {tuple(texts([f"{b}:0.5"], seed=s)[0]) for s in range(8)} != {tuple(half)}  # the seed picks the half
    assert texts([f"{a}:0", str(b)])[0] == [f"b{i}" for i in range(6)]
    assert texts([f"{a}:1.5"])[0][:4] == ["a0", "a1", "a2", "a3"] and len(texts([f"{a}:1.5"])[0]) == 6
    with pytest.raises(DataError, match=r":-1: the mixing weight must be >= 0$"):
        parse_spec(f"{a}:-1")


def test_apply_weight_counts():
    import random

    items = list(range(10))
    assert apply_weight(items, 2.0, random.Random(0)) == items + items
    assert apply_weight(items, 0.0, random.Random(0)) == []
    assert len(apply_weight(items, 0.5, random.Random(0))) == 5
    assert apply_weight(items, 0.5, random.Random("x")) == apply_weight(items, 0.5, random.Random("x"))


def test_eval_split_is_deterministic():
    items = list(range(20))
    train, held = split_eval(items, 0.25, seed=1)
    assert len(held) == 5 and len(train) == 15
    assert sorted(train + held) == items and not set(train) & set(held)
    assert train == sorted(train) and held == sorted(held)
    assert split_eval(items, 0.25, seed=1) == (train, held)
    assert any(split_eval(items, 0.25, seed=s)[1] != held for s in range(2, 6))
    assert split_eval(items, 0.0, seed=1) == (items, [])
    assert split_eval([1], 0.5, seed=1) == ([1], [])
    assert len(split_eval(items, 0.01, seed=1)[1]) == 1  # at least one held out
    assert len(split_eval(items, 0.99, seed=1)[0]) == 1  # at least one left to train on


# ----------------------------------------------------------------------------------------------- real datasets
def test_real_hh_rlhf(shared_datasets):
    path = shared_datasets / "hh-rlhf-harmless-base-test.jsonl.gz"
    loaded = load_examples([str(path)], "preference", skip_invalid=True)
    [report] = loaded.reports
    assert (report.rows, report.examples, report.invalid, dict(report.formats)) == (2312, 2308, 4,
                                                                                     {"hh-rlhf": 2308})
    assert [str(e) for e, _ in loaded.problems] == [
        f"{path}:{line}: field 'chosen': empty assistant response after the shared dialogue"
        for line in (87, 517, 926, 1104)]
    first = loaded.examples[0]
    assert first.source == Source(str(path), 1) and first.raw is False
    assert [m.role for m in first.prompt] == [U, A, U, A, U]
    assert first.prompt[0] == Message(U, "what are some pranks with a pen i can do?")
    assert first.prompt[-1] == Message(U, "okay some of these do not have anything to do with pens")
    assert first.chosen == msgs((A, "No, sorry!  All of these involve a pen, the point is that you can get funny "
                                    "results by doing pranks with pens."))
    assert first.rejected[0].content.startswith("There are lots of funny things you can do with pens")
    for pair in loaded.examples:  # every prompt ends on a user turn and the responses differ
        assert pair.prompt[-1].role == U and pair.chosen != pair.rejected
        assert [m.role for m in pair.chosen[:1] + pair.rejected[:1]] == [A, A]
    with pytest.raises(DataError, match=r"hh-rlhf-harmless-base-test\.jsonl\.gz:87: field 'chosen': empty assistant "
                                        r"response after the shared dialogue \(3 more bad rows\)"):
        load_examples([str(path)], "preference")
    prompts = load_examples([str(path)], "prompt")
    assert len(prompts.examples) == 2312 and prompts.examples[0].prompt == first.prompt


def test_real_self_instruct_files(shared_datasets):
    t0 = load_examples([str(shared_datasets / "self-instruct-t0-amazon-polarity.jsonl")], "sft")
    assert len(t0.examples) == 200 and dict(t0.reports[0].formats) == {"prompt-completion": 200}
    answers = [ex.messages[1].content for ex in t0.examples]
    assert sorted(set(answers)) == ["Negative", "Positive"] and answers.count("Positive") == 111
    assert not any("<|endoftext|>" in m.content for ex in t0.examples for m in ex.messages)
    assert all(ex.raw for ex in t0.examples)
    assert t0.examples[0].messages[0].content.startswith("Title: Stuning even for the non-gamer\nReview: ")
    assert t0.examples[0].messages[0].content.endswith("\nIs the review positive or negative?\n")

    for name, rows in (("self-instruct-user-oriented-instructions.jsonl", 252),
                       ("self-instruct-seed-tasks.jsonl", 175)):
        loaded = load_examples([str(shared_datasets / name)], "sft")
        assert (loaded.reports[0].rows, len(loaded.examples), dict(loaded.reports[0].formats)) == (
            rows, rows, {"instances": rows})
    first = json.loads((shared_datasets / "self-instruct-seed-tasks.jsonl").open().readline())
    example = loaded.examples[0]
    assert example.messages == msgs((U, first["instruction"]), (A, first["instances"][0]["output"]))
    assert first["instances"][0]["input"] == ""


# -------------------------------------------------------------------------------------------------------- bad rows
def write_bad_preference_file(path: Path) -> list[dict]:
    """Seven bad rows between three good ones; returns the good rows."""
    good = [{"prompt": "Q1", "chosen": "A", "rejected": "B"}, {"prompt": "Q2", "chosen": "C<|endoftext|>",
                                                               "rejected": "D"},
            {"prompt": [{"role": "user", "content": "Q3"}], "chosen": "E", "rejected": "F"}]
    lines = [json.dumps(good[0]).encode(),
             b'{"prompt": "Q", "chosen": "A"',
             json.dumps({"prompt": "Q", "rejected": "B"}).encode(),
             json.dumps({"prompt": "Q", "chosen": 5, "rejected": "B"}).encode(),
             json.dumps({"prompt": "Q", "chosen": "  ", "rejected": "B"}).encode(),
             json.dumps(good[1]).encode(),
             json.dumps({"prompt": "Q", "chosen": "same<|endoftext|>", "rejected": "same"}).encode(),
             json.dumps({"prompt": [{"role": "robot", "content": "x"}], "chosen": "A", "rejected": "B"}).encode(),
             b'{"prompt": "Q\xff", "chosen": "A", "rejected": "B"}',
             json.dumps(good[2]).encode()]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return good


BAD_REASONS = [
    (2, None, "malformed JSON (Expecting ',' delimiter at column 30)"),
    (3, "chosen", "missing (a preference row needs 'chosen' and 'rejected')"),
    (4, "chosen", "expected a string, got int"),
    (5, "chosen", "empty (expected non-empty text)"),
    (7, "rejected", "identical to 'chosen' (a pair needs two different responses)"),
    (8, "prompt[0].role", "unknown role 'robot' (expected one of assistant, bot, gpt, human, model, system, user)"),
    (9, None, "not valid UTF-8 (byte 0xff at column 14)"),
]


def test_each_bad_row_names_file_line_and_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    write_bad_preference_file(path)
    loaded = load_examples([str(path)], "preference", skip_invalid=True)
    assert [str(e) for e, _ in loaded.problems] == [
        f"{path}:{line}: " + (f"field '{field}': " if field else "") + reason for line, field, reason in BAD_REASONS]
    assert [(e.source.line, e.field, e.message) for e, _ in loaded.problems] == BAD_REASONS


def test_default_load_stops_with_the_first_bad_row(tmp_path):
    path = tmp_path / "bad.jsonl"
    write_bad_preference_file(path)
    with pytest.raises(DataError) as info:
        load_examples([str(path)], "preference")
    assert str(info.value) == (f"{path}:2: malformed JSON (Expecting ',' delimiter at column 30) (6 more bad rows). "
                               "`rlhfkit data check` lists every problem; --skip-invalid skips bad rows and records "
                               "them")
    write_jsonl(path, [{"prompt": "Q", "chosen": "A", "rejected": "B"}, {"prompt": "Q", "chosen": "A"}])
    with pytest.raises(DataError) as info:
        load_examples([str(path)], "preference")
    assert (info.value.source, info.value.field) == (Source(str(path), 2), "rejected")
    assert str(info.value) == (f"{path}:2: field 'rejected': missing (a preference row needs 'chosen' and "
                               "'rejected'). `rlhfkit data check` lists every problem; --skip-invalid skips bad rows "
                               "and records them")


def test_skip_invalid_counts_records_and_loses_nothing_valid(tmp_path):
    path, skipped = tmp_path / "bad.jsonl", tmp_path / "skipped.jsonl"
    write_bad_preference_file(path)
    loaded = load_examples([str(path)], "preference", skip_invalid=True, skipped_file=skipped)
    [report] = loaded.reports
    assert (report.rows, report.examples, report.invalid, report.used) == (10, 3, 7, 3)
    assert [(ex.prompt, ex.chosen, ex.rejected, ex.source.line) for ex in loaded.examples] == [
        (msgs((U, "Q1")), msgs((A, "A")), msgs((A, "B")), 1), (msgs((U, "Q2")), msgs((A, "C")), msgs((A, "D")), 6),
        (msgs((U, "Q3")), msgs((A, "E")), msgs((A, "F")), 10)]
    records = [json.loads(line) for line in skipped.read_text(encoding="utf-8").splitlines()]
    # rows that could not be parsed keep their text (bad bytes as U+FFFD)
    rows = ['{"prompt": "Q", "chosen": "A"', {"prompt": "Q", "rejected": "B"},
            {"prompt": "Q", "chosen": 5, "rejected": "B"}, {"prompt": "Q", "chosen": "  ", "rejected": "B"},
            {"prompt": "Q", "chosen": "same<|endoftext|>", "rejected": "same"},
            {"prompt": [{"role": "robot", "content": "x"}], "chosen": "A", "rejected": "B"},
            '{"prompt": "Q\ufffd", "chosen": "A", "rejected": "B"}']
    assert records == [{"file": str(path), "line": line, "field": field, "reason": reason, "row": row}
                       for (line, field, reason), row in zip(BAD_REASONS, rows)]
    # no file is written when nothing was skipped
    clean = write_jsonl(tmp_path / "clean.jsonl", [{"prompt": "Q", "chosen": "A", "rejected": "B"}])
    load_examples([str(clean)], "preference", skip_invalid=True, skipped_file=tmp_path / "none.jsonl")
    assert not (tmp_path / "none.jsonl").exists()


def test_bad_elements_in_a_json_array(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  7,\n  {"instruction": "c",\n   "output": 3},\n'
                    '  {"instruction": "d", "output": "e"}\n]\n')
    loaded = load_examples([str(path)], "sft", skip_invalid=True)
    assert [str(e) for e, _ in loaded.problems] == [f"{path}:3: expected a JSON object, got int",
                                                    f"{path}:4: field 'output': expected a string, got int"]
    assert [(ex.messages, ex.source.line) for ex in loaded.examples] == [(msgs((U, "a"), (A, "b")), 2),
                                                                          (msgs((U, "d"), (A, "e")), 6)]
    # a syntax error inside the array: reported at its line, the rest of the file cannot be located
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c" "output": "d"}\n]\n')
    loaded = load_examples([str(path)], "sft", skip_invalid=True)
    assert [str(e) for e, _ in loaded.problems] == [
        f"{path}:3: malformed JSON (Expecting ',' delimiter at column 23); rest of file not read"]
    assert len(loaded.examples) == 1
    path.write_text('[\n  {"instruction": "a", "output": "b"}\n')
    assert [str(e) for e, _ in load_examples([str(path)], "sft", skip_invalid=True).problems] == [
        f"{path}:3: malformed JSON (the array is not closed with ']')"]


def test_non_utf8_in_json_array_and_csv(tmp_path):
    path = tmp_path / "d.json"
    path.write_bytes(b'[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "\xc3(", "output": "b"}\n]\n')
    assert [str(e) for e, _ in load_examples([str(path)], "sft", skip_invalid=True).problems] == [
        f"{path}:3: not valid UTF-8 (byte 0xc3 at column 20)"]
    path = tmp_path / "d.csv"
    path.write_bytes(b"instruction,output\na,b\nc,\xfed\n")
    assert [str(e) for e, _ in load_examples([str(path)], "sft", skip_invalid=True).problems] == [
        f"{path}:3: not valid UTF-8 (byte 0xfe at column 3)"]


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\n["a", "b"]\n')
    loaded = load_examples([str(path)], "text", skip_invalid=True)
    assert [str(e) for e, _ in loaded.problems] == [f"{path}:2: expected a JSON object, got list"]
    assert [ex.messages for ex in loaded.examples] == [msgs((A, "ok"))]


def test_read_rows_sources(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"a": 1}, {"a": 2}])
    assert list(read_rows(path)) == [(Source(str(path), 1), {"a": 1}), (Source(str(path), 2), {"a": 2})]
