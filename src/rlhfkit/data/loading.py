"""Load a kind of examples from data specs (`PATH[:WEIGHT]`: files, folders, hub names) with mixing and an eval split.

Bad rows never pass silently: by default the first one stops the run (before any model is loaded) with a message that
names file, line and field; with `skip_invalid` they are skipped, counted, and written with their reasons to a JSONL
file so nothing is lost.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from rlhfkit import in_memory
from rlhfkit.data.formats import KINDS, NORMALISERS
from rlhfkit.data.readers import DataError, Source, expand, looks_like_hub_name, read_hub, read_rows


@dataclass
class SourceReport:
    path: str
    weight: float
    rows: int = 0
    examples: int = 0
    invalid: int = 0
    used: int = 0  # examples after the mixing weight
    formats: Counter = field(default_factory=Counter)


@dataclass
class Loaded:
    examples: list[Any]
    problems: list[tuple[DataError, Any]]  # (error, the raw row) of every skipped row
    reports: list[SourceReport]


def parse_spec(spec: str) -> tuple[str, float]:
    """`data.jsonl` -> ("data.jsonl", 1.0); `data.jsonl:0.5` -> ("data.jsonl", 0.5)."""
    path, sep, weight = spec.rpartition(":")
    if sep and path:
        try:
            value = float(weight)
        except ValueError:
            return spec, 1.0
        if not value < float("inf"):  # nan or inf: no number of copies
            raise DataError(None, None, f"{spec}: the mixing weight must be a finite number")
        if value < 0:
            raise DataError(None, None, f"{spec}: the mixing weight must be >= 0")
        return path, value
    return spec, 1.0


def check_spec_exists(spec: str) -> str | None:
    """A one-line problem when the spec names nothing readable, else None (used by config checks)."""
    if in_memory.is_name(spec):
        return None if in_memory.lookup(spec) is not None else in_memory.missing_message(spec)
    path, _ = parse_spec(spec)
    if Path(path).exists() or looks_like_hub_name(path):
        return None
    return f"{path}: no such file or folder"


def iter_examples(spec_path: str, kind: str) -> Iterator[tuple[Source, Any, list[Any] | DataError]]:
    """(source, raw row, examples or the row's error) for every row that a path names; the raw row of a row that
    could not be parsed is its text, or None."""
    if kind not in KINDS:
        raise ValueError(f"unknown data kind {kind!r}")
    normalise = NORMALISERS[kind]
    table = in_memory.lookup(spec_path)
    if table is not None:
        rows = memory_rows(spec_path, table)
    elif looks_like_hub_name(spec_path):
        rows = read_hub(spec_path)
    else:
        rows = (row for file in expand(spec_path) for row in read_rows(file))
    for source, row in rows:
        if isinstance(row, DataError):
            yield source, row.text, row  # the raw text, when the row could not be parsed
            continue
        try:
            yield source, row, normalise(row, source)
        except DataError as exc:
            yield source, row, exc


def memory_rows(name: str, table: Any) -> Iterator[tuple[Source, Any]]:
    """The rows of a list of dicts or a `datasets.Dataset` handed over from Python, each named `<data>[i]`."""
    for index, row in enumerate(table):
        source = Source(name, index, unit="index")
        if isinstance(row, dict):
            yield source, dict(row)
        else:
            yield source, DataError(source, None, f"expected a dict of fields, got {type(row).__name__}",
                                    text=repr(row)[:200])


def load_examples(specs: list[str], kind: str, *, skip_invalid: bool = False, seed: int = 0,
                  skipped_file: str | Path | None = None) -> Loaded:
    examples, problems, reports = [], [], []
    for spec in specs:
        path, weight = parse_spec(spec)
        report = SourceReport(path, weight)
        found = []
        for source, row, result in iter_examples(path, kind):
            report.rows += 1
            if isinstance(result, DataError):
                report.invalid += 1
                problems.append((result, row))
                continue
            for ex in result:
                report.formats[ex.format] += 1
            found.extend(result)
        report.examples = len(found)
        mixed = apply_weight(found, weight, random.Random(f"{seed}:{spec}"))
        report.used = len(mixed)
        examples.extend(mixed)
        reports.append(report)
    if problems and not skip_invalid:
        first = problems[0][0]
        more = f" ({len(problems) - 1} more bad rows)" if len(problems) > 1 else ""
        raise DataError(first.source, first.field, f"{first.message}{more}. `rlhfkit data check` lists every "
                                                   "problem; --skip-invalid skips bad rows and records them")
    if problems and skipped_file:
        write_problems(problems, skipped_file)
    return Loaded(examples, problems, reports)


def write_problems(problems: list[tuple[DataError, Any]], path: str | Path) -> None:
    # A JSON escape such as "\udc80" decodes to a lone surrogate, which UTF-8 cannot hold: backslashreplace writes it
    # back as the same escape, so the file stays valid JSON.
    with open(path, "w", encoding="utf-8", errors="backslashreplace") as f:
        for error, row in problems:
            f.write(json.dumps(error.as_record(row), ensure_ascii=False, default=str) + "\n")


def apply_weight(items: list[Any], weight: float, rng: random.Random) -> list[Any]:
    """Each item `int(weight)` times, plus a seeded sample for the fractional part (weight 0.5 = a fixed half)."""
    whole, frac = int(weight), weight - int(weight)
    extra = rng.sample(range(len(items)), round(frac * len(items))) if frac else []
    return items * whole + [items[i] for i in sorted(extra)]


def split_eval(items: list[Any], fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """A seeded held-out split: (train, eval), eval holding `fraction` of the items (at least one when fraction > 0)."""
    if fraction <= 0 or len(items) < 2:
        return items, []
    n_eval = min(max(1, round(fraction * len(items))), len(items) - 1)
    chosen = set(random.Random(f"eval-split:{seed}").sample(range(len(items)), n_eval))
    return [x for i, x in enumerate(items) if i not in chosen], [x for i, x in enumerate(items) if i in chosen]
