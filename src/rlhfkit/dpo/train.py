"""Offline preference optimisation, `rlhfkit dpo`: DPO, cDPO, robust DPO, IPO and SimPO (with RPO's NLL term) train
the policy on preference pairs directly, without a reward model or sampling.

Each pair is one row, its prompt computed once for both responses (`collate_pair_rows`); the log-probs of the
response tokens (EOS included) are summed; the frozen reference (the starting model, `--ref`, or under LoRA the policy
with its adapter disabled) gives the same sums once more, or once for the whole run with `--precompute-ref`. The
losses are pure functions in dpo/losses.py; the driver shared with SFT and the reward model (training/supervised.py)
does the rest.
"""

from __future__ import annotations

import contextlib
import gc
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhfkit.config import option, require
from rlhfkit.data.batching import chunks, collate_pair_rows, collate_pairs, to_device
from rlhfkit.data.encode import EncodeStats, encode_pairs
from rlhfkit.dpo.losses import LOSSES, REFERENCE_FREE, PreferenceLoss, preference_loss
from rlhfkit.logprobs import segment_logprobs, sequence_logprobs
from rlhfkit.models import autocast, check_positions, disable_dropout, is_peft, load_causal_lm, takes_pair_rows
from rlhfkit.training.common import check_model_path, log, with_lora
from rlhfkit.training.distributed import adapter_disabled, gather_share, place_frozen, strided_share, unwrap
from rlhfkit.training.supervised import Objective, Prepared, Stage, SupervisedConfig, run_supervised


@dataclass
class DPOConfig(SupervisedConfig):
    lr: float = option(1e-6, "peak learning rate (AdamW); 1e-6 as Rafailov et al. 2023 and TRL", group="training")
    loss: str = option("sigmoid", "sigmoid = DPO (cDPO with --label-smoothing), robust = robust DPO, ipo = IPO, "
                                  "simpo = SimPO (reference-free)", group="dpo", choices=LOSSES)
    beta: float = option(0.1, "beta: how far from the reference the implicit reward lets the policy go (0.1: "
                              "Rafailov et al. 2023; IPO's tau; SimPO's reward scale, 2.0-2.5 in Meng et al. 2024)",
                         group="dpo")
    label_smoothing: float = option(0.0, "probability that a pair's label is wrong, in [0, 0.5): cDPO (Mitchell "
                                         "2023) with sigmoid and simpo, the unbiased loss of Chowdhury et al. 2024 "
                                         "with robust", group="dpo")
    simpo_gamma: float = option(0.5, "SimPO's target reward margin gamma (0.5 as TRL; Meng et al. 2024 tune it "
                                     "with beta)", group="dpo")
    rpo_alpha: float = option(0.0, "weight of the chosen response's per-token NLL added to the loss (RPO, Pang et "
                                   "al. 2024, use 1.0); 0 = none", group="dpo")
    ref: str = option("", "reference model (default: --model; under LoRA the model with its adapter disabled, no "
                          "second copy)", group="dpo")
    precompute_ref: bool = option(False, "compute every reference log-prob once before training, then free the "
                                         "reference (kept in checkpoints: a resume does not recompute them)",
                                  group="dpo")

    def check(self) -> None:
        super().check()
        require(self.beta > 0 and math.isfinite(self.beta), f"beta: must be > 0, got {self.beta}")
        require(0 <= self.label_smoothing < 0.5, f"label_smoothing: must be in [0, 0.5), got {self.label_smoothing}")
        require(self.loss != "ipo" or self.label_smoothing == 0, "label_smoothing: IPO has no label smoothing")
        require(self.rpo_alpha >= 0 and math.isfinite(self.rpo_alpha),
                f"rpo_alpha: must be >= 0, got {self.rpo_alpha}")
        require(math.isfinite(self.simpo_gamma), f"simpo_gamma: must be finite, got {self.simpo_gamma}")
        require(self.lora_dropout == 0, "lora_dropout: DPO turns dropout off (the policy and the reference must be "
                                        "the same function when training starts)")
        if self.loss in REFERENCE_FREE:
            require(not self.ref, f"ref: --loss {self.loss} is reference-free")
            require(not self.precompute_ref, f"precompute_ref: --loss {self.loss} is reference-free")
        if self.ref:
            check_model_path(self.ref, "ref")
            check_positions([(self.ref, "ref", self.max_len, "max_len")])


def encode(rows: list, tokenizer, template: str, config: DPOConfig, stats: EncodeStats) -> list:
    return encode_pairs(rows, tokenizer, template, config.max_len, stats)


def load_model(config: DPOConfig, tokenizer):
    model = load_causal_lm(config.model, tokenizer, attn_implementation=config.attn_implementation,
                           gradient_checkpointing=config.gradient_checkpointing, seed=config.seed)
    model = with_lora(model, config, "CAUSAL_LM")
    disable_dropout(model)  # so that the policy starts as the same function as the reference
    return model


def pair_batch(pairs: list, pad_id: int, rows: bool) -> dict:
    """A batch of encoded pairs: one row per pair, its prompt computed once (`collate_pair_rows`), when `rows` (the
    model takes such rows: `takes_pair_rows`), else the chosen and rejected sequences apart."""
    return collate_pair_rows(pairs, pad_id) if rows else collate_pairs(pairs, pad_id)


def pair_logprobs(model, batch: dict) -> torch.Tensor:
    """(B, 4): chosen and rejected log-probs, chosen and rejected token counts, for a `pair_batch`."""
    if "segment" in batch:  # pair i's chosen and rejected tokens are segments 2i and 2i + 1 of row i
        sums, counts = segment_logprobs(model, batch, 2 * batch["num_items"])
        return torch.cat([sums.view(-1, 2), counts.view(-1, 2)], 1)
    logps, tokens = sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    return torch.stack([*logps.chunk(2), *tokens.chunk(2)], 1)


