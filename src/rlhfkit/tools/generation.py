"""Responses from a model for evaluation (greedy by default, or seeded sampling) and their reward-model scores.

Generation goes through PPO's own `rollout.generate`, so a response here is cut where PPO would cut it (first EOS)
and a prompt is encoded as PPO encodes it (`encode_prompt`: template, assistant header, left truncation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhfkit.data.batching import chunks
from rlhfkit.data.encode import EncodeStats, encode_prompt
from rlhfkit.data.formats import PromptExample
from rlhfkit.rl.rollout import Sampling, generate
from rlhfkit.rl.scoring import RewardModelScorer


@dataclass
class Response:
    text: str  # decoded without special tokens
    stopped: bool  # ended with EOS (else cut off at max_new_tokens)
    n_tokens: int  # len(ids)
    ids: list[int]  # the response's tokens, its EOS included when it stopped


def generate_responses(model, tokenizer, examples: list[PromptExample], template: str, *, max_new_tokens: int,
                       temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, batch_size: int = 16,
                       max_prompt_len: int = 512) -> list[Response]:
    """One response per example, its prompt rendered with `template` (resolved, not `auto`) and cut from the left to
    `max_prompt_len` tokens. Temperature 0 is greedy decoding."""
    stats = EncodeStats()
    prompts = [encode_prompt(ex, tokenizer, template, max_prompt_len, stats) for ex in examples]
    return generate_from_ids(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                             top_p=top_p, seed=seed, batch_size=batch_size)


def generate_from_ids(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, temperature: float = 0.0,
                      top_p: float = 1.0, seed: int = 0, batch_size: int = 16) -> list[Response]:
    """One response per prompt of token ids, generated `batch_size` prompts at a time.

    The random stream is forked and seeded, so sampled responses are a function of (seed, batch_size) and the
    caller's RNG state is left as it was (a training loop can evaluate mid-run without changing its own samples).
    """
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
    responses = []
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for group in chunks(prompts, batch_size):
            rollout = generate(model, group, tokenizer, sampling)
            for row, mask, stopped in zip(rollout.responses, rollout.response_mask, rollout.stopped.tolist()):
                ids = row[mask].tolist()
                responses.append(Response(tokenizer.decode(ids, skip_special_tokens=True), stopped, len(ids), ids))
    return responses


@torch.no_grad()
def score_responses(reward_model, reward_tokenizer, examples: list[PromptExample], responses: list[Response],
                    template: str, *, max_len: int = 512, batch_size: int = 16) -> list[float]:
    """The reward model's score of each prompt + response text, read at the last token.

    The texts are rendered in the reward model's template and tokens exactly as PPO does for a reward model with
    another tokenizer (a response that was cut off gets no EOS), so these are the scores PPO would have trained on.
    """
    scorer = RewardModelScorer(reward_model, reward_tokenizer, adapter_disabled=False, same_tokenizer=False,
                               template=template, max_len=max_len)
    reward_model.eval()
    return scorer.score_batch(scorer.retokenize(examples, [r.text for r in responses], [r.stopped for r in responses]),
                              batch_size).tolist()
