"""Render messages into text segments that know whether they carry loss.

A template turns `[Message]` into `[Segment]`: prompt text (system and user turns, the assistant header) is not
trained; each assistant reply is, and is followed by the tokenizer's EOS token. Segments are tokenized one by one, so
the loss mask is exact at every boundary and a prompt is tokenized the same way in training and in generation.

Templates: `tokenizer` (the tokenizer's own chat template), and the built-in `human-assistant` (HH-RLHF and
DeepSpeed-Chat style), `alpaca` and `chatml`. `auto` picks the tokenizer's template when it has one, otherwise
`human-assistant`.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlhfkit.config import ConfigError
from rlhfkit.data.formats import Message

TEMPLATES = ("auto", "tokenizer", "human-assistant", "alpaca", "chatml")


@dataclass(frozen=True)
class Segment:
    text: str
    trainable: bool
    eos: bool = False  # an EOS token follows the text (an assistant reply's end)


@dataclass(frozen=True)
class ChatFormat:
    system: str
    user: str
    assistant_header: str  # not trained; ends every generation prompt
    assistant: str  # trained, then EOS
    after_assistant: str = ""  # not trained; between an assistant reply's EOS and the next turn
    default_system: str = ""


BUILTIN = {
    "human-assistant": ChatFormat(system="{content}", user="\n\nHuman: {content}", assistant_header="\n\nAssistant:",
                                  assistant=" {content}"),
    "alpaca": ChatFormat(
        system="{content}\n\n", user="### Instruction:\n{content}\n\n", assistant_header="### Response:\n",
        assistant="{content}", after_assistant="\n\n",
        default_system="Below is an instruction that describes a task. "
                       "Write a response that appropriately completes the request."),
    "chatml": ChatFormat(system="<|im_start|>system\n{content}<|im_end|>\n", user="<|im_start|>user\n{content}<|im_end|>\n",
                         assistant_header="<|im_start|>assistant\n", assistant="{content}<|im_end|>",
                         after_assistant="\n"),
}


def resolve_template(name: str, tokenizer) -> str:
    if name == "auto":
        return "tokenizer" if getattr(tokenizer, "chat_template", None) else "human-assistant"
    if name == "tokenizer" and not getattr(tokenizer, "chat_template", None):
        source = getattr(tokenizer, "name_or_path", "")
        raise ConfigError(f"template: 'tokenizer' asked for, but the tokenizer has no chat template ({source}); "
                          "choose auto, human-assistant, alpaca or chatml")
    return name


def render(messages: list[Message], template: str, tokenizer, *, raw: bool, generation_prompt: bool = False
           ) -> list[Segment]:
    """Segments for `messages`; with `generation_prompt`, the prompt ends with the assistant header to generate from.

    `template` must be resolved (not `auto`). Raw messages are concatenated verbatim.
    """
    if raw:
        return [Segment(m.content, m.role == "assistant", eos=m.role == "assistant") for m in messages]
    if template == "tokenizer":
        return _render_with_tokenizer(messages, tokenizer, generation_prompt)
    fmt = BUILTIN[template]
    segments = []
    if fmt.default_system and (not messages or messages[0].role != "system"):
        segments.append(Segment(fmt.system.format(content=fmt.default_system), False))
    for i, m in enumerate(messages):
        if m.role == "assistant":
            segments.append(Segment(fmt.assistant_header, False))
            segments.append(Segment(fmt.assistant.format(content=m.content), True, eos=True))
            if fmt.after_assistant and i + 1 < len(messages):
                segments.append(Segment(fmt.after_assistant, False))
        else:
            segments.append(Segment((fmt.system if m.role == "system" else fmt.user).format(content=m.content), False))
    if generation_prompt:
        segments.append(Segment(fmt.assistant_header, False))
    return [s for s in segments if s.text or s.eos]


def _render_with_tokenizer(messages: list[Message], tokenizer, generation_prompt: bool) -> list[Segment]:
    """Render prefix by prefix with the tokenizer's template and keep the differences, so each piece is one turn."""

    def apply(msgs: list[Message], add_generation_prompt: bool) -> str:
        if not msgs:
            return ""
        return tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in msgs],
                                             tokenize=False, add_generation_prompt=add_generation_prompt)

    segments, prev = [], ""
    for i, m in enumerate(messages):
        if m.role == "assistant":
            head = apply(messages[:i], True)
            full = apply(messages[: i + 1], False)
            _check_prefix(prev, head)
            _check_prefix(head, full)
            segments.append(Segment(head[len(prev):], False))
            segments.append(Segment(full[len(head):], True, eos=True))
        else:
            full = apply(messages[: i + 1], False)
            _check_prefix(prev, full)
            segments.append(Segment(full[len(prev):], False))
        prev = full
    if generation_prompt:
        head = apply(messages, True)
        _check_prefix(prev, head)
        segments.append(Segment(head[len(prev):], False))
    return [s for s in segments if s.text or s.eos]


def _check_prefix(prefix: str, text: str) -> None:
    if not text.startswith(prefix):
        raise ConfigError("template: the tokenizer's chat template does not render conversations incrementally (a "
                          "longer conversation does not start with the shorter one); choose a built-in template")
