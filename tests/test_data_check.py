"""`rlhfkit data check`: the detected format, counts, length percentiles and every problem at once, through the CLI."""

from __future__ import annotations

import json
import logging
import re

import pytest

from conftest import write_jsonl
from rlhfkit.cli import main
from rlhfkit.data.check import check_file, percentiles

ROW_RE = re.compile(r"^│ (\w+)\s*│\s*(\d+) │\s*(\d+) │\s*(\d+) │\s*(\d+) │$")


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    """Rich wraps at 80 columns when it is not writing to a terminal; long tmp paths would split the lines."""
    monkeypatch.setenv("COLUMNS", "400")


@pytest.fixture(autouse=True)
def restore_logging():
    """`data check --tokenizer` sets up the rlhfkit log handler on the sys.stderr of the moment (capsys's, closed after
    the test); remove it again so that later tests do not log into a closed stream."""
    logger = logging.getLogger("rlhfkit")
    handlers, level = list(logger.handlers), logger.level
    yield
    logger.handlers[:] = handlers
    logger.setLevel(level)


def preference_file(tmp_path):
    """Ten good rows (prompt k words, chosen 2 words, rejected 1 word, but 4 in the last) and three bad ones."""
    rows = [{"prompt": " ".join(["w"] * k), "chosen": "a b", "rejected": "c"} for k in range(1, 11)]
    rows[-1]["rejected"] = "c d e f"  # the longer response counts
    rows[3:3] = [{"prompt": "q", "chosen": "same", "rejected": "same"}]
    rows[7:7] = [{"prompt": "q", "chosen": "a"}]
    path = write_jsonl(tmp_path / "prefs.jsonl", rows)
    with open(path, "a") as f:
        f.write('{"prompt": "q", "chosen": \n')
    return path


PROBLEMS = ["{p}:4: field 'rejected': identical to 'chosen' (a pair needs two different responses)",
            "{p}:8: field 'rejected': missing (a preference row needs 'chosen' and 'rejected')",
            "{p}:13: malformed JSON (Expecting value at column 27)"]


