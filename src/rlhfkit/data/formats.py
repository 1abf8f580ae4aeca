"""Detect each row's format and normalise it into one shape per kind.

Kinds and their shapes:
- `sft`:        `Conversation` (messages; assistant turns are trained)
- `text`:       `Conversation` of one raw assistant message (every token trained): pretraining / PTX data
- `preference`: `PreferencePair` (shared prompt messages, chosen and rejected continuations, optional margin)
- `prompt`:     `PromptExample` (prompt messages to generate from, plus the row's other columns)

`raw=True` marks text that is already formatted (DeepSpeed-Chat's " Human: ... Assistant:" prompts, prompt/completion
pairs, plain text): it is concatenated verbatim instead of going through a chat template.

Each `normalise_*` function returns a list of examples (nested self-instruct rows give several) or raises `DataError`
naming the field and what was expected.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from rlhfkit.data.readers import DataError, Source

KINDS = ("sft", "preference", "prompt", "text")
ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "bot": "assistant",
         "model": "assistant", "system": "system"}
# Literal end-of-text markers that datasets write into responses; each response gets the tokenizer's real EOS token.
END_MARKERS = ("<|endoftext|>", "</s>", "<|im_end|>", "<|eot_id|>", "<|end|>", "<eos>")
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass
class Message:
    role: str  # "system" | "user" | "assistant"
    content: str


@dataclass
class Conversation:
    messages: list[Message]
    raw: bool
    source: Source | None = None
    format: str = ""


@dataclass
class PreferencePair:
    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]
    raw: bool
    margin: float = 0.0
    source: Source | None = None
    format: str = ""


@dataclass
class PromptExample:
    prompt: list[Message]
    raw: bool
    extra: dict[str, Any] = field(default_factory=dict)
    source: Source | None = None
    format: str = ""


def strip_end_marker(text: str) -> str:
    stripped = text.rstrip()
    for marker in END_MARKERS:
        if stripped.endswith(marker):
            return stripped[: -len(marker)]
    return text


# ----------------------------------------------------------------------------------------------------- field checks
def _string(row: dict, key: str, source: Source, *, allow_empty: bool = False, label: str | None = None) -> str:
    label = label or key
    if key not in row or row[key] is None:
        raise DataError(source, label, "missing (expected a string)")
    value = row[key]
    if not isinstance(value, str):
        raise DataError(source, label, f"expected a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(source, label, "empty (expected non-empty text)")
    return _no_surrogate(value, source, label)


def _no_surrogate(text: str, source: Source, label: str) -> str:
    """JSON's "\\ud800" escapes decode to lone surrogates: not characters, and tokenizers fail on them mid-run."""
    found = _SURROGATE.search(text)
    if found:
        raise DataError(source, label, f"holds a lone surrogate {found.group()!r} (half of a UTF-16 pair, not text)")
    return text


def _messages(value: Any, source: Source, label: str) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise DataError(source, label, f"expected a non-empty list of messages, got {type(value).__name__}")
    messages = []
    for i, item in enumerate(value):
        where = f"{label}[{i}]"
        if not isinstance(item, dict):
            raise DataError(source, where, f"expected a message object, got {type(item).__name__}")
        role_key = "role" if "role" in item else "from" if "from" in item else None
        content_key = "content" if "content" in item else "value" if "value" in item else None
        if role_key is None:
            raise DataError(source, where, "missing 'role' (or 'from')")
        if content_key is None:
            raise DataError(source, where, "missing 'content' (or 'value')")
        role = item[role_key]
        if not isinstance(role, str) or role.lower() not in ROLES:
            raise DataError(source, f"{where}.{role_key}",
                            f"unknown role {role!r} (expected one of {', '.join(sorted(ROLES))})")
        content = item[content_key]
        if not isinstance(content, str):
            raise DataError(source, f"{where}.{content_key}", f"expected a string, got {type(content).__name__}")
        _no_surrogate(content, source, f"{where}.{content_key}")
        role = ROLES[role.lower()]
        if role == "assistant":
            content = strip_end_marker(content)
            if not content.strip():
                raise DataError(source, f"{where}.{content_key}", "empty assistant response")
        messages.append(Message(role, content))
    return messages


def _margin(row: dict, source: Source) -> float:
    value = row.get("margin", 0.0)
    if value is None or (isinstance(value, str) and not value.strip()):  # no margin (an empty CSV cell)
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise DataError(source, "margin", f"expected a number, got {type(value).__name__}")
    try:
        number = float(value)  # CSV cells are strings: "0.5" is a number there
    except ValueError:
        raise DataError(source, "margin", f"expected a number, got {type(value).__name__}") from None
    except OverflowError:  # a JSON integer beyond any float
        raise DataError(source, "margin", "expected a finite number, got an integer beyond the float range") from None
    # A NaN margin makes every loss NaN (each step skipped); an infinite one saturates it: both are broken rows.
    if not math.isfinite(number):
        raise DataError(source, "margin", f"expected a finite number, got {value!r}")
    return number


