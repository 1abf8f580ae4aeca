"""Read rows from local files (.json, .jsonl, .jsonl.gz, .parquet, .csv), folders of them, or hub datasets.

Every row comes with its `Source` (file and line, or row for parquet and hub data) so that any later problem can name
where it is. A row that cannot be read (bad JSON, bad UTF-8) comes through as a `DataError` in its place, so that
`rlhfkit data check` can report every problem and training can stop (or skip) without losing the rest.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

SUFFIXES = (".jsonl.gz", ".json.gz", ".jsonl", ".json", ".parquet", ".csv")


@dataclass(frozen=True)
class Source:
    """Where a row came from: `line` is 1-based for text files; `unit` says whether it counts lines or rows."""

    file: str
    line: int
    unit: str = "line"

    def __str__(self) -> str:
        return f"{self.file}:{self.line}" if self.unit == "line" else f"{self.file} row {self.line}"


class DataError(ValueError):
    """A problem with one row of the user's data, naming file, line, field and what was expected."""

    def __init__(self, source: Source | None, field: str | None, message: str):
        self.source, self.field, self.message = source, field, message
        where = f"{source}: " if source else ""
        what = f"field '{field}': " if field else ""
        super().__init__(f"{where}{what}{message}")

    def as_record(self, row: Any = None) -> dict[str, Any]:
        return {
            "file": self.source.file if self.source else None,
            self.source.unit if self.source else "line": self.source.line if self.source else None,
            "field": self.field, "reason": self.message, "row": row,
        }


Row = tuple[Source, "dict[str, Any] | DataError"]


def is_data_file(path: Path) -> bool:
    return path.name.endswith(SUFFIXES)


def expand(path: str) -> list[Path]:
    """The data files a path names: itself, or every supported file below a folder (sorted, so order is stable)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and is_data_file(f))
        if not files:
            raise DataError(None, None, f"folder {p} holds no {', '.join(SUFFIXES)} files")
        return files
    if p.is_file():
        if not is_data_file(p):
            raise DataError(None, None, f"{p}: unsupported file type (expected one of {', '.join(SUFFIXES)})")
        return [p]
    raise DataError(None, None, f"{p}: no such file or folder")


def looks_like_hub_name(path: str) -> bool:
    """`owner/name` (optionally `#split`) that is not a local path: a Hugging Face hub dataset."""
    name = path.split("#", 1)[0]
    return not Path(name).exists() and name.count("/") == 1 and not name.startswith((".", "/")) and "." not in name


def read_rows(path: Path) -> Iterator[Row]:
    name = str(path)
    if name.endswith(".parquet"):
        yield from _read_parquet(path)
    elif name.endswith(".csv"):
        yield from _read_csv(path)
    else:
        raw = gzip.open(path, "rb").read() if name.endswith(".gz") else path.read_bytes()
        first = raw.lstrip()[:1]
        if first == b"[":
            yield from _read_json_array(name, raw)
        else:
            yield from _read_json_lines(name, raw)


def _decode(name: str, raw: bytes, line_offset: int = 0) -> tuple[str | None, DataError | None]:
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1 + line_offset
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        byte = raw[exc.start:exc.start + 1].hex()
        return None, DataError(Source(name, line), None, f"not valid UTF-8 (byte 0x{byte} at column {column})")


def _read_json_lines(name: str, raw: bytes) -> Iterator[Row]:
    for number, line in enumerate(raw.split(b"\n"), start=1):
        source = Source(name, number)
        if not line.strip():
            continue
        text, error = _decode(name, line, number - 1)
        if error:
            yield source, error
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as exc:
            yield source, DataError(source, None, f"malformed JSON ({exc.msg} at column {exc.colno})")
            continue
        if not isinstance(row, dict):
            yield source, DataError(source, None, f"expected a JSON object, got {type(row).__name__}")
            continue
        yield source, row


def _read_json_array(name: str, raw: bytes) -> Iterator[Row]:
    """A JSON array of objects; each element's line is where it starts, found while decoding element by element."""
    text, error = _decode(name, raw)
    if error:
        yield error.source, error
        return
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    line, counted = 1, 0
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        line += text.count("\n", counted, pos)
        counted = pos
        source = Source(name, line)
        if pos >= len(text):
            yield source, DataError(source, None, "malformed JSON (the array is not closed with ']')")
            return
        if text[pos] == "]":
            return
        try:
            row, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            bad = Source(name, exc.lineno)
            # Elements after a syntax error cannot be located reliably: report it and stop reading this file.
            yield bad, DataError(bad, None, f"malformed JSON ({exc.msg} at column {exc.colno}); rest of file not read")
            return
        yield source, row if isinstance(row, dict) else DataError(
            source, None, f"expected a JSON object, got {type(row).__name__}")
        pos = end


def _read_csv(path: Path) -> Iterator[Row]:
    name = str(path)
    text, error = _decode(name, path.read_bytes())
    if error:
        yield error.source, error
        return
    reader = csv.DictReader(io.StringIO(text, newline=""))
    start = 2  # line 1 is the header
    for row in reader:
        yield Source(name, start), dict(row)
        start = reader.line_num + 1


def _read_parquet(path: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq

    for number, row in enumerate(pq.read_table(path).to_pylist(), start=1):
        yield Source(str(path), number, unit="row"), row


def read_hub(name: str) -> Iterator[Row]:
    """A Hugging Face hub dataset, `owner/name` or `owner/name#split` (needs the network and `pip install datasets`)."""
    try:
        import datasets
    except ImportError:
        raise DataError(None, None, f"{name} looks like a hub dataset: install the 'datasets' package to read it"
                        ) from None
    dataset_name, _, split = name.partition("#")
    table = datasets.load_dataset(dataset_name, split=split or "train")
    for number, row in enumerate(table, start=1):
        yield Source(name, number, unit="row"), dict(row)
