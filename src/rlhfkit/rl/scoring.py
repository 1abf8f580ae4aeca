"""Scores for responses: a reward model (same tokenizer as the actor, or any other by re-tokenizing the text) or a
Python function; then the missing-EOS rule, normalisation and clipping that turn a score into PPO's final reward."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import math
import numbers
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from rlhfkit import in_memory
from rlhfkit.config import ConfigError
from rlhfkit.data.batching import pad_right
from rlhfkit.data.encode import bos_ids, tokenize_segments, truncate
from rlhfkit.data.formats import Message, PromptExample
from rlhfkit.data.templates import render
from rlhfkit.models import TokenValues
from rlhfkit.rl.rollout import Rollout, value_at_last_token
from rlhfkit.training.distributed import adapter_disabled, unwrap
from rlhfkit.training.guards import SkippedIteration, TrainingError, describe


def load_reward_fn(spec: str, field: str = "reward_fn") -> Callable:
    """`module:function` (importable), `path/to/file.py:function`, or the name of a function handed over from Python
    (rlhfkit.in_memory); a ConfigError that says what is wrong."""
    if in_memory.is_name(spec):
        fn = in_memory.lookup(spec)
        if fn is None:
            raise ConfigError(f"{field}: {in_memory.missing_message(spec)}")
        problem = signature_problem(fn) if callable(fn) else "is not callable"
        if problem:
            raise ConfigError(f"{field}: {spec} {problem}")
        return fn
    target, _, name = spec.rpartition(":")
    if not target or not name:
        raise ConfigError(f"{field}: expected module:function or path/to/file.py:function, got {spec!r}")
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.is_file():
                raise ConfigError(f"{field}: {path} does not exist")
            module_spec = importlib.util.spec_from_file_location(f"rlhfkit_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[module_spec.name] = module
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except ConfigError:
        raise
    except Exception as exc:  # the user's module failed to import: show its error, not ours
        raise ConfigError(f"{field}: importing {target} failed: {type(exc).__name__}: {exc}") from exc
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"{field}: {target} has no function {name!r}")
    problem = signature_problem(fn)
    if problem:
        raise ConfigError(f"{field}: {spec} {problem}")
    return fn


CALLED_AS = "fn(prompts, responses, **prompt_columns)"


def signature_problem(fn: Callable) -> str | None:
    """Why `fn` cannot be called as CALLED_AS, or None. Its required parameters after the first two can only be
    prompt columns: whether the rows have them is `check_reward_columns`'s to say."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins have no signature: the call will tell
        return None
    try:
        signature.bind([], [], **{name: [] for name in required_columns(fn)})
    except TypeError as exc:
        return f"takes {signature}, but is called as {CALLED_AS} ({exc})"
    return None