def parse_hh_transcript(text: str, source: Source, label: str) -> list[Message]:
    """Split an Anthropic HH-RLHF transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...") into messages."""
    parts = _HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise DataError(source, label, "expected a transcript of '\\n\\nHuman:' / '\\n\\nAssistant:' turns")
    messages = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        content = content.strip()
        role = "user" if speaker == "Human" else "assistant"
        if messages and messages[-1].role == role:  # a speaker repeated: one turn split by a literal marker
            messages[-1].content += "\n\n" + content
        else:
            messages.append(Message(role, content))
    return messages


def split_shared_prompt(chosen: list[Message], rejected: list[Message], source: Source
                        ) -> tuple[list[Message], list[Message], list[Message]]:
    """Prompt = the longest shared run of messages that ends on a user turn; the rest are the two responses."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    while shared > 0 and chosen[shared - 1].role != "user":
        shared -= 1
    if shared == 0:
        raise DataError(source, "chosen", "chosen and rejected share no prompt ending on a user turn")
    prompt, chosen_tail, rejected_tail = chosen[:shared], chosen[shared:], rejected[shared:]
    for name, tail in (("chosen", chosen_tail), ("rejected", rejected_tail)):
        if not tail or tail[0].role != "assistant" or not tail[0].content.strip():
            raise DataError(source, name, "empty assistant response after the shared dialogue")
    return prompt, chosen_tail, rejected_tail


def _response(row: dict, key: str, source: Source) -> list[Message]:
    value = row.get(key)
    if isinstance(value, list):
        return _messages(value, source, key)
    text = strip_end_marker(_string(row, key, source))
    if not text.strip():
        raise DataError(source, key, "empty response")
    return [Message("assistant", text)]


def _check_different(chosen: list[Message], rejected: list[Message], source: Source) -> None:
    if chosen == rejected:
        raise DataError(source, "rejected", "identical to 'chosen' (a pair needs two different responses)")


def _check_ends_on_assistant(chosen: list[Message], rejected: list[Message], source: Source) -> None:
    """A response ending on a user or system turn gets no EOS, and its score would be read on text that the model
    never writes."""
    for name, messages in (("chosen", chosen), ("rejected", rejected)):
        if messages[-1].role != "assistant":
            raise DataError(source, name, f"the response ends with a {messages[-1].role} message (it must end with "
                                          "an assistant message)")


# ---------------------------------------------------------------------------------------------------- normalisers
def normalise_sft(row: dict, source: Source) -> list[Conversation]:
    if "messages" in row or "conversations" in row:
        key = "messages" if "messages" in row else "conversations"
        messages = _messages(row[key], source, key)
        if not any(m.role == "assistant" for m in messages):
            raise DataError(source, key, "no assistant turn to train on")
        return [Conversation(messages, raw=False, source=source, format="chat" if key == "messages" else "sharegpt")]
    if "instruction" in row and "instances" in row:
        instruction = _string(row, "instruction", source)
        instances = row["instances"]
        if not isinstance(instances, list) or not instances:
            raise DataError(source, "instances", "expected a non-empty list of {input, output}")
        out = []
        for i, inst in enumerate(instances):
            if not isinstance(inst, dict):
                raise DataError(source, f"instances[{i}]", f"expected an object, got {type(inst).__name__}")
            inp = _string(inst, "input", source, allow_empty=True, label=f"instances[{i}].input")
            output = _string(inst, "output", source, label=f"instances[{i}].output")
            out.append(Conversation(_instruction_messages(instruction, inp, output, source, f"instances[{i}].output"),
                                    False, source, "instances"))
        return out
    if "instruction" in row:
        instruction = _string(row, "instruction", source)
        inp = _string(row, "input", source, allow_empty=True) if row.get("input") is not None else ""
        output = _string(row, "output", source)
        return [Conversation(_instruction_messages(instruction, inp, output, source, "output"), False, source,
                             "alpaca")]
    if "prompt" in row and "completion" in row:
        prompt = _string(row, "prompt", source, allow_empty=True)
        completion = strip_end_marker(_string(row, "completion", source))
        if not completion.strip():
            raise DataError(source, "completion", "empty response (only an end marker)")
        return [Conversation([Message("user", prompt), Message("assistant", completion)], True, source,
                             "prompt-completion")]
    if "text" in row:
        return normalise_text(row, source)
    raise DataError(source, None, f"no SFT format matches the keys {sorted(row)} (expected messages, conversations, "
                                  "instruction+output, instruction+instances, prompt+completion or text)")


def _instruction_messages(instruction: str, inp: str, output: str, source: Source, label: str) -> list[Message]:
    user = instruction if not inp.strip() else f"{instruction}\n\n{inp}"
    output = strip_end_marker(output)
    if not output.strip():
        raise DataError(source, label, "empty response (only an end marker)")
    return [Message("user", user), Message("assistant", output)]


def normalise_text(row: dict, source: Source) -> list[Conversation]:
    text = strip_end_marker(_string(row, "text", source))
    if not text.strip():
        raise DataError(source, "text", "empty text (only an end marker)")
    return [Conversation([Message("assistant", text)], True, source, "text")]


def normalise_preference(row: dict, source: Source) -> list[PreferencePair]:
    for key in ("chosen", "rejected"):
        if key not in row:
            raise DataError(source, key, "missing (a preference row needs 'chosen' and 'rejected')")
    margin = _margin(row, source)
    prompt_key = "prompt" if "prompt" in row else "context" if "context" in row else None
    if prompt_key is None:
        if isinstance(row["chosen"], str):  # Anthropic HH-RLHF: two whole transcripts
            chosen = parse_hh_transcript(_string(row, "chosen", source), source, "chosen")
            rejected = parse_hh_transcript(_string(row, "rejected", source), source, "rejected")
            fmt = "hh-rlhf"
        else:  # two whole conversations as message lists
            chosen, rejected = _messages(row["chosen"], source, "chosen"), _messages(row["rejected"], source, "rejected")
            fmt = "conversation-pair"
        _check_different(chosen, rejected, source)
        prompt, chosen, rejected = split_shared_prompt(chosen, rejected, source)
        _check_ends_on_assistant(chosen, rejected, source)
        return [PreferencePair(prompt, chosen, rejected, False, margin, source, fmt)]
    if isinstance(row[prompt_key], str):
        prompt = [Message("user", _string(row, prompt_key, source))]
        raw, fmt = True, "prompt-chosen-rejected"
    else:
        prompt = _messages(row[prompt_key], source, prompt_key)
        raw, fmt = False, "context-messages" if prompt_key == "context" else "prompt-messages"
    chosen, rejected = _response(row, "chosen", source), _response(row, "rejected", source)
    _check_different(chosen, rejected, source)
    _check_ends_on_assistant(chosen, rejected, source)
    return [PreferencePair(prompt, chosen, rejected, raw, margin, source, fmt)]


def normalise_prompt(row: dict, source: Source) -> list[PromptExample]:
    used: set[str]
    if "prompt" in row or "context" in row:
        key = "prompt" if "prompt" in row else "context"
        if isinstance(row[key], str):
            prompt, raw = [Message("user", _string(row, key, source))], True
        else:
            prompt, raw = _messages(row[key], source, key), False
            if prompt[-1].role != "user":
                raise DataError(source, key, "a prompt must end on a user turn")
        used, fmt = {key}, key
    elif "instruction" in row:
        instruction = _string(row, "instruction", source)
        inp = _string(row, "input", source, allow_empty=True) if row.get("input") is not None else ""
        prompt = [Message("user", instruction if not inp.strip() else f"{instruction}\n\n{inp}")]
        raw, used, fmt = False, {"instruction", "input"}, "instruction"
    elif "messages" in row:
        prompt, raw, used, fmt = _messages(row["messages"], source, "messages"), False, {"messages"}, "messages"
        if prompt[-1].role != "user":
            raise DataError(source, "messages", "a prompt must end on a user turn")
    elif isinstance(row.get("chosen"), str):  # HH-RLHF transcripts: the dialogue before the last assistant turn
        messages = parse_hh_transcript(row["chosen"], source, "chosen")
        while messages and messages[-1].role != "user":
            messages.pop()
        if not messages:
            raise DataError(source, "chosen", "no user turn in the transcript")
        prompt, raw, used, fmt = messages, False, {"chosen", "rejected"}, "hh-rlhf"
    else:
        raise DataError(source, None, f"no prompt format matches the keys {sorted(row)} "
                                      "(expected prompt, context, instruction or messages)")
    extra = {k: v for k, v in row.items() if k not in used}
    return [PromptExample(prompt, raw, extra, source, fmt)]


NORMALISERS: dict[str, Callable[[dict, Source], list[Any]]] = {
    "sft": normalise_sft, "preference": normalise_preference, "prompt": normalise_prompt, "text": normalise_text,
}
