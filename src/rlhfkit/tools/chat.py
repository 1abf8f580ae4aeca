"""`rlhfkit chat`: talk with a model in the terminal, several turns (DeepSpeed-Chat's chat.py).

The conversation is kept as messages and rendered again with the model's template at every turn, so the model sees
exactly the format it was trained on; a history longer than `max_prompt_len` tokens loses its oldest tokens (as a
PPO prompt does). `/clear` starts a new conversation, `/exit` or end of input quits.
"""

from __future__ import annotations

import itertools
import unicodedata
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator


from rlhfkit.config import option, require, require_seed
from rlhfkit.data.encode import EncodeStats, encode_prompt
from rlhfkit.data.formats import Message, PromptExample
from rlhfkit.data.templates import resolve_template
from rlhfkit.models import check_positions, default_device, load_causal_lm, load_tokenizer
from rlhfkit.tools.generation import Response, generate_from_ids
from rlhfkit.training.common import check_model_path, setup_logging

CLEAR, EXIT = "/clear", "/exit"


@dataclass
class ChatConfig:
    model: str = option("", "model folder (or hub id) to talk with", group="model")
    template: str = option("auto", "chat template (auto: the tokenizer's own, else human-assistant)", group="model",
                           choices=("auto", "tokenizer", "human-assistant", "alpaca", "chatml"))
    max_prompt_len: int = option(512, "a longer conversation loses its oldest tokens", group="generation")
    max_new_tokens: int = option(128, "longest reply in tokens", group="generation")
    temperature: float = option(0.7, "sampling temperature; 0 = greedy decoding", group="generation")
    top_p: float = option(0.9, "nucleus sampling threshold (with temperature > 0)", group="generation")
    seed: int = option(0, "seed of the sampling; turn k draws from seed + k, so a session can be replayed",
                       group="generation")

    def check(self) -> None:
        require(bool(self.model), "model: required")
        check_model_path(self.model, "model")
        require(self.max_new_tokens >= 1, f"max_new_tokens: must be >= 1, got {self.max_new_tokens}")
        require(self.max_prompt_len >= 8, f"max_prompt_len: must be >= 8, got {self.max_prompt_len}")
        require(self.temperature >= 0, f"temperature: must be >= 0 (0 = greedy), got {self.temperature}")
        require(0 < self.top_p <= 1, f"top_p: must be in (0, 1], got {self.top_p}")
        require_seed(self.seed)
        check_positions([(self.model, "model", self.max_prompt_len + self.max_new_tokens,
                          f"max_prompt_len + max_new_tokens ({self.max_prompt_len} + {self.max_new_tokens})")])


@dataclass
class Turn:
    prompt_ids: list[int]  # what the model continued: the conversation so far in its template, after truncation
    prompt: str  # the same, decoded (special tokens kept)
    reply: Response


def chat_loop(lines: Iterable[str], write: Callable[[str], None], respond: Callable[[list[Message]], Turn]
              ) -> list[Turn]:
    """Run a conversation: each user line is added to the history, `respond` answers the whole history, and the
    reply is written (`write` gets whole lines) and added too. Returns every turn in order."""
    history: list[Message] = []
    turns = []
    for line in lines:
        text = line.strip()
        if text == EXIT:
            break
        if text == CLEAR:
            history = []
            write("(history cleared)")
            continue
        if not text:
            continue
        history.append(Message("user", text))
        turn = respond(history)
        history.append(Message("assistant", turn.reply.text))
        turns.append(turn)
        write(f"assistant> {printable(turn.reply.text)}")
    return turns


def printable(text: str) -> str:
    """`text` safe to print to a terminal: control characters but newline and tab are shown as escapes (\\r, \\x1b,
    ...). A model's `\\r` once overwrote the prompt; an escape sequence could recolour or clear the screen."""
    return "".join(c if c in "\n\t" or unicodedata.category(c) != "Cc" else c.encode("unicode_escape").decode("ascii")
                   for c in text)


def model_responder(model, tokenizer, template: str, *, max_new_tokens: int, temperature: float, top_p: float,
                    seed: int, max_prompt_len: int) -> Callable[[list[Message]], Turn]:
    """A `respond` for `chat_loop` that generates with `model`; `template` must be resolved (not `auto`)."""
    turn_index = itertools.count()

    def respond(history: list[Message]) -> Turn:
        ids = encode_prompt(PromptExample(list(history), raw=False), tokenizer, template, max_prompt_len,
                            EncodeStats())
        [reply] = generate_from_ids(model, tokenizer, [ids], max_new_tokens=max_new_tokens, temperature=temperature,
                                    top_p=top_p, seed=seed + next(turn_index))
        return Turn(prompt_ids=ids, prompt=tokenizer.decode(ids), reply=reply)

    return respond


def stdin_lines(prompt: str = "user> ") -> Iterator[str]:
    """Lines typed by the user (input() gives line editing); ends at EOF (Ctrl-D)."""
    while True:
        try:
            yield input(prompt)
        except EOFError:
            print()
            return


def run_chat(config: ChatConfig) -> list[Turn]:
    setup_logging()
    tokenizer = load_tokenizer(config.model)
    template = resolve_template(config.template, tokenizer)
    device = default_device()
    model = load_causal_lm(config.model, tokenizer).to(device)
    respond = model_responder(model, tokenizer, template, max_new_tokens=config.max_new_tokens,
                              temperature=config.temperature, top_p=config.top_p, seed=config.seed,
                              max_prompt_len=config.max_prompt_len)
    print(f"chatting with {config.model} (template {template}); {CLEAR} starts over, {EXIT} or Ctrl-D quits")
    return chat_loop(stdin_lines(), print, respond)
