"""The rollout sampler: a decoding loop over the model's own forward pass, built for RL rollouts.

Hugging Face's `generate` is built for every decoding strategy; a rollout needs one: sample (or take the argmax),
keep the sampled token's log-probability, stop a row at EOS or a stop string. Doing only that, the loop here
- writes keys and values into a buffer allocated once per rollout (`generate`'s cache grows by concatenation, which
  copies the whole cache at every step);
- prefills each prompt once and copies its cache to its G samples when several samples per prompt are asked for;
- drops rows that have stopped from the batch (compaction), so a batch whose responses end early stops paying for
  them;
- warps the logits (temperature, top-k, top-p) in one place, with the same operations in the same order as
  `generate`'s warpers, and draws the token the way `torch.multinomial` does (argmax of p / q with q ~ Exp(1), one
  draw per row of the whole batch, finished rows included). With the same seed it therefore samples the same tokens
  as `generate`, whatever rows have left the batch.

Shapes: N rows (prompts x samples per prompt), P prompt columns (left-padded), R response columns, V vocabulary,
H heads, D head size.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from rlhfkit.models import position_ids, transformers_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sampling:
    """What a rollout samples."""
    max_new_tokens: int
    temperature: float = 1.0  # 0 = greedy decoding (no log-probs kept)
    top_p: float = 1.0
    top_k: int = 0  # 0 = every token
    stop_strings: tuple[str, ...] = ()
    samples_per_prompt: int = 1  # G: the samples of prompt i are rows i*G ... i*G + G - 1


@dataclass
class Samples:
    tokens: torch.Tensor  # (N, R) long: each row's tokens up to and including its stop token, then pad
    logprobs: torch.Tensor | None  # (N, R) float: log pi(token) at the sampling temperature, 0 after the stop


# --------------------------------------------------------------------------------------------------- the cache
class _BufferLayer(DynamicLayer):
    """One attention layer's keys and values (N, H, P + R, D), allocated at the prefill and written in place.

    It answers the model as a growing cache does (length so far, full causal attention over it), so the model's
    attention and masks are exactly those `generate` computes; only the copies are gone."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.keys = key_states.new_empty((*key_states.shape[:2], self.capacity, key_states.shape[3]),
                                         dtype=_stored_dtype(key_states))
        self.values = value_states.new_empty((*value_states.shape[:2], self.capacity, value_states.shape[3]),
                                             dtype=_stored_dtype(value_states))
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        self.keys[:, :, self.length:end] = key_states
        self.values[:, :, self.length:end] = value_states
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def get_seq_length(self) -> int:
        return self.length

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep (or repeat) these batch rows; only the filled columns are copied."""
        if not self.is_initialized:
            return
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = old.new_empty((len(rows), *old.shape[1:]))
            new[:, :, :self.length] = old[:, :, :self.length].index_select(0, rows)
            setattr(self, name, new)


def _stored_dtype(states: torch.Tensor) -> torch.dtype:
    """Under autocast, float32 keys (rotary embeddings compute them in float32) are stored in the autocast dtype:
    attention casts them to it anyway, so the values it sees are the same, and it no longer casts (copies) the
    whole cache at every step. In bf16 that copy was a fifth of a decoding step."""
    device = states.device.type
    if states.dtype == torch.float32 and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return states.dtype


def buffer_cache(n_layers: int, capacity: int) -> Cache:
    """An empty cache of `n_layers` buffer layers, each holding up to `capacity` positions."""
    return Cache(layers=[_BufferLayer(capacity) for _ in range(n_layers)])


def _select_rows(cache: Cache, rows: torch.Tensor) -> None:
    for layer in cache.layers:
        layer.select_rows(rows)


# ------------------------------------------------------------------------------------------ which models it drives
@dataclass(frozen=True)
class Driver:
    """How to call one model's forward for decoding: the name of its cache argument and what else it accepts."""
    cache_arg: str
    n_layers: int
    position_ids: bool
    logits_to_keep: bool

    def forward(self, model, input_ids, attention_mask, positions, cache, keep_last: bool) -> torch.Tensor:
        """(b, V) float32: the logits at the last position of each row."""
        kwargs = {self.cache_arg: cache, "use_cache": True}
        if self.position_ids:
            kwargs["position_ids"] = positions
        if self.logits_to_keep and keep_last:
            kwargs["logits_to_keep"] = 1
        with sdpa_kernel(_DECODE_ATTENTION) if input_ids.is_cuda else contextlib.nullcontext():
            out = model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        return out.logits[:, -1].float()


