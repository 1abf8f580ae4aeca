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
