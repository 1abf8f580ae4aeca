"""Token ids and loss masks for examples, with prompt-side truncation to `max_len`.

Truncation rule (the same for SFT and preference rows): a sequence longer than `max_len` loses tokens from the start
of its prompt (after BOS); if even the last response (with its EOS) does not fit beside one prompt token, the row is
dropped. Plain text (`text` kind) is instead cut at the end, as pretraining data is. Both are counted in
`EncodeStats` and reported.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlhfkit.data.formats import Conversation, PreferencePair, PromptExample
from rlhfkit.data.templates import Segment, render


@dataclass
class Encoded:
    input_ids: list[int]
    loss_mask: list[bool]  # True where the token is trained (response tokens and their EOS)
    response_start: int  # index of the first token of the last response


@dataclass
class EncodeStats:
    rows: int = 0
    truncated: int = 0
    dropped: int = 0

    def describe(self) -> str:
        return f"{self.rows} rows, {self.truncated} truncated from the prompt side, {self.dropped} dropped " \
               f"(response longer than max_len)"


def bos_ids(tokenizer) -> list[int]:
    """[BOS] when the tokenizer itself adds one to plain text (Llama does, GPT-2 does not)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    return [bos] if tokenizer("a")["input_ids"][:1] == [bos] else []


def tokenize_segments(segments: list[Segment], tokenizer, *, train_all: bool = False) -> Encoded:
    """Concatenate the segments' tokens; mask = trainable segments (and their EOS), or all but BOS with `train_all`."""
    ids: list[int] = []
    mask: list[bool] = []
    response_start = 0
    for seg in segments:
        piece = tokenizer(seg.text, add_special_tokens=False)["input_ids"] if seg.text else []
        if seg.eos and not _ends_with_eos(piece, tokenizer):
            piece = piece + [tokenizer.eos_token_id]
        if seg.trainable:
            response_start = len(ids)
        ids += piece
        mask += [seg.trainable or train_all] * len(piece)
    bos = bos_ids(tokenizer)
    if bos and ids[:1] != bos:
        ids, mask, response_start = bos + ids, [False] + mask, response_start + 1
    return Encoded(ids, mask, response_start)


def _ends_with_eos(piece: list[int], tokenizer) -> bool:
    """Whether a reply's tokens already end with EOS (a chat template wrote it; only whitespace may follow).

    An EOS inside the reply (its text held the EOS string, e.g. HTML's `</s>`) does not count: one still follows it.
    """
    eos = tokenizer.eos_token_id
    if eos not in piece:
        return False
    last = len(piece) - 1 - piece[::-1].index(eos)
    return not tokenizer.decode(piece[last + 1:]).strip()


def truncate(enc: Encoded, max_len: int, *, keep_start: int) -> tuple[Encoded | None, bool]:
    """(sequence cut to `max_len` by dropping prompt tokens after the first `keep_start` (BOS), was it cut).

    The sequence is None when the response does not fit beside one prompt token.
    """
    excess = len(enc.input_ids) - max_len
    if excess <= 0:
        return enc, False
    room = max(enc.response_start - keep_start - 1, 0)  # one prompt token stays so the response has a context
    if excess > room:
        return None, False
    cut = slice(keep_start, keep_start + excess)
    ids = enc.input_ids[: cut.start] + enc.input_ids[cut.stop:]
    mask = enc.loss_mask[: cut.start] + enc.loss_mask[cut.stop:]
    return Encoded(ids, mask, enc.response_start - excess), True


def encode_conversation(conv: Conversation, tokenizer, template: str, max_len: int, stats: EncodeStats,
                        *, train_all: bool = False) -> Encoded | None:
    enc = tokenize_segments(render(conv.messages, template, tokenizer, raw=conv.raw), tokenizer, train_all=train_all)
    stats.rows += 1
    if conv.format == "text":
        if len(enc.input_ids) > max_len:
            stats.truncated += 1
            return Encoded(enc.input_ids[:max_len], enc.loss_mask[:max_len], enc.response_start)
        return enc
    out, was_cut = truncate(enc, max_len, keep_start=len(bos_ids(tokenizer)))
    stats.truncated += was_cut
    stats.dropped += out is None
    return out


def encode_pair(pair: PreferencePair, tokenizer, template: str, max_len: int, stats: EncodeStats
                ) -> tuple[Encoded, Encoded] | None:
    """(chosen, rejected), each prompt + response + EOS; None when either response cannot fit.

    When the longer sequence is over `max_len`, both lose the same prompt tokens, so that the two responses are
    judged in the same context (and the prompt they share stays one, for `collate_pair_rows`)."""
    keep = len(bos_ids(tokenizer))
    both = [tokenize_segments(render(pair.prompt + response, template, tokenizer, raw=pair.raw), tokenizer)
            for response in (pair.chosen, pair.rejected)]
    excess = max(0, max(len(e.input_ids) for e in both) - max_len)
    results = [truncate(e, len(e.input_ids) - excess, keep_start=keep) for e in both]
    stats.rows += 1
    (chosen, chosen_cut), (rejected, rejected_cut) = results
    if chosen is None or rejected is None:
        stats.dropped += 1
        return None
    stats.truncated += chosen_cut or rejected_cut
    return chosen, rejected


EncodedPair = tuple[Encoded, Encoded, float]  # chosen, rejected, margin


def encode_pairs(pairs: list[PreferencePair], tokenizer, template: str, max_len: int, stats: EncodeStats
                 ) -> list[EncodedPair]:
    """The pairs that fit in `max_len`, encoded (what the reward model and DPO train on)."""
    out = []
    for pair in pairs:
        encoded = encode_pair(pair, tokenizer, template, max_len, stats)
        if encoded is not None:
            out.append((encoded[0], encoded[1], pair.margin))
    return out


def encode_prompt(example: PromptExample, tokenizer, template: str, max_prompt_len: int, stats: EncodeStats
                  ) -> list[int]:
    """Prompt ids ending with the assistant header, cut from the left (after BOS) to `max_prompt_len`."""
    segs = render(example.prompt, template, tokenizer, raw=example.raw, generation_prompt=True)
    ids = tokenize_segments(segs, tokenizer).input_ids
    stats.rows += 1
    if len(ids) > max_prompt_len:
        stats.truncated += 1
        keep = len(bos_ids(tokenizer))
        ids = ids[:keep] + ids[len(ids) - (max_prompt_len - keep):]
    return ids