# cuDNN's fused attention builds an execution plan for every new key length, and the key length grows by one each
# decoding step: about 3 ms of CPU per call, 63% of a step of a 0.5B Llama on an H100 (torch 2.11). The other fused
# kernels have no such cost, and with an attention mask SDPA picks the memory-efficient one.
_DECODE_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


_reported: set[str] = set()


def driver(model) -> Driver | str:
    """The way to drive `model` (a causal LM, possibly a peft model) with the buffer cache, or why it cannot be."""
    inner = transformers_model(model)
    config = getattr(inner, "config", None)
    params = set(inspect.signature(inner.forward).parameters)
    cache_arg = next((name for name in ("cache", "past_key_values") if name in params), None)
    name = type(inner).__name__
    if config is None:
        return f"{name} is not a transformers model (no config)"
    if cache_arg is None:
        return f"{name}'s forward takes no cache argument"
    if getattr(config, "is_encoder_decoder", False):
        return f"{name} is an encoder-decoder"
    try:
        layers = DynamicCache(config=config).layers
    except Exception as exc:  # a config the cache cannot lay out (a recurrent or hybrid model)
        return f"transformers builds no key/value cache for {name}'s config ({exc})"
    kinds = {type(layer).__name__ for layer in layers}
    if not layers or kinds != {"DynamicLayer"}:
        return f"{name} needs cache layers other than full attention ({', '.join(sorted(kinds)) or 'none'})"
    return Driver(cache_arg, len(layers), "position_ids" in params, "logits_to_keep" in params)


def report_fallback(reason: str) -> None:
    """Log once per reason why a model is sampled with `generate` instead."""
    if reason not in _reported:
        _reported.add(reason)
        log.warning("sampling with transformers' generate (slower): %s", reason)


