"""Experience from the models: left-padded generation, stop handling, and the forward passes PPO needs.

A rollout batch is laid out as [prompt, left-padded to P | response, right-padded to R]: input_ids and
attention_mask (B, P + R), response_mask (B, R). Positions are counted over attended tokens only, so a sequence gets
the same log-probs whatever padding surrounds it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers.cache_utils import Cache, DynamicLayer
from transformers.generation.stopping_criteria import StopStringCriteria

from rlhfkit.data.batching import chunks
from rlhfkit.logprobs import logprobs_from_logits
from rlhfkit.models import checkpoints_activations, position_ids, token_values
from rlhfkit.rl.core import entropy_from_logits, truncate_after_stop
from rlhfkit.rl.sampler import Sampling, driver, report_fallback, sample  # Sampling: callers import it from here
from rlhfkit.training.distributed import unwrap


@dataclass
class Rollout:
    input_ids: torch.Tensor  # (B, P + R) prompt left-padded, response right-padded
    attention_mask: torch.Tensor  # (B, P + R) long
    prompt_len: int  # P
    response_mask: torch.Tensor  # (B, R) bool
    stopped: torch.Tensor  # (B,) bool: the response ended with EOS or a stop string (else it hit max_new_tokens)
    # (B, R) log-probs of the sampled tokens under the actor at sampling time (temperature applied, 0 where masked),
    # read from the logits generation computed anyway; None for greedy decoding
    logprobs: torch.Tensor | None = None

    @property
    def responses(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_len:]


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask (B, P), padded on the left so every prompt ends where generation starts."""
    longest = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, longest - len(seq):] = torch.tensor(seq, dtype=torch.long)
        mask[i, longest - len(seq):] = 1
    return ids, mask


@torch.no_grad()
def generate(actor, prompts: list[list[int]], tokenizer, sampling: Sampling) -> Rollout:
    """Sample `sampling.samples_per_prompt` responses per prompt (rows i*G ... i*G + G - 1 answer prompt i); each is
    cut after its first EOS or stop string, the rest masked.

    rlhfkit's sampler (rl/sampler.py) decodes; a model it cannot drive is sampled with transformers' `generate`, which
    gives the same tokens for the same seed, more slowly. `sampling.temperature == 0` decodes greedily (the
    evaluation tools' default; PPO's config requires > 0)."""
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    G = sampling.samples_per_prompt
    prompt_ids, prompt_mask = left_pad(prompts, pad_id)
    device = next(actor.parameters()).device
    actor.eval()
    drive = driver(actor)
    if isinstance(drive, str):
        report_fallback(drive)
        responses, logprobs = _hf_generate(actor, prompt_ids.to(device), prompt_mask.to(device), tokenizer, sampling)
    else:
        criteria = StopStringCriteria(tokenizer, list(sampling.stop_strings)) if sampling.stop_strings else None
        samples = sample(actor, drive, prompt_ids.to(device), prompt_mask.to(device), sampling, stop_ids=(eos_id,),
                         pad_id=pad_id, stop_criteria=criteria)
        responses, logprobs = samples.tokens, samples.logprobs
    responses = responses.cpu()
    logprobs = None if logprobs is None else logprobs.cpu()
    if G > 1:
        prompt_ids, prompt_mask = prompt_ids.repeat_interleave(G, 0), prompt_mask.repeat_interleave(G, 0)
        prompts = [p for p in prompts for _ in range(G)]
    is_stop = responses == eos_id
    if sampling.stop_strings:
        is_stop |= stop_string_ends(responses, tokenizer, sampling.stop_strings, prompts)
    responses, response_mask, stopped = truncate_after_stop(responses, is_stop, pad_id)
    return Rollout(input_ids=torch.cat([prompt_ids, responses], 1),
                   attention_mask=torch.cat([prompt_mask, response_mask.long()], 1),
                   prompt_len=prompt_ids.shape[1], response_mask=response_mask, stopped=stopped,
                   logprobs=None if logprobs is None else logprobs.masked_fill(~response_mask, 0.0))


