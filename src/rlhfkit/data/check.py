"""`rlhfkit data check`: what a data file holds and everything wrong with it, in one pass."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from rlhfkit.data.encode import EncodeStats, encode_conversation, encode_pair, encode_prompt
from rlhfkit.data.formats import Conversation, PreferencePair, PromptExample
from rlhfkit.data.loading import iter_examples, parse_spec
from rlhfkit.data.readers import DataError, Source, UnreadableError, expand, looks_like_hub_name


@dataclass
class CheckReport:
    path: str
    kind: str
    rows: int = 0
    examples: int = 0
    formats: Counter = field(default_factory=Counter)
    problems: list[DataError] = field(default_factory=list)  # bad rows, and files that hold no rows
    unreadable: list[UnreadableError] = field(default_factory=list)  # damage that loses more than a row
    lengths: dict[str, list[int]] = field(default_factory=dict)  # "prompt" / "response" / "total" -> per example
    unit: str = "words"
    encode: EncodeStats | None = None


def percentiles(values: list[int], points=(50, 90, 99)) -> dict[str, int]:
    if not values:
        return {}
    ordered = sorted(values)
    out = {f"p{p}": ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))] for p in points}
    out["max"] = ordered[-1]
    return out


def _text_lengths(example) -> tuple[int, int]:
    """(prompt words, response words) when no tokenizer is given."""
    def words(messages):
        return sum(len(m.content.split()) for m in messages)

    if isinstance(example, Conversation):
        answers = [m for m in example.messages if m.role == "assistant"]
        return words(example.messages) - words(answers), words(answers)
    if isinstance(example, PreferencePair):
        return words(example.prompt), max(words(example.chosen), words(example.rejected))
    return words(example.prompt), 0


def check_file(spec: str, kind: str, *, tokenizer=None, template: str = "human-assistant", max_len: int = 512
               ) -> CheckReport:
    path, _ = parse_spec(spec)
    report = CheckReport(path, kind, unit="tokens" if tokenizer is not None else "words",
                         encode=EncodeStats() if tokenizer is not None else None)
    lengths = report.lengths = {"prompt": [], "response": [], "total": []}
    seen = set()
    for source, _, result in iter_examples(path, kind):
        seen.add(source.file)
        if isinstance(result, UnreadableError):
            report.unreadable.append(result)
            continue
        report.rows += 1
        if isinstance(result, DataError):
            report.problems.append(result)
            continue
        for ex in result:
            report.examples += 1
            report.formats[ex.format] += 1
            if tokenizer is None:
                prompt, response = _text_lengths(ex)
            else:
                prompt, response = _token_lengths(ex, tokenizer, template, max_len, report.encode)
            lengths["prompt"].append(prompt)
            lengths["response"].append(response)
            lengths["total"].append(prompt + response)
    files = [] if looks_like_hub_name(path) else [str(f) for f in expand(path)]
    # An empty file is most likely a failed export or the wrong file; training would quietly use nothing from it.
    report.problems += [DataError(Source(f, None), None, "the file holds no rows") for f in files if f not in seen]
    return report


def _token_lengths(ex, tokenizer, template: str, max_len: int, stats: EncodeStats) -> tuple[int, int]:
    """(prompt tokens, response tokens) before truncation; `stats` counts what max_len would cut or drop."""
    if isinstance(ex, PromptExample):
        return len(encode_prompt(ex, tokenizer, template, 10**9, EncodeStats())), 0
    if isinstance(ex, PreferencePair):
        full = encode_pair(ex, tokenizer, template, 10**9, EncodeStats())
        encode_pair(ex, tokenizer, template, max_len, stats)
        chosen = full[0]
        return chosen.response_start, max(len(full[0].input_ids), len(full[1].input_ids)) - chosen.response_start
    full = encode_conversation(ex, tokenizer, template, 10**9, EncodeStats())
    encode_conversation(ex, tokenizer, template, max_len, stats)
    trained = sum(full.loss_mask)
    return len(full.input_ids) - trained, trained
