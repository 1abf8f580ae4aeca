"""`rlhfkit compare`: several models' responses to the same prompts side by side (base | SFT | PPO), optionally with a
reward model's score under each, as a table and as JSON."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


from rlhfkit.config import ConfigError, option, require, require_seed
from rlhfkit.data.formats import PromptExample
from rlhfkit.data.loading import load_examples
from rlhfkit.data.templates import resolve_template
from rlhfkit.models import (check_positions, default_device, load_causal_lm, load_sequence_classifier,
                            load_tokenizer)
from rlhfkit.tools.generation import generate_responses, score_responses
from rlhfkit.training.common import check_data_specs, check_model_path, check_output_file, log, setup_logging


@dataclass
class CompareConfig:
    models: list[str] = option([], "models to compare as NAME=PATH items, comma-separated or as several values "
                                   "(base=gpt2,sft=runs/sft/final,ppo=runs/ppo/final)", group="model")
    prompts: list[str] = option([], "prompt data files or folders (as for PPO)", group="data")
    num_prompts: int = option(8, "the first N prompts are answered (0 = all)", group="data")
    template: str = option("auto", "chat template for every model (auto: each tokenizer's own, else "
                                   "human-assistant)", group="model",
                           choices=("auto", "tokenizer", "human-assistant", "alpaca", "chatml"))
    max_prompt_len: int = option(512, "prompts longer than this lose tokens from the left", group="generation")
    max_new_tokens: int = option(64, "longest response in tokens", group="generation")
    temperature: float = option(0.0, "sampling temperature; 0 = greedy decoding", group="generation")
    top_p: float = option(1.0, "nucleus sampling threshold (with temperature > 0)", group="generation")
    seed: int = option(0, "seed of the sampling (every model draws from the same seed)", group="generation")
    batch_size: int = option(16, "prompts per generate call", group="generation")
    reward_model: str = option("", "reward model that scores every response (optional)", group="model")
    output: str = option("", "also write every prompt, response, its token ids, stop flag and score to this JSON file",
                         group="general")

    def check(self) -> None:
        require(bool(self.models), "models: required (NAME=PATH items)")
        for path in parse_models(self.models).values():
            check_model_path(path, "models")
        require(bool(self.prompts), "prompts: required")
        check_data_specs(self.prompts, "prompts")
        if self.reward_model:
            check_model_path(self.reward_model, "reward_model")
        require(self.num_prompts >= 0, f"num_prompts: must be >= 0, got {self.num_prompts}")
        require(self.max_new_tokens >= 1, f"max_new_tokens: must be >= 1, got {self.max_new_tokens}")
        require(self.max_prompt_len >= 8, f"max_prompt_len: must be >= 8, got {self.max_prompt_len}")
        require(self.temperature >= 0, f"temperature: must be >= 0 (0 = greedy), got {self.temperature}")
        require(0 < self.top_p <= 1, f"top_p: must be in (0, 1], got {self.top_p}")
        require(self.batch_size >= 1, f"batch_size: must be >= 1, got {self.batch_size}")
        require_seed(self.seed)
        check_output_file(self.output, "output")
        # every model, and the reward model after it, sees a prompt and its response
        tokens = self.max_prompt_len + self.max_new_tokens
        what = f"max_prompt_len + max_new_tokens ({self.max_prompt_len} + {self.max_new_tokens})"
        needs = [(path, "model", tokens, what) for path in parse_models(self.models).values()]
        if self.reward_model:
            needs.append((self.reward_model, "reward_model", tokens, what))
        check_positions(needs)


def parse_models(items: list[str]) -> dict[str, str]:
    """["base=a,sft=b", "ppo=c"] -> {"base": "a", "sft": "b", "ppo": "c"} in that order; a ConfigError names a bad
    item."""
    models: dict[str, str] = {}
    for item in (piece.strip() for value in items for piece in value.split(",")):
        if not item:
            continue
        name, sep, path = (part.strip() for part in item.partition("="))
        if not sep or not name or not path:
            raise ConfigError(f"models: expected NAME=PATH, got {item!r}")
        if name in models:
            raise ConfigError(f"models: the name {name!r} is given twice")
        models[name] = path
    return models


def prompt_text(example: PromptExample) -> str:
    """The prompt as a reader wants to see it: the text itself, or role-labelled turns for a conversation."""
    if example.raw or len(example.prompt) == 1:
        return "".join(m.content for m in example.prompt)
    return "\n".join(f"{m.role}: {m.content}" for m in example.prompt)


def compare_models(models: dict[str, str], examples: list[PromptExample], *, template: str = "auto",
                   max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                   batch_size: int = 16, max_prompt_len: int = 512, reward_model: str = "") -> list[dict]:
    """One row per example: {"prompt": text, "responses": {name: {"text", "stopped", "n_tokens", "ids", "score"}}},
    ids: the sampled response tokens (its EOS included when it stopped), which re-tokenising the text need not give.

    Each model uses its own tokenizer and `template` resolved for it; the score is None without a reward model.
    Models are loaded one at a time, so comparing three models costs the memory of one (plus the reward model).
    """
    device = default_device()
    # every tokenizer and template first: a template mistake stops the comparison before any model loads
    tokenizers = {name: load_tokenizer(path) for name, path in models.items()}
    templates = {name: resolve_template(template, tok) for name, tok in tokenizers.items()}
    reward = None
    if reward_model:
        reward_tokenizer = load_tokenizer(reward_model)
        reward_template = resolve_template(template, reward_tokenizer)
        reward = (load_sequence_classifier(reward_model, reward_tokenizer).to(device), reward_tokenizer,
                  reward_template)
    rows = [{"prompt": prompt_text(ex), "responses": {}} for ex in examples]
    for name, path in models.items():
        tokenizer = tokenizers[name]
        model = load_causal_lm(path, tokenizer).to(device)
        responses = generate_responses(model, tokenizer, examples, templates[name],
                                       max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                       seed=seed, batch_size=batch_size, max_prompt_len=max_prompt_len)
        del model
        scores = [None] * len(responses)
        if reward is not None:
            # The reward model sees the prompt again in its own template, plus the response: its whole input must fit.
            scores = score_responses(reward[0], reward[1], examples, responses, reward[2],
                                     max_len=max_prompt_len + max_new_tokens, batch_size=batch_size)
        for row, response, score in zip(rows, responses, scores):
            row["responses"][name] = {"text": response.text, "stopped": response.stopped,
                                      "n_tokens": response.n_tokens, "ids": response.ids, "score": score}
        log.info(f"{name}: {len(responses)} responses, {sum(r.stopped for r in responses)} ended with EOS")
    return rows


def run_compare(config: CompareConfig) -> list[dict]:
    setup_logging()
    models = parse_models(config.models)
    examples = load_examples(config.prompts, "prompt").examples
    if config.num_prompts:
        examples = examples[: config.num_prompts]
    rows = compare_models(models, examples, template=config.template, max_new_tokens=config.max_new_tokens,
                          temperature=config.temperature, top_p=config.top_p, seed=config.seed,
                          batch_size=config.batch_size, max_prompt_len=config.max_prompt_len,
                          reward_model=config.reward_model)
    print_table(rows, list(models))
    if config.output:
        Path(config.output).parent.mkdir(parents=True, exist_ok=True)
        Path(config.output).write_text(json.dumps({"models": models, "rows": rows}, indent=2, ensure_ascii=False),
                                       encoding="utf-8")
        log.info(f"wrote {len(rows)} rows to {config.output}")
    return rows


def print_table(rows: list[dict], names: list[str]) -> None:
    """prompt | one column per model, the score (when there is one) under each response."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(title="responses side by side", show_lines=True)
    for column in ["prompt", *names]:
        table.add_column(column, overflow="fold")
    for row in rows:
        cells = []
        for name in names:
            r = row["responses"][name]
            cell = Text(" ".join(r["text"].split()))  # Text, not markup: user text may hold [brackets]
            if not r["stopped"]:
                cell.append(" ...", style="dim")  # cut off at max_new_tokens
            if r["score"] is not None:
                cell.append(f"\nscore {r['score']:.3f}", style="bold")
            cells.append(cell)
        table.add_row(Text(row["prompt"].strip()), *cells)
    console = Console(width=max(Console().width, 120))
    console.print(table)
    if rows and rows[0]["responses"][names[0]]["score"] is not None:
        means = {name: sum(row["responses"][name]["score"] for row in rows) / len(rows) for name in names}
        console.print("mean score: " + ", ".join(f"{name} {value:.4f}" for name, value in means.items()),
                      markup=False)