@torch.no_grad()
def logprobs_of(model, pairs: list, pad_id: int, micro: int, dtype: str, world) -> torch.Tensor:
    """`pair_logprobs` of every pair, (N, 4) in order; each rank computes a share."""
    share, _ = strided_share(pairs, world)
    rows, found = takes_pair_rows(model), []
    for part in chunks(share, micro):
        batch = to_device(pair_batch(part, pad_id, rows), world.device)
        with autocast(dtype, world.device):
            found.append(pair_logprobs(model, batch).cpu())
    return gather_share(torch.cat(found), len(pairs), world)


def pair_sums(loss: torch.Tensor, chosen_reward: torch.Tensor, rejected_reward: torch.Tensor,
              logps: torch.Tensor) -> dict[str, float]:
    """The TRL-named metrics, summed over the pairs (the loop divides by the pair count); logps (B, 4)."""
    return {"rewards/chosen": chosen_reward.sum().item(), "rewards/rejected": rejected_reward.sum().item(),
            "rewards/accuracies": (chosen_reward > rejected_reward).float().sum().item(),
            "rewards/margins": (chosen_reward - rejected_reward).sum().item(),
            "logps/chosen": logps[:, 0].sum().item(), "logps/rejected": logps[:, 1].sum().item()}


def objective(run: Prepared) -> Objective:
    config, world, pad = run.config, run.world, run.tokenizer.pad_token_id
    settings = PreferenceLoss(config.loss, config.beta, config.label_smoothing, config.simpo_gamma, config.rpo_alpha)

    # The reference: none (SimPO), the policy with its adapter disabled (LoRA), or a frozen copy.
    separate = settings.uses_reference and (config.ref or not is_peft(unwrap(run.model)))
    restored = config.precompute_ref and run.resume is not None  # the checkpoint holds the log-probs
    ref_model = None
    if separate and not restored:
        ref_model = load_causal_lm(config.ref or config.model, run.tokenizer,
                                   attn_implementation=config.attn_implementation, seed=config.seed)
        disable_dropout(ref_model)
        ref_model = place_frozen(ref_model.requires_grad_(False).eval(), world, shard=False, dtype=config.dtype)

    @contextlib.contextmanager
    def reference():  # the module whose forward pass is the reference's
        if ref_model is not None:
            yield ref_model
        else:
            with adapter_disabled(run.model):
                yield unwrap(run.model)  # DDP's wrapper prepares a gradient reduction in every forward call

    def reference_of(pairs: list) -> torch.Tensor:
        with reference() as model:
            return logprobs_of(model, pairs, pad, config.micro, config.dtype, world)[:, :2]

    tables: dict[str, torch.Tensor] = {}
    if config.precompute_ref:
        for name, pairs in (("train", run.train_set), ("eval", run.eval_set)):
            if pairs:
                tables[name] = torch.zeros(len(pairs), 2) if restored else reference_of(pairs)
        ref_model = None
        gc.collect()
        log.info("reference log-probs: " + ("read from the checkpoint on resume" if restored else
                                            f"computed for {len(run.train_set) + len(run.eval_set)} pairs; the "
                                            "reference is freed"))
    else:
        log.info("reference: " + ("none (reference-free loss)" if not settings.uses_reference else
                                  "a frozen copy of " + (config.ref or config.model) if separate else
                                  "the policy with its LoRA adapter disabled (no second copy)"))

    def losses(logps: torch.Tensor, ref: torch.Tensor | None):  # (B, 4) as pair_logprobs, (B, 2) or None
        ref_chosen, ref_rejected = ref.unbind(1) if ref is not None else (None, None)
        return preference_loss(settings, logps[:, 0], logps[:, 1], ref_chosen, ref_rejected, logps[:, 2], logps[:, 3])

    rows = takes_pair_rows(run.model) and (ref_model is None or takes_pair_rows(ref_model))

    def collate(indices: list[int]) -> dict:
        batch = pair_batch([run.train_set[i] for i in indices], pad, rows)
        batch["index"] = torch.tensor(indices)
        return batch

    def loss_fn(model, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        ref = None
        if "train" in tables:
            ref = tables["train"][batch["index"].cpu()].to(world.device)
        elif settings.uses_reference:
            with torch.no_grad(), reference() as module:
                ref = pair_logprobs(module, batch)[:, :2]
        logps = pair_logprobs(model, batch)
        loss, chosen_reward, rejected_reward = losses(logps, ref)
        return loss.sum(), pair_sums(loss, chosen_reward, rejected_reward, logps.detach())

    def evaluate() -> dict[str, float]:
        run.model.eval()
        logps = logprobs_of(run.model, run.eval_set, pad, config.micro, config.dtype, world)
        ref = (tables["eval"] if "eval" in tables else reference_of(run.eval_set)) if settings.uses_reference else None
        loss, chosen_reward, rejected_reward = losses(logps, ref)
        n = len(run.eval_set)
        sums = {"loss": loss.sum().item(), **pair_sums(loss, chosen_reward, rejected_reward, logps)}
        return {k: v / n for k, v in sums.items()}

    return Objective(loss_fn=loss_fn, collate=collate, evaluate=evaluate,
                     extra={"reference_logps": tables} if tables else {})


def run_dpo(config: DPOConfig) -> Path:
    """Train and write OUTPUT/final (the policy, Hugging Face format); returns that folder."""
    return run_supervised(config, Stage("dpo", "preference", "pair", encode, load_model, objective))
