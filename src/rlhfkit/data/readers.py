"""Read rows from local files (.json, .jsonl, .jsonl.gz, .parquet, .csv), folders of them, or hub datasets.

Every row comes with its `Source` (file and line, or row for parquet and hub data) so that any later problem can name
where it is. A row that cannot be read (bad JSON, bad UTF-8) comes through as a `DataError` in its place, so that
`rlhfkit data check` can report every problem and training can stop (or skip) without losing the rest. Damage that
loses more than a row (a truncated .gz, a broken parquet row group, a syntax error in a JSON array) comes through as an
`UnreadableError` after the rows read before it.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import json
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

SUFFIXES = (".jsonl.gz", ".json.gz", ".jsonl", ".json", ".parquet", ".csv")


@dataclass(frozen=True)
class Source:
    """Where a row came from: `line` is 1-based for text files; `unit` says whether it counts lines or rows; a
    `line` of None names the whole file (one that cannot be opened or decoded at all)."""

    file: str
    line: int | None
    unit: str = "line"

    def __str__(self) -> str:
        if self.line is None:
            return self.file
        if self.unit == "index":  # data handed over in memory: `<data>[17]`, 0-based as Python counts
            return f"{self.file}[{self.line}]"
        return f"{self.file}:{self.line}" if self.unit == "line" else f"{self.file} row {self.line}"


class DataError(ValueError):
    """A problem with one row of the user's data, naming file, line, field and what was expected.

    `text` keeps a row that could not be parsed as it was written, for the skipped-rows file.
    """

    def __init__(self, source: Source | None, field: str | None, message: str, text: str | None = None):
        self.source, self.field, self.message, self.text = source, field, message, text
        where = f"{source}: " if source else ""
        what = f"field '{field}': " if field else ""
        super().__init__(f"{where}{what}{message}")

    def as_record(self, row: Any = None) -> dict[str, Any]:
        return {
            "file": self.source.file if self.source else None,
            self.source.unit if self.source else "line": self.source.line if self.source else None,
            "field": self.field, "reason": self.message, "row": row,
        }


class UnreadableError(DataError):
    """A file, or its rest from some point on, that cannot be read at all (damaged or truncated): more than one row
    may be lost. `rlhfkit data check` exits 2 for these and 1 for bad rows."""


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
        return
    try:
        raw = path.read_bytes()
    except OSError as exc:
        yield _unreadable(Source(name, None), f"cannot be read ({exc.strerror or exc})")
        return
    damage = None
    if name.endswith(".gz"):
        raw, damage = _gunzip(name, raw)
    # A byte-order mark (Excel and Notepad write one) is not data; it would make the first key or line unreadable.
    raw = raw.removeprefix(codecs.BOM_UTF8)
    if name.endswith(".csv"):
        rows = _read_csv(name, raw)
    elif raw.lstrip()[:1] == b"[":
        rows = _read_json_array(name, raw)
    else:
        rows = _read_json_lines(name, raw)
    for source, row in rows:
        if damage and isinstance(row, UnreadableError):
            break  # an array cut off by the damage: the damage is the reason, reported below
        yield source, row
    if damage:
        yield damage.source, damage


def _unreadable(source: Source, message: str) -> Row:
    return source, UnreadableError(source, None, message)


def _one_line(exc: Exception) -> str:
    """A library's message on one line (pyarrow's span several, some with control characters from the damage)."""
    text = " ".join(str(exc).split())
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def _malformed(exc: json.JSONDecodeError) -> str:
    # Some of json's messages end in "at" already ("Unterminated string starting at").
    return f"malformed JSON ({exc.msg.removesuffix(' at')} at column {exc.colno})"


def _gunzip(name: str, raw: bytes) -> tuple[bytes, UnreadableError | None]:
    """The decompressed bytes up to the last whole line before any damage, and the damage (None when there is none).

    read1 hands over what each piece of input decompressed to, so a truncated file keeps everything before its end.
    """
    out = bytearray()
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(raw)) as f:
            while piece := f.read1(1 << 16):
                out += piece
        return bytes(out), None
    except EOFError:
        reason = "the gzip data ends early (truncated file)"
    except (OSError, zlib.error) as exc:  # BadGzipFile is an OSError
        if not out and str(exc).startswith("Not a gzipped file"):
            return b"", UnreadableError(Source(name, None), None, "not a gzip file (the name ends in .gz)")
        reason = f"damaged gzip data ({_one_line(exc)})"
    if not out:
        return b"", UnreadableError(Source(name, None), None, f"{reason}; nothing could be read")
    whole = out[:out.rfind(b"\n") + 1]  # the line the damage cut through is lost with the rest
    source = Source(name, whole.count(b"\n") + 1)
    return bytes(whole), UnreadableError(source, None, f"{reason}; the rows from this line on are lost")


def _decode(name: str, raw: bytes, line_offset: int = 0) -> tuple[str | None, DataError | None]:
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1 + line_offset
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        byte = raw[exc.start:exc.start + 1].hex()
        return None, DataError(Source(name, line), None, f"not valid UTF-8 (byte 0x{byte} at column {column})",
                               text=raw.decode("utf-8", "replace"))


def _bad_byte(name: str, text: str, start: int, end: int) -> DataError | None:
    """The first byte in text[start:end] that was not valid UTF-8 (text decoded with errors="surrogateescape", which
    keeps each such byte as a lone surrogate), as an error at its line and byte column; None when there is none."""
    found = _ESCAPED_BYTE.search(text, start, end)
    if not found:
        return None
    at = found.start()
    line_start = text.rfind("\n", 0, at) + 1
    column = len(text[line_start:at].encode("utf-8", "surrogateescape")) + 1
    byte = ord(text[at]) - 0xDC00
    return DataError(Source(name, text.count("\n", 0, at) + 1), None,
                     f"not valid UTF-8 (byte 0x{byte:02x} at column {column})", text=_readable(text[start:end]))


def _readable(text: str) -> str:
    """Text decoded with surrogateescape, with each bad byte as U+FFFD, so that it can be printed and written."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")


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
            yield source, DataError(source, None, _malformed(exc), text=text)
            continue
        except RecursionError:
            yield source, DataError(source, None, "JSON nested too deeply to read", text=text)
            continue
        if not isinstance(row, dict):
            yield source, DataError(source, None, f"expected a JSON object, got {type(row).__name__}", text=text)
            continue
        yield source, row