def required_columns(fn: Callable) -> list[str]:
    """The parameters without a default that `fn` takes after prompts and responses: the prompt columns it needs."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return []
    kind = inspect.Parameter
    positional = [p for p in params if p.kind in (kind.POSITIONAL_ONLY, kind.POSITIONAL_OR_KEYWORD)]
    rest = positional[2:] + [p for p in params if p.kind is kind.KEYWORD_ONLY]
    # a positional-only one cannot be passed by name: signature_problem reports it
    return [p.name for p in rest if p.default is p.empty and p.kind is not kind.POSITIONAL_ONLY]


def check_reward_columns(fn: Callable, columns: set[str], who: str) -> None:
    """A ConfigError when `fn` requires prompt columns that are not among `columns` (those of the prompt rows)."""
    missing = [name for name in required_columns(fn) if name not in columns]
    if missing:
        have = ", ".join(sorted(columns)) or "none besides the prompt"
        needed = ", ".join(repr(name) for name in missing)
        raise ConfigError(f"{who}: requires the prompt column{'s' * (len(missing) > 1)} {needed}, which the prompt "
                          f"rows do not have (their columns: {have})")


def call_reward_fn(fn: Callable, prompts: list[str], responses: list[str], examples: list[PromptExample],
                   name: str = "") -> torch.Tensor:
    """(B,) float32 rewards from `fn(prompts, responses, **columns)`; NaN and inf are passed on (the caller skips the
    iteration), anything else wrong is a TrainingError naming the function (`name`) and what it did.

    columns are the prompt rows' other fields, one list each (e.g. `answer=[...]` for verifiable rewards); a function
    without **kwargs receives only the columns it names.
    """
    columns: dict[str, list[Any]] = {}
    for ex in examples:
        for key in ex.extra:
            columns.setdefault(key, [e.extra.get(key) for e in examples])
    params = inspect.signature(fn).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        columns = {k: v for k, v in columns.items() if k in params}
    name = name or getattr(fn, "__qualname__", repr(fn))
    try:
        result = fn(prompts, responses, **columns)
    except Exception as exc:  # the user's code: its own error, in one line, is what helps
        raise TrainingError(f"{name} raised {describe(exc)} (called on {len(responses)} responses)") from None
    rewards = _as_scores(result)
    if rewards is None:
        raise TrainingError(f"{name} returned {_summary(result)}; expected one number per response "
                            f"({len(responses)})")
    if rewards.numel() != len(responses):
        raise TrainingError(f"{name} returned {rewards.numel()} values for {len(responses)} responses; expected "
                            "one number per response")
    return rewards


def _as_scores(result: Any) -> torch.Tensor | None:
    """A flat float32 tensor from a list or tuple of numbers, a 1-D (or (B, 1)) tensor or array; None otherwise."""
    if isinstance(result, (list, tuple)):
        if not all(isinstance(x, numbers.Real) or (torch.is_tensor(x) and x.numel() == 1) for x in result):
            return None
        return torch.tensor([float(x) for x in result], dtype=torch.float32)
    if torch.is_tensor(result) or type(result).__module__ == "numpy":
        try:
            values = torch.as_tensor(result)
        except (TypeError, ValueError, RuntimeError):  # an array of strings or objects
            return None
        if values.dtype.is_complex or values.ndim > 2 or (values.ndim == 2 and values.shape[1] != 1):
            return None
        return values.to(torch.float32).flatten()
    return None


def _summary(value: Any) -> str:
    """What a function returned, for a message: its type and a short repr."""
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"


class FunctionScorer:
    """Scores from a Python function of the texts: the decoded prompts (as the actor saw them) and responses. `name`
    (e.g. "--reward-fn rewards.py:score") is how messages name it."""

    def __init__(self, fn: Callable, tokenizer, name: str = ""):
        self.fn, self.tokenizer = fn, tokenizer
        self.name = name or getattr(fn, "__qualname__", repr(fn))

    def __call__(self, rollout: Rollout, examples: list[PromptExample], response_texts: list[str],
                 batch_size: int = 0) -> torch.Tensor:
        """(B,) scores; `batch_size` is not used (the function sees the whole batch)."""
        prompts = self.tokenizer.batch_decode(rollout.input_ids[:, :rollout.prompt_len], skip_special_tokens=True)
        return call_reward_fn(self.fn, prompts, response_texts, examples, self.name)


class RewardModelScorer:
    """Scores from a sequence classifier. With the actor's tokenizer it reads the rollout's tokens as they are;
    with another tokenizer it decodes each response and builds the reward model's own input (its template, its
    tokens), since ids from one vocabulary mean nothing in another.

    `model` is the classifier or its `TokenValues` (as PPO holds it: wrapped by DDP or sharded by FSDP, when it is
    the LoRA critic whose disabled adapter gives the reward model)."""

    name = "the reward model"

    def __init__(self, model, tokenizer, *, adapter_disabled: bool, same_tokenizer: bool, template: str,
                 max_len: int):
        if model is not None and not isinstance(unwrap(model), TokenValues):
            model = TokenValues(model)
        self.model, self.tokenizer, self.adapter_disabled = model, tokenizer, adapter_disabled
        self.same_tokenizer, self.template, self.max_len = same_tokenizer, template, max_len

    @torch.no_grad()
    def __call__(self, rollout: Rollout, examples: list[PromptExample], response_texts: list[str],
                 batch_size: int) -> torch.Tensor:
        """(B,) scores, `batch_size` rows per forward pass."""
        if self.same_tokenizer:
            batch = {"input_ids": rollout.input_ids, "attention_mask": rollout.attention_mask}
        else:
            batch = self.retokenize(examples, response_texts, rollout.stopped.tolist())
        return self.score_batch(batch, batch_size)

    @torch.no_grad()
    def score_batch(self, batch: dict, batch_size: int) -> torch.Tensor:
        """(N,) scores of input_ids / attention_mask (N, T), `batch_size` rows per forward pass, each pass cut to the
        columns its rows attend (padding on either side costs nothing)."""
        device = next(self.model.parameters()).device
        scores = []
        with adapter_disabled(self.model) if self.adapter_disabled else contextlib.nullcontext():
            for start in range(0, batch["input_ids"].shape[0], batch_size):
                part = slice(start, start + batch_size)
                attended = batch["attention_mask"][part].any(0).nonzero()
                columns = slice(int(attended.min()), int(attended.max()) + 1)
                mask = batch["attention_mask"][part, columns].to(device)
                values = self.model(batch["input_ids"][part, columns].to(device), mask)
                scores.append(value_at_last_token(values, mask).float().cpu())
        return torch.cat(scores)

    def retokenize(self, examples: list[PromptExample], responses: list[str], stopped: list[bool]) -> dict:
        eos = self.tokenizer.eos_token_id
        sequences = []
        for example, response, ended in zip(examples, responses, stopped):
            segments = render(example.prompt + [Message("assistant", response)], self.template, self.tokenizer,
                              raw=example.raw)
            encoded = tokenize_segments(segments, self.tokenizer)
            if not ended and encoded.input_ids[-1] == eos:  # it was cut off: the reward model must not see an end
                encoded.input_ids.pop()
                encoded.loss_mask.pop()
            keep = len(bos_ids(self.tokenizer))
            cut, _ = truncate(encoded, self.max_len, keep_start=keep)
            if cut is None:  # the response alone is too long: keep BOS and the response's end
                ids = encoded.input_ids
                sequences.append(ids[:keep] + ids[len(ids) - (self.max_len - keep):])
            else:
                sequences.append(cut.input_ids)
        return pad_right(sequences, self.tokenizer.pad_token_id)


class Reward:
    """The reward an algorithm trains on: the weighted sum of its sources' scores (a reward model and/or Python
    functions). Each source is known by a short key (`reward_model`, or the function's name) under which its own
    score is logged."""

    def __init__(self, scorers: list, weights: list[float]):
        if len(scorers) != len(weights):
            raise ValueError(f"{len(weights)} weights for {len(scorers)} reward sources")
        self.scorers, self.weights = scorers, [float(w) for w in weights]
        self.keys: list[str] = []
        for scorer in scorers:
            key = "reward_model" if isinstance(scorer, RewardModelScorer) else \
                getattr(scorer.fn, "__name__", "reward_fn")
            self.keys.append(key if key not in self.keys else f"{key}_{len(self.keys)}")

    @property
    def model_scorer(self) -> RewardModelScorer | None:
        return next((s for s in self.scorers if isinstance(s, RewardModelScorer)), None)

    def scorer(self, key: str):
        return self.scorers[self.keys.index(key)]

    def __call__(self, rollout: Rollout, examples: list[PromptExample], response_texts: list[str],
                 batch_size: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """((B,) weighted reward, {key: (B,) that source's score})."""
        parts = {key: scorer(rollout, examples, response_texts, batch_size)
                 for key, scorer in zip(self.keys, self.scorers)}
        total = sum(w * parts[key] for key, w in zip(self.keys, self.weights))
        return total, parts


def same_vocabulary(a, b) -> bool:
    return a.get_vocab() == b.get_vocab() and a.eos_token_id == b.eos_token_id and a.pad_token_id == b.pad_token_id


@dataclass
class RunningMoments:
    """Mean and standard deviation of every score seen so far (Chan et al.'s parallel update), for `running`
    normalisation; saved in checkpoints."""
    count: float = 0.0
    mean: float = 0.0
    m2: float = 0.0

    def update(self, x: torch.Tensor) -> None:
        n, batch_mean = x.numel(), x.mean().item()
        batch_m2 = ((x - batch_mean) ** 2).sum().item()
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * n / total
        self.m2 += batch_m2 + delta ** 2 * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / (self.count - 1)) if self.count > 1 else 1.0


def shape_scores(scores: torch.Tensor, stopped: torch.Tensor, *, mean: float, std: float,
                 missing_eos_penalty: float, missing_eos_score: float | None, clip: float) -> torch.Tensor:
    """The score PPO adds at the last token: (scores - mean) / std; then a response that never stopped loses
    `missing_eos_penalty` (or gets `missing_eos_score` outright); then clipped to +-clip (0 = no clipping).
    scores (B,), stopped (B,) bool -> (B,)."""
    shaped = (scores - mean) / std
    not_stopped = ~stopped
    shaped = shaped - missing_eos_penalty * not_stopped.float()
    if missing_eos_score is not None:
        shaped = torch.where(not_stopped, torch.full_like(shaped, missing_eos_score), shaped)
    return shaped.clamp(-clip, clip) if clip > 0 else shaped


def check_finite_scores(iteration: int, named_scores: list[tuple[str, torch.Tensor]], texts: list[str]) -> None:
    """Raise SkippedIteration naming the scorer and the batch rows whose score is NaN or inf."""
    for name, values in named_scores:
        bad = (~torch.isfinite(values)).nonzero().flatten().tolist()
        if bad:
            shown = ", ".join(f"row {i} ({values[i].item()}, response {texts[i][:40]!r})" for i in bad[:3])
            more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
            raise SkippedIteration(f"iteration {iteration + 1} skipped: {name} returned a non-finite score for "
                                   f"{len(bad)} of {len(values)} responses: {shown}{more}")
