"""Files that cannot be read (truncated or non-gzip .gz, damaged parquet, huge CSV cells, deep JSON, bad bytes): one
line naming the file and line, exit 2, what can be read kept with --skip-invalid; rows that used to be wrongly refused
(a byte-order mark, a CSV margin) or wrongly accepted (a NaN margin, extra CSV cells, a response ending on a user turn,
text after a JSON array); and `rlhfkit data check`'s exit codes (1 for bad rows and empty files, 2 for damage)."""

from __future__ import annotations

import gzip
import json
import logging
import zlib

import pytest

from conftest import write_jsonl
from rlhfkit.cli import main
from rlhfkit.data.formats import Message
from rlhfkit.data.loading import load_examples
from rlhfkit.data.readers import DataError

SUFFIX = ". `rlhfkit data check` lists every problem; --skip-invalid skips bad rows and records them"


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # rich would wrap long tmp paths at 80 columns


@pytest.fixture(autouse=True)
def restore_logging():
    """A stage sets up the rlhfkit log handler on capsys's stderr; remove it again after the test."""
    logger = logging.getLogger("rlhfkit")
    handlers, level = list(logger.handlers), logger.level
    yield
    logger.handlers[:] = handlers
    logger.setLevel(level)


def pair(k: int) -> dict:
    return {"prompt": f"question {k}", "chosen": f"good answer {k}", "rejected": "no"}


