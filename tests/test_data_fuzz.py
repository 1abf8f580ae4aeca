"""Randomly damaged copies of valid data files (every file type, every kind) never end in a traceback: loading gives
examples or a DataError / ConfigError naming the file, and `rlhfkit data check` exits 0, 1 or 2 with no traceback.

Seeded (random.Random), so a failure names the case that reproduces it: `damaged_file(tmp_path, seed)`.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import random
import subprocess
import sys

import pytest

from rlhfkit.cli import main
from rlhfkit.config import ConfigError
from rlhfkit.data.loading import load_examples
from rlhfkit.data.readers import DataError

CASES = 400
FILE_TYPES = (".jsonl", ".jsonl.gz", ".json", ".csv", ".parquet")
# Bytes that break JSON and CSV structure more often than random ones do, and runs of them that reach rarer paths.
STRUCTURE = b'{}[],:"\\\n\r \x00\xef\xbb\xbf\xff\xc3'
TOKENS = (b"\\ud800", b"NaN", b"-Infinity", b"1e999", b"9" * 400, b"[" * 5000, b"\xef\xbb\xbf", b'"margin": NaN, ',
          b'"x"', b"\r\n\r\n")


def messages(*turns: str) -> list[dict]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": text} for i, text in enumerate(turns)]


def flat_rows(kind: str, rng: random.Random) -> list[dict]:
    """Rows that a CSV file can hold too: every value a string."""
    n = rng.randint(2, 8)
    if kind == "sft":
        return [{"instruction": f"What color is item {k}?", "input": "", "output": f"Item {k} is red."}
                for k in range(n)]
    if kind == "preference":
        return [{"prompt": f"Question {k}?", "chosen": f"Answer {k}.", "rejected": "No.", "margin": f"{k / 2}"}
                for k in range(n)]
    if kind == "prompt":
        return [{"prompt": f"Tell me about {k}.", "topic": f"t{k}"} for k in range(n)]
    return [{"text": f"Paris is a city number {k}."} for k in range(n)]


def nested_rows(kind: str) -> list[dict]:
    """Rows of message lists, for JSON and parquet files."""
    if kind == "sft":
        return [{"messages": messages("hi", "hello", "how are you?", "fine")}] * 2
    if kind == "preference":
        return [{"prompt": messages("name a color"), "chosen": messages("", "red")[1:],
                 "rejected": messages("", "no")[1:], "margin": 1.0}] * 2
    if kind == "prompt":
        return [{"messages": messages("hi", "hello", "tell me more")}] * 2
    return [{"text": "Plain text, every token trained."}] * 2


def encode(rows: list[dict], file_type: str) -> bytes:
    if file_type == ".csv":
        out = io.StringIO(newline="")
        out.write(",".join(rows[0]) + "\r\n")
        for row in rows:
            out.write(",".join('"' + str(v).replace('"', '""') + '"' for v in row.values()) + "\r\n")
        return out.getvalue().encode()
    if file_type == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        sink = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows), sink, row_group_size=3)
        return sink.getvalue()
    text = json.dumps(rows, indent=1) if file_type == ".json" else "".join(json.dumps(r) + "\n" for r in rows)
    data = text.encode()
    return gzip.compress(data, mtime=0) if file_type.endswith(".gz") else data


def damage(data: bytes, rng: random.Random) -> bytes:
    """One to three of: cut the end off, flip bytes, insert bytes or a token, delete a span."""
    data = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        how = rng.choice(("truncate", "flip", "insert", "token", "delete"))
        at = rng.randrange(len(data) + 1)
        if how == "truncate":
            del data[at:]
        elif how == "flip" and data:
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data))] ^= rng.randint(1, 255)
        elif how == "insert":
            pool = STRUCTURE if rng.random() < 0.5 else bytes(range(256))
            data[at:at] = bytes(rng.choice(pool) for _ in range(rng.randint(1, 8)))
        elif how == "token":
            data[at:at] = rng.choice(TOKENS)
        else:
            del data[at:at + rng.randint(1, 40)]
    return bytes(data)


def damaged_file(tmp_path, seed: int):
    """(path, kind) of the damaged file of case `seed`."""
    rng = random.Random(seed)
    kind = rng.choice(("sft", "preference", "prompt", "text"))
    file_type = FILE_TYPES[seed % len(FILE_TYPES)]
    rows = flat_rows(kind, rng)
    if file_type != ".csv" and rng.random() < 0.3:
        rows = nested_rows(kind)
    path = tmp_path / f"case{seed}{file_type}"
    path.write_bytes(damage(encode(rows, file_type), rng))
    return path, kind


def assert_named_error(exc: Exception, path, case: str) -> None:
    assert isinstance(exc, (DataError, ConfigError)), f"{case}: {type(exc).__name__}: {exc}"
    assert str(path) in str(exc) and "\n" not in str(exc), f"{case}: {exc}"


def test_damaged_files_never_give_a_traceback(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    codes = set()
    for seed in range(CASES):
        path, kind = damaged_file(tmp_path, seed)
        case = f"case {seed} ({path.name}, {kind})"
        try:
            load_examples([str(path)], kind)
        except Exception as exc:  # the test is that nothing else escapes
            assert_named_error(exc, path, case)
        skipped = tmp_path / "skipped.jsonl"
        try:
            loaded = load_examples([str(path)], kind, skip_invalid=True, skipped_file=skipped)
        except Exception as exc:
            assert_named_error(exc, path, case)
        else:
            [report] = loaded.reports  # every row read is an example or a problem, none lost
            assert len(loaded.examples) == report.rows - report.invalid and report.invalid == len(loaded.problems), case
            if loaded.problems:  # every skipped row is written, as a line of JSON
                lines = skipped.read_text(encoding="utf-8").split("\n")
                assert lines[-1] == "" and len([json.loads(line) for line in lines[:-1]]) == len(loaded.problems), case
        skipped.unlink(missing_ok=True)
        try:
            code = main(["data", "check", str(path), "--kind", kind])
        except SystemExit as exc:  # argparse only; never expected here
            pytest.fail(f"{case}: SystemExit {exc.code}")
        out, err = capsys.readouterr()
        assert "Traceback" not in out + err, case
        assert code in (0, 1, 2), case
        # exit 2 exactly when a line on stderr names the file
        assert (code == 2) == bool(err), f"{case}: exit {code}, stderr {err!r}"
        for line in err.splitlines():
            assert line.startswith(f"rlhfkit data: error: {path}"), f"{case}: {line}"
        codes.add(code)
        path.unlink()
    assert codes == {0, 1, 2}  # the damage reaches every outcome


@pytest.mark.parametrize("seed,expected", [(1, 2), (8, 1)])  # a .jsonl.gz that cannot be read, a .csv with bad rows
def test_damaged_file_in_a_real_process(tmp_path, capsys, monkeypatch, seed, expected):
    """The same exit code and error line from the `rlhfkit` command as from main() in this process."""
    monkeypatch.setenv("COLUMNS", "200")
    path, kind = damaged_file(tmp_path, seed)
    code = main(["data", "check", str(path), "--kind", kind])
    err = capsys.readouterr().err
    assert code == expected
    done = subprocess.run([sys.executable, "-m", "rlhfkit", "data", "check", str(path), "--kind", kind],
                          env=dict(os.environ, COLUMNS="200"), capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stderr) == (code, err)