# ----------------------------------------------------------------------------------------------------- warping
def warp(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """(b, V) float32 logits -> scores whose softmax is the sampling distribution: divided by the temperature, then
    everything outside the top k and outside the smallest set holding top_p of the probability set to -inf.
    The operations and their order are `generate`'s (temperature, top-k, top-p), so the probabilities agree to the
    bit and a seeded draw picks the same token."""
    scores = logits / temperature if temperature != 1.0 else logits
    if top_k:
        kth_largest = torch.topk(scores, min(top_k, scores.shape[-1])).values[:, -1:]
        scores = scores.masked_fill(scores < kth_largest, float("-inf"))
    if top_p < 1.0:
        ascending, order = torch.sort(scores, descending=False)
        mass_below = ascending.softmax(-1).cumsum(-1)  # probability of this token and every less likely one
        drop = mass_below <= 1 - top_p
        drop[:, -1] = False  # the most likely token always stays
        scores = scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return scores


def draw(scores: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """(b,) one token per row, sampled from softmax(scores (b, V)).

    `torch.multinomial(p, 1)` is argmax(p / q) with q ~ Exp(1) drawn for the whole (n_rows, V) batch; drawing q for
    every row of the batch as it started (`rows` are the batch rows still decoding) keeps the random stream, and so
    every sample, what it is in `generate`, which decodes finished rows to the end."""
    probs = scores.softmax(-1)
    q = exponential((n_rows, scores.shape[-1]), probs.device)
    return (probs / (q if len(rows) == n_rows else q[rows])).argmax(-1)


def exponential(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Exp(1) draws (float32), the values and random stream of `torch.empty(shape).exponential_(1)`.

    On the CPU that kernel is serial: 34 ns a draw, 65 ms a step for 64 rows of a 32k vocabulary (Intel Xeon, torch
    2.13). It computes -log1p(-u) in double from a 53-bit uniform u made of two of the generator's 32-bit outputs,
    which is what a double `uniform_` draws; with the logarithm vectorised, the same values take two thirds of the
    time. Used where a check on a generator of its own finds them equal to the bit (else the kernel itself)."""
    if device.type != "cpu" or not _uniform_gives_exponential():
        return torch.empty(shape, device=device).exponential_(1)
    return _exponential_of(torch.empty(shape, dtype=torch.float64).uniform_())


def _exponential_of(uniform: torch.Tensor) -> torch.Tensor:
    """-log1p(-u) in float32 (in place on u); negating is exact, so the last negation waits for the 4-byte values."""
    return uniform.neg_().log1p_().float().neg_()


@functools.cache
def _uniform_gives_exponential() -> bool:
    generator = torch.Generator().manual_seed(20261128)
    kernel = torch.empty(4096).exponential_(1, generator=generator)
    generator.manual_seed(20261128)
    ours = _exponential_of(torch.empty(4096, dtype=torch.float64).uniform_(generator=generator))
    return torch.equal(kernel, ours)


# ---------------------------------------------------------------------------------------------------- decoding
@torch.no_grad()
def sample(model, drive: Driver, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, sampling: Sampling, *,
           stop_ids: tuple[int, ...], pad_id: int, stop_criteria=None) -> Samples:
    """Responses to left-padded prompts: prompt_ids, prompt_mask (B, P) on the model's device.

    A row stops at a token in `stop_ids` or when `stop_criteria` (transformers' `StopStringCriteria`, called with
    every row's ids (b, P + t)) says it completed a stop string. The loop ends when every row has stopped or at
    `max_new_tokens`, so R is the longest response."""
    B, P = prompt_ids.shape
    G, R_max = sampling.samples_per_prompt, sampling.max_new_tokens
    N, device = B * G, prompt_ids.device
    greedy = sampling.temperature == 0
    cache = buffer_cache(drive.n_layers, P + R_max)

    # 1. Prefill each prompt once; its G samples start from copies of its cache.
    positions = position_ids(prompt_mask)
    logits = drive.forward(model, prompt_ids, prompt_mask, positions, cache, keep_last=True)  # (B, V)
    next_position = positions[:, -1:] + 1  # (B, 1)
    if G > 1:
        repeat = torch.arange(B, device=device).repeat_interleave(G)
        _select_rows(cache, repeat)
        logits, next_position = logits[repeat], next_position[repeat]
    # Every row's ids and attention mask as the loop goes (indexed by the row's place in the whole rollout).
    ids = torch.full((N, P + R_max), pad_id, dtype=torch.long, device=device)
    ids[:, :P] = prompt_ids.repeat_interleave(G, 0)
    mask = torch.ones((N, P + R_max), dtype=prompt_mask.dtype, device=device)
    mask[:, :P] = prompt_mask.repeat_interleave(G, 0)
    logprobs = None if greedy else torch.zeros((N, R_max), device=device)
    stop = torch.tensor(stop_ids, device=device)

    rows = torch.arange(N, device=device)  # (b,) the rollout row of each batch row
    decoding_rows = torch.ones(N, dtype=torch.bool, device=device)  # (b,) False once the row has stopped
    t = 0
    for t in range(R_max):
        # 2. Pick each row's token; keep its log-probability at the sampling temperature.
        if greedy:
            token = logits.argmax(-1)
        else:
            token = draw(warp(logits, sampling.temperature, sampling.top_k, sampling.top_p), rows, N)
        live = rows[decoding_rows]
        ids[live, P + t] = token[decoding_rows]
        if logprobs is not None:
            scaled = logits / sampling.temperature if sampling.temperature != 1.0 else logits  # x / 1 is x
            chosen = scaled.log_softmax(-1).gather(1, token[:, None]).squeeze(1)
            logprobs[live, t] = chosen[decoding_rows]

        # 3. Rows that reached a stop token or stop string stop sampling.
        finished = torch.isin(token, stop)
        if stop_criteria is not None:
            finished |= stop_criteria(ids[rows, :P + t + 1], None).to(device)
        decoding_rows &= ~finished
        if t == R_max - 1 or not decoding_rows.any():
            break

        # 4. Once a quarter of the batch has stopped, the rest continue without it (one copy of the cache's filled
        # columns; the stopped rows' tokens are computed and ignored until then).
        stopped = len(rows) - int(decoding_rows.sum())
        if 4 * stopped >= len(rows):
            keep = decoding_rows.nonzero().squeeze(1)
            _select_rows(cache, keep)
            rows, token, next_position = rows[keep], token[keep], next_position[keep]
            decoding_rows = decoding_rows[keep]

        # 5. One step of every row still in the batch.
        logits = drive.forward(model, token[:, None], mask[rows, :P + t + 2], next_position, cache, keep_last=False)
        next_position = next_position + 1

    tokens = ids[:, P:P + t + 1]
    return Samples(tokens, None if logprobs is None else logprobs[:, :t + 1])