def run_cli(capsys, *argv):
    code = main(["data", "check", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def table(out: str) -> dict[str, tuple[int, ...]]:
    return {m[1]: tuple(int(x) for x in m.groups()[1:]) for line in out.splitlines() if (m := ROW_RE.match(line))}


def test_percentiles():
    assert percentiles(list(range(101, 0, -1))) == {"p50": 51, "p90": 91, "p99": 100, "max": 101}
    assert percentiles([7]) == {"p50": 7, "p90": 7, "p99": 7, "max": 7}
    assert percentiles([]) == {}


def test_check_file_counts_formats_problems_and_word_lengths(tmp_path):
    path = preference_file(tmp_path)
    report = check_file(str(path), "preference")
    assert (report.rows, report.examples, dict(report.formats), report.unit) == (
        13, 10, {"prompt-chosen-rejected": 10}, "words")
    assert [str(p) for p in report.problems] == [p.format(p=path) for p in PROBLEMS]
    assert report.lengths == {"prompt": list(range(1, 11)), "response": [2] * 9 + [4],
                              "total": list(range(3, 12)) + [14]}
    assert report.encode is None
    # a mixing weight in the spec is ignored by the check
    assert check_file(f"{path}:0.5", "preference").examples == 10


def test_cli_reports_format_counts_lengths_and_every_problem(tmp_path, capsys):
    path = preference_file(tmp_path)
    code, out, err = run_cli(capsys, path, "--kind", "preference")
    assert code == 1 and err == ""
    lines = out.splitlines()
    assert lines[0] == (f"{path} as preference: 13 rows, 10 examples, 3 with problems; "
                        "format: prompt-chosen-rejected (10)")
    assert "lengths in words" in out
    assert table(out) == {"prompt": (5, 9, 10, 10), "response": (2, 2, 4, 4), "total": (7, 11, 14, 14)}
    assert [line for line in lines if line.startswith("  problem ")] == [
        "  problem " + p.format(p=path) for p in PROBLEMS]


def test_cli_clean_file_exits_0(tmp_path, capsys):
    path = write_jsonl(tmp_path / "clean.jsonl", [
        {"messages": [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello you all"}]},
        {"instruction": "Say hi.", "output": "hi"}, {"instruction": "Say hi.", "output": "hi"}])
    code, out, _ = run_cli(capsys, path, "--kind", "sft")
    assert code == 0
    assert out.splitlines()[0] == f"{path} as sft: 3 rows, 3 examples, 0 with problems; format: alpaca (2), chat (1)"
    assert table(out) == {"prompt": (2, 2, 2, 2), "response": (1, 3, 3, 3), "total": (3, 5, 5, 5)}
    assert "problem" not in out.replace("0 with problems", "")


def test_cli_several_files_and_folders(tmp_path, capsys):
    bad = preference_file(tmp_path)
    (tmp_path / "good").mkdir()
    good = write_jsonl(tmp_path / "good" / "g.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    code, out, _ = run_cli(capsys, good.parent, bad, "--kind", "preference")
    assert code == 1
    headers = [line for line in out.splitlines() if " as preference: " in line]
    assert headers == [f"{good.parent} as preference: 1 rows, 1 examples, 0 with problems; "
                       "format: prompt-chosen-rejected (1)",
                       f"{bad} as preference: 13 rows, 10 examples, 3 with problems; "
                       "format: prompt-chosen-rejected (10)"]
    code, _, _ = run_cli(capsys, good.parent, "--kind", "preference")
    assert code == 0


def test_cli_with_tokenizer_reports_token_lengths(tmp_path, capsys, tokenizer, tokenizer_dir):
    prompt, chosen, rejected = "\n\nHuman: What color is item 3?\n\nAssistant:", " Item 3 is red.", " No."
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": prompt, "chosen": chosen, "rejected": rejected}])

    def n(text):
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    prompt_tokens, response_tokens = 1 + n(prompt), n(chosen) + 1  # BOS + prompt; longer response + EOS
    code, out, _ = run_cli(capsys, path, "--kind", "preference", "--tokenizer", tokenizer_dir)
    assert code == 0
    assert "lengths in tokens" in out and "lengths in words" not in out
    total = prompt_tokens + response_tokens
    assert table(out) == {"prompt": (prompt_tokens,) * 4, "response": (response_tokens,) * 4, "total": (total,) * 4}
    assert "at max_len 512: 0 would be truncated from the prompt side, 0 dropped" in out
    # max_len counts what training would cut: 2 prompt tokens cut, then a response that cannot fit
    code, out, _ = run_cli(capsys, path, "--kind", "preference", "--tokenizer", tokenizer_dir,
                           "--max-len", total - 2)
    assert "at max_len %d: 1 would be truncated from the prompt side, 0 dropped" % (total - 2) in out
    code, out, _ = run_cli(capsys, path, "--kind", "preference", "--tokenizer", tokenizer_dir,
                           "--max-len", response_tokens + 1)
    assert "at max_len %d: 0 would be truncated from the prompt side, 1 dropped" % (response_tokens + 1) in out


def test_check_file_token_lengths_for_sft_and_prompts(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "s.jsonl", [{"messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "how are you"}, {"role": "assistant", "content": "fine"}]}])

    def n(text):
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    report = check_file(str(path), "sft", tokenizer=tokenizer, template="human-assistant")
    trained = n(" hello") + n(" fine") + 2
    untrained = 1 + n("\n\nHuman: hi") + 2 * n("\n\nAssistant:") + n("\n\nHuman: how are you")
    assert report.unit == "tokens"
    assert report.lengths == {"prompt": [untrained], "response": [trained], "total": [untrained + trained]}
    report = check_file(str(path), "prompt", tokenizer=tokenizer, template="human-assistant")
    assert [str(p) for p in report.problems] == [f"{path}:1: field 'messages': a prompt must end on a user turn"]


def test_cli_missing_file_and_bad_kind(tmp_path, capsys):
    code, out, err = run_cli(capsys, tmp_path / "nope.jsonl", "--kind", "sft")
    assert code == 2 and err == f"rlhfkit data: error: {tmp_path / 'nope.jsonl'}: no such file or folder\n"
    with pytest.raises(SystemExit) as info:
        run_cli(capsys, tmp_path / "nope.jsonl", "--kind", "pairs")
    assert info.value.code == 2


def test_cli_real_hh_rlhf(shared_datasets, capsys):
    path = shared_datasets / "hh-rlhf-harmless-base-test.jsonl.gz"
    code, out, _ = run_cli(capsys, path, "--kind", "preference")
    assert code == 1
    assert out.splitlines()[0] == (f"{path} as preference: 2312 rows, 2308 examples, 4 with problems; "
                                   "format: hh-rlhf (2308)")
    assert [line for line in out.splitlines() if line.startswith("  problem ")] == [
        f"  problem {path}:{line}: field 'chosen': empty assistant response after the shared dialogue"
        for line in (87, 517, 926, 1104)]
    assert json.dumps(sorted(table(out))) == '["prompt", "response", "total"]'