def jsonl_bytes(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def load_error(path, kind: str = "preference") -> str:
    """The one-line message that a training stage stops with."""
    with pytest.raises(DataError) as info:
        load_examples([str(path)], kind)
    return str(info.value)


def skipped(path, kind: str = "preference"):
    """(kept examples, problem messages, skipped-file records) with skip_invalid."""
    out = path.parent / "skipped.jsonl"
    out.unlink(missing_ok=True)
    loaded = load_examples([str(path)], kind, skip_invalid=True, skipped_file=out)
    records = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    return loaded.examples, [str(e) for e, _ in loaded.problems], records


def check(capsys, *argv) -> tuple[int, str, str]:
    code = main(["data", "check", *map(str, argv)])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def header(out: str) -> str:
    return out.splitlines()[0]


def problems(out: str) -> list[str]:
    return [line.removeprefix("  problem ") for line in out.splitlines() if line.startswith("  problem ")]


# ------------------------------------------------------------------------------------------ rows: margins and responses
def test_csv_margin_is_a_number(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,chosen,rejected,margin\nq1,a,b,0.5\nq2,a,b,\nq3,a,b,-2\n")
    examples = load_examples([str(path)], "preference").examples
    assert [ex.margin for ex in examples] == [0.5, 0.0, -2.0]
    path.write_text("prompt,chosen,rejected,margin\nq1,a,b,high\n")
    assert load_error(path) == f"{path}:2: field 'margin': expected a number, got str{SUFFIX}"


def test_non_finite_margins_are_refused(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = ['{"prompt": "q", "chosen": "a", "rejected": "b", "margin": NaN}',
             '{"prompt": "q", "chosen": "a", "rejected": "b", "margin": "nan"}',
             '{"prompt": "q", "chosen": "a", "rejected": "b", "margin": -Infinity}',
             '{"prompt": "q", "chosen": "a", "rejected": "b", "margin": 1e999}',
             '{"prompt": "q", "chosen": "a", "rejected": "b", "margin": 1' + "0" * 400 + "}",
             '{"prompt": "q", "chosen": "a", "rejected": "b", "margin": 1.5}']
    path.write_text("\n".join(lines) + "\n")
    examples, messages, _ = skipped(path)
    assert [ex.margin for ex in examples] == [1.5]
    assert messages == [f"{path}:1: field 'margin': expected a finite number, got nan",
                        f"{path}:2: field 'margin': expected a finite number, got 'nan'",
                        f"{path}:3: field 'margin': expected a finite number, got -inf",
                        f"{path}:4: field 'margin': expected a finite number, got inf",
                        f"{path}:5: field 'margin': expected a finite number, got an integer beyond the float range"]
    path = tmp_path / "d.csv"
    path.write_text("prompt,chosen,rejected,margin\nq,a,b,inf\nq,a,b,NaN\n")
    assert skipped(path)[1] == [f"{path}:2: field 'margin': expected a finite number, got 'inf'",
                                f"{path}:3: field 'margin': expected a finite number, got 'NaN'"]


def test_a_response_must_end_with_an_assistant_message(tmp_path):
    def conversation(*turns):
        return [{"role": role, "content": text} for role, text in turns]

    rows = [{"prompt": "q", "chosen": conversation(("user", "tell me")), "rejected": "no"},
            {"prompt": "q", "chosen": "yes", "rejected": conversation(("assistant", "a"), ("system", "b"))},
            {"chosen": conversation(("user", "q"), ("assistant", "a"), ("user", "more?")),
             "rejected": conversation(("user", "q"), ("assistant", "b"))},
            {"chosen": conversation(("user", "q"), ("assistant", "a"), ("user", "more?"), ("assistant", "yes")),
             "rejected": conversation(("user", "q"), ("assistant", "b"))}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    examples, messages, _ = skipped(path)
    assert [ex.source.line for ex in examples] == [4]
    assert messages == [
        f"{path}:1: field 'chosen': the response ends with a user message (it must end with an assistant message)",
        f"{path}:2: field 'rejected': the response ends with a system message (it must end with an assistant "
        "message)",
        f"{path}:3: field 'chosen': the response ends with a user message (it must end with an assistant message)"]


def test_lone_surrogates_are_not_text(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "q\\ud800", "chosen": "a", "rejected": "b"}\n'
                    '{"prompt": [{"role": "user", "content": "\\udc80"}], "chosen": "a", "rejected": "b"}\n'
                    '{"prompt": "\\ud83d\\ude00", "chosen": "a", "rejected": "b"}\n'  # a pair: one character
                    '{"prompt": "q", "chosen": 5, "rejected": "b", "note": "\\udc80"}\n')
    examples, messages, records = skipped(path)
    assert [ex.prompt[0].content for ex in examples] == ["\U0001f600"]
    assert messages == [
        f"{path}:1: field 'prompt': holds a lone surrogate '\\ud800' (half of a UTF-16 pair, not text)",
        f"{path}:2: field 'prompt[0].content': holds a lone surrogate '\\udc80' (half of a UTF-16 pair, not text)",
        f"{path}:4: field 'chosen': expected a string, got int"]
    # the skipped-rows file writes them back as the same escapes
    assert [records[0]["row"]["prompt"], records[2]["row"]["note"]] == ["q\ud800", "\udc80"]


# ----------------------------------------- files: damage, bad bytes, byte-order marks, extra cells, text after an array
def truncated_gzip(tmp_path, rows: int = 300):
    """A .jsonl.gz cut at two thirds of its bytes, and the number of whole lines before the cut (worked out with
    zlib, which decompresses whatever a cut stream holds)."""
    data = jsonl_bytes([pair(k) for k in range(rows)])
    packed = gzip.compress(data, mtime=0)
    cut = packed[: len(packed) * 2 // 3]
    readable = zlib.decompressobj(wbits=31).decompress(cut)
    path = tmp_path / "pairs.jsonl.gz"
    path.write_bytes(cut)
    return path, readable.count(b"\n")


def test_truncated_gzip_keeps_the_rows_before_the_cut(tmp_path, capsys):
    path, whole = truncated_gzip(tmp_path)
    assert 50 < whole < 290
    reason = "the gzip data ends early (truncated file); the rows from this line on are lost"
    assert load_error(path) == f"{path}:{whole + 1}: {reason}{SUFFIX}"
    examples, messages, records = skipped(path)
    assert [ex.prompt[0].content for ex in examples] == [f"question {k}" for k in range(whole)]
    assert messages == [f"{path}:{whole + 1}: {reason}"]
    assert records == [{"file": str(path), "line": whole + 1, "field": None, "reason": reason, "row": None}]
    code, out, err = check(capsys, path, "--kind", "preference")
    assert code == 2
    assert err == f"rlhfkit data: error: {path}:{whole + 1}: {reason}\n"
    assert header(out) == (f"{path} as preference: {whole} rows, {whole} examples, 0 with problems; "
                           f"format: prompt-chosen-rejected ({whole})")


def test_gzip_damage_other_than_truncation(tmp_path):
    path = tmp_path / "plain.jsonl.gz"  # not compressed at all
    path.write_bytes(jsonl_bytes([pair(1)]))
    assert load_error(path) == f"{path}: not a gzip file (the name ends in .gz){SUFFIX}"
    assert skipped(path)[1:] == ([f"{path}: not a gzip file (the name ends in .gz)"], [
        {"file": str(path), "line": None, "field": None, "reason": "not a gzip file (the name ends in .gz)",
         "row": None}])
    # a good member, then bytes that are not gzip: the member's rows are kept
    path.write_bytes(gzip.compress(jsonl_bytes([pair(1), pair(2)])) + b"junk")
    examples, messages, _ = skipped(path)
    assert len(examples) == 2
    assert messages == [f"{path}:3: damaged gzip data (Not a gzipped file (b'ju')); the rows from this line on are "
                        "lost"]
    # a bad byte in the header's method field: nothing can be read
    packed = bytearray(gzip.compress(jsonl_bytes([pair(1)])))
    packed[2] = 7
    path.write_bytes(bytes(packed))
    assert load_error(path) == f"{path}: damaged gzip data (Unknown compression method); nothing could be read{SUFFIX}"


def test_corrupt_parquet(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = tmp_path / "good.parquet"
    pq.write_table(pa.Table.from_pylist([pair(k) for k in range(6)]), good, row_group_size=2, compression="none")
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(good.read_bytes()[:300])
    message = load_error(cut)
    assert message.startswith(f"{cut}: not a readable parquet file (Parquet magic bytes not found in footer.")
    assert "\n" not in message
    code, _, err = check(capsys, cut, "--kind", "preference")
    assert code == 2 and err.startswith(f"rlhfkit data: error: {cut}: not a readable parquet file (")
    assert err.count("\n") == 1
    # the pages of the second row group overwritten: rows 3 and 4 are lost, the others kept
    column = pq.ParquetFile(good).metadata.row_group(1).column(0)
    start = column.dictionary_page_offset or column.data_page_offset
    damaged = bytearray(good.read_bytes())
    damaged[start:start + column.total_compressed_size] = b"\xff" * column.total_compressed_size
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(bytes(damaged))
    examples, messages, records = skipped(bad)
    assert [ex.source.line for ex in examples] == [1, 2, 5, 6]
    assert len(messages) == 1 and messages[0].startswith(f"{bad} row 3: rows 3-4 (row group 1) cannot be read (")
    assert "\n" not in messages[0]
    assert (records[0]["file"], records[0]["row"]) == (str(bad), None)


def test_csv_cell_longer_than_the_csv_module_default(tmp_path):
    path = tmp_path / "long.csv"
    long = "word " * 40_000  # 200,000 characters; csv's default limit is 131,072
    path.write_text(f"prompt,chosen,rejected\nq,{long},no\nq2,yes,no\n")
    examples = load_examples([str(path)], "preference").examples
    assert [(ex.chosen, ex.source.line) for ex in examples] == [([Message("assistant", long)], 2),
                                                                ([Message("assistant", "yes")], 3)]


def test_deeply_nested_json_is_a_bad_row(tmp_path, capsys):
    deep = '{"prompt": ' + "[" * 50_000 + "]" * 50_000 + ', "chosen": "a", "rejected": "b"}'
    path = tmp_path / "deep.jsonl"
    path.write_text(json.dumps(pair(1)) + "\n" + deep + "\n" + json.dumps(pair(3)) + "\n")
    assert load_error(path) == f"{path}:2: JSON nested too deeply to read{SUFFIX}"
    examples, messages, records = skipped(path)
    assert [ex.source.line for ex in examples] == [1, 3]
    assert messages == [f"{path}:2: JSON nested too deeply to read"] and records[0]["row"] == deep
    code, out, err = check(capsys, path, "--kind", "preference")
    assert (code, err, problems(out)) == (1, "", [f"{path}:2: JSON nested too deeply to read"])
    # in a JSON array the element is skipped whole and the elements after it are read
    array = tmp_path / "deep.json"
    array.write_text("[\n" + json.dumps(pair(1)) + ",\n" + deep + ",\n" + json.dumps(pair(3)) + "\n]\n")
    examples, messages, _ = skipped(array)
    assert [ex.source.line for ex in examples] == [2, 4]
    assert messages == [f"{array}:3: JSON nested too deeply to read"]
    # never closed: the rest of the file cannot be read
    array.write_text("[\n" + json.dumps(pair(1)) + ",\n" + deep[:60_000] + "\n]\n")
    examples, messages, _ = skipped(array)
    assert len(examples) == 1 and messages == [f"{array}:3: JSON nested too deeply to read; rest of file not read"]


def test_a_stage_stops_with_one_line_naming_the_file(tiny_models, tmp_path, capsys):
    path, whole = truncated_gzip(tmp_path)
    out = tmp_path / "out"
    code = main(["rm", "--model", str(tiny_models["llama"]), "--data", str(path), "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    # the error is the last line (before it, at most the run's log: which dtype `auto` chose, once per process)
    assert err.splitlines()[-1] == (f"rlhfkit rm: error: {path}:{whole + 1}: the gzip data ends early (truncated "
                                    f"file); the rows from this line on are lost{SUFFIX}")
    assert "Traceback" not in err and len(err.splitlines()) <= 2
    assert not (out / "final").exists()


def test_bad_bytes_in_csv_and_json_array_lose_only_their_rows(tmp_path, capsys):
    path = tmp_path / "d.csv"
    path.write_bytes(b"prompt,chosen,rejected\nq1,a,b\nq2,\xff,b\n\nq3,\"x\ny\",b\nq4,c,d\xc3(\n")
    examples, messages, records = skipped(path)
    assert [(ex.prompt[0].content, ex.source.line) for ex in examples] == [("q1", 2), ("q3", 5)]
    assert messages == [f"{path}:3: not valid UTF-8 (byte 0xff at column 4)",
                        f"{path}:7: not valid UTF-8 (byte 0xc3 at column 7)"]
    assert [r["row"] for r in records] == ["q2,\ufffd,b\n", "q4,c,d\ufffd(\n"]
    path = tmp_path / "d.json"
    path.write_bytes(b'[\n  {"prompt": "q1", "chosen": "a", "rejected": "b"},\n  {"prompt": "q2\xfe", "chosen": "a",'
                     b' "rejected": "b"},\n  {"prompt": "q3", "chosen": "a", "rejected": "b"}\n]\n')
    examples, messages, _ = skipped(path)
    assert [(ex.prompt[0].content, ex.source.line) for ex in examples] == [("q1", 2), ("q3", 4)]
    assert messages == [f"{path}:3: not valid UTF-8 (byte 0xfe at column 17)"]
    code, out, err = check(capsys, path, "--kind", "preference")
    assert (code, err, problems(out)) == (1, "", messages)


def test_bad_bytes_in_a_csv_header_or_outside_a_json_string(tmp_path, capsys):
    path = tmp_path / "d.csv"
    path.write_bytes(b"prompt,cho\xffsen,rejected\nq1,a,b\n")
    message = "not valid UTF-8 (byte 0xff at column 11) in the header; the columns are unknown"
    assert load_error(path) == f"{path}:1: {message}{SUFFIX}"
    code, _, err = check(capsys, path, "--kind", "preference")
    assert (code, err) == (2, f"rlhfkit data: error: {path}:1: {message}\n")
    # a bad byte where JSON syntax should be: named as such, the elements before it kept
    path = tmp_path / "d.json"
    path.write_bytes(b'[{"prompt": "q1", "chosen": "a", "rejected": "b"},\n {"prompt": "q2"\xff}]')
    examples, messages, _ = skipped(path)
    assert len(examples) == 1
    assert messages == [f"{path}:2: not valid UTF-8 (byte 0xff at column 17); rest of file not read"]


@pytest.mark.parametrize("name", ["d.jsonl", "d.json", "d.csv"])
def test_a_byte_order_mark_is_not_data(tmp_path, name):
    rows = [pair(1), pair(2)]
    if name.endswith(".jsonl"):
        data = jsonl_bytes(rows)
    elif name.endswith(".json"):
        data = json.dumps(rows, indent=1).encode()
    else:
        data = b"prompt,chosen,rejected\r\n" + b"".join(f"{r['prompt']},{r['chosen']},no\r\n".encode() for r in rows)
    path = tmp_path / name
    path.write_bytes(b"\xef\xbb\xbf" + data)
    examples = load_examples([str(path)], "preference").examples
    assert [ex.prompt[0].content for ex in examples] == ["question 1", "question 2"]


def test_csv_row_with_more_cells_than_the_header(tmp_path):
    path = tmp_path / "prompts.csv"
    path.write_text("prompt,topic\nhello,greeting\nhi,greeting,extra,more\n")
    message = "4 fields, but the header names 2 columns"
    assert load_error(path, "prompt") == f"{path}:3: {message}{SUFFIX}"
    examples, messages, records = skipped(path, "prompt")
    assert [(ex.prompt[0].content, ex.extra) for ex in examples] == [("hello", {"topic": "greeting"})]
    assert messages == [f"{path}:3: {message}"] and records[0]["row"] == "hi,greeting,extra,more\n"


def test_text_after_a_json_array(tmp_path, capsys):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([pair(1), pair(2)], indent=1) + "\n\n" + json.dumps(pair(3)) + "\n")
    message = f"{path}:14: text after the array's closing ']' (a .json file holds one array, or one object per line)"
    assert load_error(path) == message + SUFFIX
    examples, messages, records = skipped(path)
    assert len(examples) == 2 and messages == [message] and records[0]["row"] == json.dumps(pair(3))
    code, out, err = check(capsys, path, "--kind", "preference")
    assert (code, err, problems(out)) == (1, "", [message])


def test_messages_from_libraries_are_one_printable_line(tmp_path):
    from rlhfkit.data.readers import _one_line

    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "q", "chosen": "a\n')
    assert skipped(path)[1] == [f"{path}:1: malformed JSON (Unterminated string starting at column 27)"]
    # pyarrow's messages span lines and quote the damaged bytes
    assert _one_line(OSError("Couldn't deserialize thrift: don't know what type: \x0f\nDeserializing page header "
                             "failed.\n")) == ("Couldn't deserialize thrift: don't know what type: \\x0f "
                                               "Deserializing page header failed.")


# ---------------------------------------------------------------------------------------------- data check's exit codes
def test_data_check_exit_codes_and_empty_files(tmp_path, capsys):
    good = write_jsonl(tmp_path / "good.jsonl", [pair(1)])
    bad = write_jsonl(tmp_path / "bad.jsonl", [pair(1), {"prompt": "q", "chosen": "a"}])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    damaged, _ = truncated_gzip(tmp_path)
    assert check(capsys, good, "--kind", "preference")[0] == 0
    code, out, err = check(capsys, empty, "--kind", "preference")
    assert (code, err) == (1, "")
    assert header(out) == f"{empty} as preference: 0 rows, 0 examples, 1 with problems; format: none"
    assert problems(out) == [f"{empty}: the file holds no rows"]
    assert check(capsys, good, bad, "--kind", "preference")[0] == 1
    # damage anywhere: exit 2, after every file's report
    code, out, err = check(capsys, damaged, bad, "--kind", "preference")
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"rlhfkit data: error: {damaged}:")
    assert [line.split(" as ")[0] for line in out.splitlines() if " as preference: " in line] == [str(damaged),
                                                                                                   str(bad)]
    # an empty file inside a folder is named
    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [pair(1)])
    (folder / "b.csv").write_text("")
    code, out, _ = check(capsys, folder, "--kind", "preference")
    assert code == 1 and problems(out) == [f"{folder / 'b.csv'}: the file holds no rows"]