def _hf_generate(actor, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, tokenizer, sampling: Sampling
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(responses (N, R), log-probs (N, R) or None) from transformers' `generate`: the sampler's fallback, and the
    reference its tests compare with."""
    greedy = sampling.temperature == 0
    # Greedy decoding takes no sampling settings: transformers warns about (and may reject) them with do_sample off.
    sample_args = {} if greedy else {"temperature": sampling.temperature, "top_p": sampling.top_p,
                                     "top_k": sampling.top_k}
    # A config of its own: a model's generation_config.json (repetition penalties, length limits) must not change
    # what PPO samples.
    config = GenerationConfig(do_sample=not greedy, **sample_args, max_new_tokens=sampling.max_new_tokens,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                              use_cache=True, stop_strings=list(sampling.stop_strings) or None,
                              num_return_sequences=sampling.samples_per_prompt)
    extra = {"tokenizer": tokenizer} if sampling.stop_strings else {}
    recorder = None if greedy else _SampledLogprobs(sampling.temperature)
    if recorder is not None:
        extra["logits_processor"] = LogitsProcessorList([recorder])
    out = actor.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=config, **extra)
    responses = out[:, prompt_ids.shape[1]:]
    return responses, None if recorder is None else recorder.logprobs(responses)


class _SampledLogprobs(LogitsProcessor):
    """Keeps log pi(token) of each sampled token, at the sampling temperature, from the logits `generate` computes
    anyway: PPO's old log-probs without another forward pass of the actor.

    transformers runs the processors passed to `generate` before its temperature, top-k and top-p warpers, so the
    scores seen here are the model's logits. The token sampled from step t's scores is the last column of the ids
    passed at step t + 1 (or of the output, for the last step); one step's (B, V) log-softmax is held at a time."""

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.previous: torch.Tensor | None = None  # (B, V) the last step's log-softmax
        self.columns: list[torch.Tensor] = []  # (B, 1) each

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.previous is not None:
            self.columns.append(self.previous.gather(1, input_ids[:, -1:]))
        self.previous = (scores.float() / self.temperature).log_softmax(-1)
        return scores

    def logprobs(self, responses: torch.Tensor) -> torch.Tensor:
        """(B, R) for the generated `responses` (B, R)."""
        if self.previous is None or len(self.columns) + 1 != responses.shape[1]:
            raise RuntimeError(f"generate called the logits processor {len(self.columns) + (self.previous is not None)}"
                               f" times for {responses.shape[1]} new tokens")
        return torch.cat(self.columns + [self.previous.gather(1, responses[:, -1:])], 1)


def concat_rollouts(parts: list[Rollout], pad_id: int) -> Rollout:
    """The rows of `parts` in order as one rollout: prompts left-padded to the longest P, responses right-padded to
    the longest R (what each rank generated, put together as one process would have generated it)."""
    P = max(r.prompt_len for r in parts)
    R = max(r.response_mask.shape[1] for r in parts)

    def repad(x: torch.Tensor, left: int, right: int, value) -> torch.Tensor:
        return torch.nn.functional.pad(x, (left, right), value=value)

    pieces = []
    for r in parts:
        left, right = P - r.prompt_len, R - r.response_mask.shape[1]
        pieces.append((repad(r.input_ids, left, right, pad_id), repad(r.attention_mask, left, right, 0),
                       repad(r.response_mask, 0, right, False)))
    with_logprobs = all(r.logprobs is not None for r in parts)
    return Rollout(input_ids=torch.cat([p[0] for p in pieces]), attention_mask=torch.cat([p[1] for p in pieces]),
                   prompt_len=P, response_mask=torch.cat([p[2] for p in pieces]),
                   stopped=torch.cat([r.stopped for r in parts]),
                   logprobs=torch.cat([pad_responses(r.logprobs, R) for r in parts]) if with_logprobs else None)


def pad_responses(x: torch.Tensor, length: int, value: float = 0.0) -> torch.Tensor:
    """(B, R) per-token values right-padded to (B, length)."""
    return torch.nn.functional.pad(x, (0, length - x.shape[1]), value=value)


def stop_string_ends(responses: torch.Tensor, tokenizer, stop_strings: tuple[str, ...],
                     prompts: list[list[int]] | None = None) -> torch.Tensor:
    """(B, R) bool: True at the token whose text completes the first stop string of each response.

    A stop string may begin in the prompt's last tokens (a prompt ending in "\n" and the stop string "\nUser:"), as
    generate sees it; only an occurrence that ends inside the response counts.
    """
    marks = torch.zeros_like(responses, dtype=torch.bool)
    longest = max(len(s) for s in stop_strings)
    for row, ids in enumerate(responses.tolist()):
        tail = prompts[row][len(prompts[row]) - (longest - 1):] if prompts and longest > 1 else []
        tail_chars = len(tokenizer.decode(tail))

        def completed(k: int) -> bool:
            text = tokenizer.decode(tail + ids[:k])
            return any(text.find(s, max(0, tail_chars - len(s) + 1)) >= 0 for s in stop_strings)

        if not completed(len(ids)):
            continue
        low, high = 1, len(ids)  # the shortest response prefix that completes a stop string (monotone in k)
        while low < high:
            mid = (low + high) // 2
            if completed(mid):
                high = mid
            else:
                low = mid + 1
        marks[row, low - 1] = True
    return marks


def response_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
                      temperature: float, *, with_entropy: bool = False, entropy_grad: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log-probs (B, R), entropy (B, R) or None) of the response tokens under `model`, at the sampling temperature.
    The entropy is detached unless `entropy_grad` (an entropy bonus trains on it; a logged entropy need not pay for a
    backward pass over (B, R, V)).

    Only the R + 1 last positions' logits are computed: the full (B, T, V) tensor is the largest in PPO.
    """
    n_response = input_ids.shape[1] - prompt_len
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                   logits_to_keep=n_response + 1, use_cache=False).logits
    logits = logits[:, :-1].float() / temperature  # position P-1+t predicts response token t
    logprobs = logprobs_from_logits(logits, input_ids[:, prompt_len:])
    if not with_entropy:
        return logprobs, None
    return logprobs, entropy_from_logits(logits if entropy_grad else logits.detach())


def group_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int, group_size: int,
                   temperature: float, *, with_entropy: bool = False, entropy_grad: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """As `response_logprobs`, for rows that come in groups of G answering one prompt (rows j*G ... j*G + G - 1, the
    same prompt tokens): each prompt goes through the model once, and its keys and values (with their gradient)
    serve its G responses. (b, p + r) with b = k * G -> (b, r) each.

    GRPO's prompts pass G times through the reference and the policy otherwise: with G = 4, 38 prompt and 32 response
    tokens per row, this is 41% fewer FLOPs in both."""
    G = group_size
    # DDP prepares its gradient reduction in each forward call, so the prompt pass goes to the module it wraps; the
    # gradient reaches the same parameters either way.
    inner = unwrap(model)
    drive = driver(inner)
    # Each row whole for a model the sampler cannot drive, and under gradient checkpointing: transformers drops the
    # cache there (a checkpointed layer would write it again when the backward pass recomputes it).
    if isinstance(drive, str) or recomputes_layers(inner):
        return response_logprobs(model, input_ids, attention_mask, prompt_len, temperature, with_entropy=with_entropy,
                                 entropy_grad=entropy_grad)
    prompt_ids, prompt_mask = input_ids[::G, :prompt_len], attention_mask[::G, :prompt_len]
    positions = position_ids(attention_mask)
    out = inner(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions[::G, :prompt_len],
                logits_to_keep=1, use_cache=True)
    prefix = getattr(out, "cache", None) or out.past_key_values
    shared = Cache(layers=[DynamicLayer() for _ in prefix.layers])
    for i, layer in enumerate(prefix.layers):  # each prompt's keys and values, once per response of its group
        shared.update(layer.keys.repeat_interleave(G, 0), layer.values.repeat_interleave(G, 0), i)
    rest = model(input_ids=input_ids[:, prompt_len:], attention_mask=attention_mask,
                 position_ids=positions[:, prompt_len:], use_cache=True, **{drive.cache_arg: shared}).logits
    # the prompt's last position predicts response token 0; response position t predicts token t + 1
    logits = torch.cat([out.logits[:, -1:].repeat_interleave(G, 0), rest[:, :-1]], 1).float() / temperature
    logprobs = logprobs_from_logits(logits, input_ids[:, prompt_len:])
    if not with_entropy:
        return logprobs, None
    return logprobs, entropy_from_logits(logits if entropy_grad else logits.detach())


def recomputes_layers(model) -> bool:
    """Whether this forward pass of `model` runs under gradient checkpointing (training, with gradients)."""
    return checkpoints_activations(model) and model.training and torch.is_grad_enabled()


@dataclass
class MicroBatch:
    """Some rows of a rollout cut to their own width: prompt columns that none of them attends and response columns
    past the longest of their responses are dropped, so that padding costs no compute."""
    rows: list[int]
    input_ids: torch.Tensor  # (b, p + r)
    attention_mask: torch.Tensor  # (b, p + r)
    prompt_len: int  # p
    response_len: int  # r
    group_size: int = 1  # G > 1: whole groups of G rows that answer one prompt, their prompt computed once

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """A rollout's per-token tensor (B, R) -> (b, r): these rows, the columns kept."""
        return x[self.rows, :self.response_len]

    def logprobs(self, model, device, temperature: float, **entropy) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`response_logprobs` of these rows (`group_logprobs` for whole groups), on `device`."""
        ids, attn = self.input_ids.to(device), self.attention_mask.to(device)
        if self.group_size > 1:
            return group_logprobs(model, ids, attn, self.prompt_len, self.group_size, temperature, **entropy)
        return response_logprobs(model, ids, attn, self.prompt_len, temperature, **entropy)


def micro_batches(rollout: Rollout, rows: list[int], size: int, group_size: int = 1) -> list[MicroBatch]:
    """`rows` of the rollout `size` at a time, longest first so that rows of like length share a micro-batch.

    group_size G > 1: `rows` are whole groups (G consecutive rows answering one prompt, in order), kept whole, at
    least one group per micro-batch, so that each prompt is computed once (`group_logprobs`)."""
    G = group_size
    prompt_lens = rollout.attention_mask[:, :rollout.prompt_len].sum(-1).tolist()
    response_lens = rollout.response_mask.sum(-1).tolist()
    units = [rows[i:i + G] for i in range(0, len(rows), G)]
    if G > 1 and any(unit != list(range(unit[0], unit[0] + G)) or unit[0] % G for unit in units):
        raise ValueError(f"rows {rows} are not whole groups of {G}")
    ordered = sorted(units, key=lambda u: -max(prompt_lens[i] + response_lens[i] for i in u))
    batches = []
    for group in chunks(ordered, max(1, size // G)):
        part = [i for unit in group for i in unit]
        p = max(prompt_lens[i] for i in part)
        r = max(1, max(response_lens[i] for i in part))
        columns = slice(rollout.prompt_len - p, rollout.prompt_len + r)
        batches.append(MicroBatch(part, rollout.input_ids[part, columns], rollout.attention_mask[part, columns], p, r,
                                  G))
    return batches


def last_token_scores(classifier, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) a reward model's score of each sequence, read at its last attended token."""
    return value_at_last_token(token_values(classifier, input_ids, attention_mask), attention_mask)


def value_at_last_token(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """values (B, T), attention_mask (B, T) -> (B,) each row's value at its last attended position."""
    last = attention_mask.shape[1] - 1 - attention_mask.flip(-1).long().argmax(-1)
    return values.gather(1, last.unsqueeze(1)).squeeze(1)