def _read_json_array(name: str, raw: bytes) -> Iterator[Row]:
    """A JSON array of objects; each element's line is where it starts, found while decoding element by element.

    Bad UTF-8 bytes are kept as lone surrogates while decoding, so that only the elements holding them are lost.
    """
    text = raw.decode("utf-8", "surrogateescape")
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
            yield _unreadable(source, "malformed JSON (the array is not closed with ']')")
            return
        if text[pos] == "]":
            yield from _after_array(name, text, pos + 1)
            return
        try:
            row, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            # Elements after a syntax error cannot be located reliably: report it and stop reading this file.
            bad = _bad_byte(name, text, pos, exc.pos + 1)
            if bad:
                yield _unreadable(bad.source, f"{bad.message}; rest of file not read")
            else:
                yield _unreadable(Source(name, exc.lineno), f"{_malformed(exc)}; rest of file not read")
            return
        except RecursionError:
            end = _value_end(text, pos)
            if end is None:
                yield _unreadable(source, "JSON nested too deeply to read; rest of file not read")
                return
            yield source, DataError(source, None, "JSON nested too deeply to read")
            pos = end
            continue
        bad = _bad_byte(name, text, pos, end)
        if bad:
            yield source, bad
        elif not isinstance(row, dict):
            yield source, DataError(source, None, f"expected a JSON object, got {type(row).__name__}",
                                    text=text[pos:end])
        else:
            yield source, row
        pos = end


def _after_array(name: str, text: str, pos: int) -> Iterator[Row]:
    """Nothing but white space may follow the array: anything else is data that would be silently ignored."""
    rest = text[pos:]
    if rest.strip():
        at = pos + len(rest) - len(rest.lstrip())
        source = Source(name, text.count("\n", 0, at) + 1)
        yield source, DataError(source, None, "text after the array's closing ']' (a .json file holds one array, "
                                              "or one object per line)", text=_readable(rest.strip()))


def _value_end(text: str, pos: int) -> int | None:
    """Where the JSON value at `pos` ends, by counting brackets outside strings: the decoder recurses once per level
    and gives up on deep nesting, this does not. None when the value is never closed."""
    depth, in_string, escaped = 0, False, False
    for i in range(pos, len(text)):
        char = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def _read_csv(name: str, raw: bytes) -> Iterator[Row]:
    """Rows of a CSV file with a header line; a row holding bytes that are not UTF-8 is lost, not the whole file."""
    text = raw.decode("utf-8", "surrogateescape")
    # The default limit (131,072 characters a cell) rejects long documents; a cell can never be longer than the file.
    csv.field_size_limit(max(csv.field_size_limit(), len(text)))
    ends = [0]  # ends[k]: where line k ends in `text` (line 0 = before the file)

    def lines() -> Iterator[str]:
        for line in io.StringIO(text, newline=""):
            ends.append(ends[-1] + len(line))
            yield line

    reader = csv.DictReader(lines())
    header = reader.fieldnames or []
    bad = _bad_byte(name, text, 0, ends[-1])
    if bad:
        yield _unreadable(bad.source, f"{bad.message} in the header; the columns are unknown")
        return
    start = len(ends)  # the line after the header
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            source = Source(name, start)
            yield source, DataError(source, None, f"not valid CSV ({exc})")
            start = reader.reader.line_num + 1
            continue
        end = reader.reader.line_num
        while start < end and not text[ends[start - 1]:ends[start]].strip():
            start += 1  # blank lines that DictReader skipped before this row
        source, span = Source(name, start), (ends[start - 1], ends[end])
        start = end + 1
        bad = _bad_byte(name, text, *span)
        if bad:
            yield source, bad
        elif None in row:  # cells beyond the header's columns, which DictReader puts under the key None
            yield source, DataError(source, None, f"{len(header) + len(row[None])} fields, but the header names "
                                                  f"{len(header)} columns", text=text[span[0]:span[1]])
        else:
            yield source, dict(row)


def _read_parquet(path: Path) -> Iterator[Row]:
    """Rows of a parquet file, one row group at a time, so that a damaged group loses only its own rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    name = str(path)
    # Damage surfaces as any of these, depending on where it is (metadata, compression, page data, UTF-8 strings).
    damaged = (pa.ArrowException, OSError, ValueError, EOFError)
    try:
        parquet = pq.ParquetFile(path)
        sizes = [parquet.metadata.row_group(group).num_rows for group in range(parquet.num_row_groups)]
    except damaged as exc:
        yield _unreadable(Source(name, None), f"not a readable parquet file ({_one_line(exc)})")
        return
    first = 1
    with parquet:
        for group, size in enumerate(sizes):
            try:
                rows = parquet.read_row_group(group).to_pylist()
            except damaged as exc:
                source = Source(name, first, unit="row")
                yield _unreadable(source, f"rows {first}-{first + size - 1} (row group {group}) cannot be read "
                                          f"({_one_line(exc)})")
            else:
                for number, row in enumerate(rows, start=first):
                    yield Source(name, number, unit="row"), row
            first += size


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
