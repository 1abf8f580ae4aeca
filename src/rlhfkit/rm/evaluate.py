"""`rlhfkit eval-rm`: a reward model's accuracy on preference pairs, with a table of examples and their scores."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhfkit.config import option, require
from rlhfkit.data.encode import EncodeStats, encode_pairs
from rlhfkit.data.loading import load_examples
from rlhfkit.data.templates import resolve_template
from rlhfkit.models import (DTYPES, check_positions, default_device, load_sequence_classifier, load_tokenizer,
                            resolve_dtype)
from rlhfkit.rm.scoring import pair_metrics, score_pairs
from rlhfkit.training.common import check_data_specs, check_model_path, check_output_file, log, setup_logging


@dataclass
class EvalRMConfig:
    model: str = option("", "reward model folder (or hub id) to evaluate", group="model")
    data: list[str] = option([], "preference data files or folders", group="data")
    template: str = option("auto", "chat template (as in training)", group="model",
                           choices=("auto", "tokenizer", "human-assistant", "alpaca", "chatml"))
    max_len: int = option(512, "longest sequence in tokens", group="model")
    batch_size: int = option(16, "pairs per forward pass", group="eval")
    dtype: str = option("auto", "compute dtype (auto: bfloat16 where the hardware has it natively)", group="model",
                        choices=DTYPES)
    loss: str = option("log_sig", "loss reported beside accuracy", group="eval", choices=("log_sig", "log_exp"))
    show: int = option(10, "example pairs shown in the table", group="eval")
    skip_invalid: bool = option(False, "skip bad rows instead of stopping", group="data")
    output: str = option("", "also write every pair's scores and the metrics to this JSON file", group="eval")

    def check(self) -> None:
        require(bool(self.model), "model: required")
        require(bool(self.data), "data: required")
        check_model_path(self.model, "model")
        check_data_specs(self.data, "data")
        check_output_file(self.output, "output")
        require(self.batch_size >= 1, f"batch_size: must be >= 1, got {self.batch_size}")
        require(self.max_len >= 8, f"max_len: must be >= 8, got {self.max_len}")
        check_positions([(self.model, "model", self.max_len, "max_len")])


def run_eval_rm(config: EvalRMConfig) -> dict[str, float]:
    setup_logging()
    pairs = load_examples(config.data, "preference", skip_invalid=config.skip_invalid).examples
    tokenizer = load_tokenizer(config.model)
    template = resolve_template(config.template, tokenizer)
    stats = EncodeStats()
    encoded = encode_pairs(pairs, tokenizer, template, config.max_len, stats)
    log.info(f"{len(pairs)} pairs; tokenized {stats.describe()}")
    device = default_device()
    model = load_sequence_classifier(config.model, tokenizer).to(device)
    dtype = resolve_dtype(config.dtype, device, config.model)
    chosen, rejected = score_pairs(model, encoded, tokenizer.pad_token_id, config.batch_size, dtype)
    metrics = pair_metrics(chosen, rejected, torch.tensor([p[2] for p in encoded]), config.loss)
    metrics["pairs"] = len(encoded)
    _print_table(tokenizer, encoded, chosen, rejected, metrics, config.show)
    if config.output:
        def decode(ids: list[int]) -> str:
            return tokenizer.decode(ids, skip_special_tokens=True)

        rows = [{"prompt": decode(c_enc.input_ids[:c_enc.response_start]),
                 "chosen": decode(c_enc.input_ids[c_enc.response_start:]), "chosen_score": c,
                 "rejected": decode(r_enc.input_ids[r_enc.response_start:]), "rejected_score": r}
                for (c_enc, r_enc, _), c, r in zip(encoded, chosen.tolist(), rejected.tolist())]
        Path(config.output).parent.mkdir(parents=True, exist_ok=True)
        Path(config.output).write_text(json.dumps({"metrics": metrics, "pairs": rows}, indent=2))
    return metrics


def _print_table(tokenizer, encoded, chosen, rejected, metrics, show: int) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    def text(ids: list[int], limit: int = 80) -> Text:  # Text, not markup: "[/b]" in the data would crash the table
        s = " ".join(tokenizer.decode(ids, skip_special_tokens=True).split())
        return Text(s if len(s) <= limit else "..." + s[-limit:])

    table = Table(title="reward model on preference pairs")
    for column in ("prompt", "chosen", "score", "rejected", "score", "ok"):
        table.add_column(column, overflow="fold")
    for (c_enc, r_enc, _), c, r in list(zip(encoded, chosen.tolist(), rejected.tolist()))[:show]:
        table.add_row(text(c_enc.input_ids[: c_enc.response_start]), text(c_enc.input_ids[c_enc.response_start:], 60),
                      f"{c:.3f}", text(r_enc.input_ids[r_enc.response_start:], 60), f"{r:.3f}", "yes" if c > r else "no")
    console = Console()
    console.print(table)
    console.print(f"accuracy {metrics['accuracy']:.4f} on {metrics['pairs']} pairs; mean chosen "
                  f"{metrics['chosen_score']:.4f}, mean rejected {metrics['rejected_score']:.4f}, "
                  f"mean margin {metrics['margin']:.4f}, loss {metrics['loss']:.4f}")
