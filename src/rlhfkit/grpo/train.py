"""Critic-free RL, `rlhfkit grpo`: GRPO, Dr.GRPO, RLOO, REINFORCE++ and REINFORCE++-baseline. The actor samples G
responses to each prompt; the reward sources score them; each response's advantage comes from its group (or from the
whole batch), not from a critic; a clipped policy update with an optional per-token KL term against the reference,
and PTX.

`run_grpo` sets up the models; `grpo_iteration` is one iteration, its steps in order; `grpo_update` is its last step.
The estimators are in grpo/core.py; what every on-policy algorithm shares is in rl/ (see ppo/train.py's docstring).

On several ranks each rank samples and scores whole groups (its share of the iteration's prompts, G responses each);
then every rank holds the whole batch, so group statistics, whitening and the logged statistics are those of the
global batch, as one process computes them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhfkit.config import ConfigError
from rlhfkit.grpo import core
from rlhfkit.grpo.config import GRPOConfig
from rlhfkit.models import autocast, load_tokenizer
from rlhfkit.rl.core import aggregate, kl_estimate, masked_mean, masked_sum, policy_loss
from rlhfkit.rl.rollout import Rollout, micro_batches
from rlhfkit.rl.scoring import FunctionScorer, shape_scores
from rlhfkit.rl.setup import (Data, Models, PhaseTimer, RolloutSettings, Trained, UpdateSettings, add, check_scores,
                              load_actor, load_data, load_reference, load_reward, load_reward_functions,
                              minibatch_order, passes_of, place, ptx_backward, reference_logprobs, resume_run,
                              rollout_settings, sample_and_score, sample_rows, save_final_actor, save_run, score_parts,
                              snapshot_actor, train, update_settings, whole_batch)
from rlhfkit.training.common import log, make_optimizer, make_scheduler, setup_logging, start_run
from rlhfkit.training.distributed import World, gradient_sync, rank_share
from rlhfkit.training.guards import check_finite
from rlhfkit.training.loop import optimizer_step


@dataclass(frozen=True)
class GRPOSettings:
    """What an iteration reads besides the models and data: the config, cut down at the entry point."""
    rollout: RolloutSettings  # its sampling draws num_generations responses per prompt
    update: UpdateSettings
    estimator: str
    kl_coef: float  # 0: no KL term, no reference
    kl_estimator: str
    kl_in_reward: bool  # reinforce++: in the per-token reward; otherwise a loss term
    std_eps: float
    dynamic_sampling: bool
    missing_eos_penalty: float
    missing_eos_score: float | None

    @property
    def group_size(self) -> int:
        return self.rollout.sampling.samples_per_prompt

    @classmethod
    def of(cls, config: GRPOConfig, actor: torch.nn.Module) -> GRPOSettings:
        passes = passes_of(config, actor)
        return cls(rollout_settings(config, passes, config.num_generations),
                   update_settings(config, passes, config.cliprange_high),
                   config.estimator, config.kl_coef, config.kl_estimator, config.kl_in_reward, config.std_eps,
                   config.dynamic_sampling, config.missing_eos_penalty, config.missing_eos_score)


@dataclass
class Experience:
    """One iteration's groups and what the update needs of them; tensors (B, R), B = prompts x G."""
    rollout: Rollout
    old_logprobs: torch.Tensor  # actor, at sampling time
    ref_logprobs: torch.Tensor | None  # None without a KL term
    advantages: torch.Tensor
    update_mask: torch.Tensor  # response_mask, without the rows dynamic sampling dropped


# ------------------------------------------------------------------------------------------------- the iteration
def grpo_iteration(iteration: int, settings: GRPOSettings, models: Models, data: Data, trained: Trained, tokenizer,
                   world: World = World()) -> tuple[dict[str, float], list[dict]]:
    """One iteration; returns (metrics, sample rows)."""
    device, timer, G = world.device, PhaseTimer(), settings.group_size
    # 1. Rollout: the iteration's prompts, this rank's share of them; the actor samples G responses to each, the
    #    prompt's prefill shared by its G samples.
    # 2. Scoring: the reward model and/or functions, weighted.
    scored = sample_and_score(iteration, settings.rollout, models, data, tokenizer, world, timer)
    # 3. Log-probs of the sampled tokens under the reference, when a KL term reads them (the actor's were kept while
    #    sampling); every rank then holds the whole batch.
    ref_logprobs = None
    if settings.kl_coef > 0:
        with timer("experience"), torch.no_grad(), autocast(settings.rollout.passes.dtype, device):
            models.actor.eval()
            ref_logprobs = reference_logprobs(models, scored.rollout, settings.update.temperature, device,
                                              scored.micro, G)
    place(models.frozen, torch.device("cpu"), settings.rollout.passes)
    scored, per_token = whole_batch(world, scored, [] if ref_logprobs is None else [ref_logprobs], data.pad_id)
    ref_logprobs = per_token[0] if per_token else None
    rollout, scores = scored.rollout, scored.scores
    old_logprobs, mask = rollout.logprobs, rollout.response_mask
    check_scores(iteration, scored, models)
    # 4. The reward: the weighted score, less the missing-EOS penalty (no normalisation: the group does that).
    shaped = shape_scores(scores, rollout.stopped, mean=0.0, std=1.0, missing_eos_penalty=settings.missing_eos_penalty,
                          missing_eos_score=settings.missing_eos_score, clip=0.0)
    # 5. Advantages from each response's group (or the whole batch), per token; groups whose rewards are all equal
    #    carry no signal, and dynamic sampling drops them from the update.
    kl = kl_estimate(old_logprobs, ref_logprobs, settings.kl_estimator) if ref_logprobs is not None else None
    advantages = core.advantages(settings.estimator, shaped, G, mask, kl, settings.kl_coef, settings.std_eps)
    flat = core.zero_variance_groups(shaped, G)
    update_mask = mask & ~flat.repeat_interleave(G).unsqueeze(-1) if settings.dynamic_sampling else mask
    experience = Experience(rollout, old_logprobs, ref_logprobs, advantages, update_mask)
    # 6. Update: ppo_epochs over shuffled minibatches; clipped policy loss, + kl_coef x KL (unless it is in the
    #    reward), + PTX.
    with timer("train"):
        train_metrics = grpo_update(iteration, experience, settings, models, data, trained, world)

    n_tokens = int(mask.sum())
    metrics = {
        "score": scores.mean().item(), "score_std": scores.std().item(),
        **score_parts(scored),
        "reward": shaped.mean().item(), "group_reward_std": core.group_std(shaped, G).mean().item(),
        "zero_variance_groups": flat.float().mean().item(),
        **({"kl": masked_sum(old_logprobs - ref_logprobs, mask, dim=-1).mean().item()}
           if ref_logprobs is not None else {}),
        "advantage_mean": masked_mean(advantages, mask).item(),
        "response_length": mask.sum(-1).float().mean().item(), "eos_rate": rollout.stopped.float().mean().item(),
        **train_metrics,
        "tokens_per_s": n_tokens / timer.total(), **timer.seconds(),
    }
    return metrics, sample_rows(scored, shaped, rollout.stopped, data, tokenizer, iteration,
                                settings.rollout.num_samples)


# --------------------------------------------------------------------------------------------------------- step 6
def grpo_update(iteration: int, exp: Experience, settings: GRPOSettings, models: Models, data: Data,
                trained: Trained, world: World = World()) -> dict[str, float]:
    """`ppo_epochs` passes over the batch in shuffled minibatches, one optimizer step each. Each rank takes its share
    of every minibatch and accumulates micro-batches; every loss is a sum over this rank's part divided by the whole
    minibatch's count (valid tokens for token-mean, sequences otherwise)."""
    actor, device, up = models.actor, world.device, settings.update
    kl_loss = settings.kl_coef > 0 and not settings.kl_in_reward
    actor.train()
    micro = up.passes.rows(exp.rollout.input_ids.shape[1], device)  # the whole batch's width: same everywhere
    G = settings.group_size
    minibatches = minibatch_order(exp.rollout.input_ids.shape[0], up, iteration, G)  # whole groups
    sums: dict[str, float] = {}  # this rank's parts of the minibatch means, summed over ranks at the end
    steps: dict[str, float] = {}  # gradient norm and learning rate, the same on every rank
    for update, mini in enumerate(minibatches):
        mask = exp.update_mask[mini]
        tokens = max(float(mask.sum()), 1.0)
        denominator = tokens if up.loss_agg == "token-mean" else max(float(mask.any(-1).sum()), 1.0)
        # This rank's share, in passes; when the share is whole groups, each prompt is computed once for its group.
        share = rank_share(mini, world)
        parts = micro_batches(exp.rollout, share, micro, G if len(share) % G == 0 else 1)
        for i, mb in enumerate(parts):
            last = i == len(parts) - 1  # gradients are reduced over ranks once, after the last backward
            mb_mask = mb.take(exp.update_mask).to(device)
            with gradient_sync(actor, last and not data.ptx), autocast(up.passes.dtype, device):
                logprobs, entropy = mb.logprobs(actor, device, up.temperature, with_entropy=True,
                                                entropy_grad=up.entropy_coef > 0)
                pg, pg_stats = policy_loss(logprobs, mb.take(exp.old_logprobs).to(device),
                                           mb.take(exp.advantages).to(device), mb_mask, up.cliprange, up.dual_clip,
                                           up.cliprange_high)
                loss = pg
                if kl_loss:  # masked positions read the reference's own log-prob: KL 0 there, and no inf
                    ref = mb.take(exp.ref_logprobs).to(device)
                    kl = kl_estimate(torch.where(mb_mask, logprobs, ref), ref, settings.kl_estimator)
                    loss = pg + settings.kl_coef * kl
                total = aggregate(loss, mb_mask, up.loss_agg, denominator, up.max_new_tokens)
                entropy_mean = aggregate(entropy, mb_mask, up.loss_agg, denominator, up.max_new_tokens)
                # DDP and FSDP average the ranks' gradients: times world.size makes that their sum.
                ((total - up.entropy_coef * entropy_mean) * world.size).backward()
            weight = float(mb_mask.sum()) / tokens  # this micro-batch's share of the minibatch's tokens
            add(sums, {"policy_loss": aggregate(pg.detach(), mb_mask, up.loss_agg, denominator,
                                                up.max_new_tokens).item(), "entropy": entropy_mean.item(),
                       **({"kl_loss": aggregate(kl.detach(), mb_mask, up.loss_agg, denominator,
                                                up.max_new_tokens).item()} if kl_loss else {})})
            add(sums, {k: v.item() * weight for k, v in pg_stats.items()})
        if data.ptx:
            add(sums, {"ptx_loss": ptx_backward(actor, data, iteration * len(minibatches) + update, up, world)})
        stepped = optimizer_step(trained.parts, up.max_grad_norm)
        add(steps, {"grad_norm": stepped.grad_norms["actor"], "lr": stepped.lrs["actor"],
                    "skipped": float(not stepped.finite)})
        if stepped.finite:
            check_finite({"actor": actor}, f"after an optimizer step of iteration {iteration + 1}", world)
    keys = sorted(sums)
    sums = dict(zip(keys, world.sum([sums[k] for k in keys])))
    return {k: v / len(minibatches) for k, v in (sums | steps).items()}


# -------------------------------------------------------------------------------------------------------- set-up
def run_grpo(config: GRPOConfig) -> Path:
    """Train and write OUTPUT/final (the actor, Hugging Face format)."""
    setup_logging()
    functions, monitor_fn = load_reward_functions(config)  # a broken function fails first
    out, resume, world = start_run(config, "grpo", config.actor)
    for field, size in (("batch_size", config.batch_size), ("mini_batch_size", config.mini_batch),
                        ("ptx_batch_size", (config.ptx_batch_size or config.mini_batch) if config.use_ptx else 0)):
        if size % world.size:
            raise ConfigError(f"{field}: {size} does not split evenly over {world.size} ranks")

    # Data before models, so that bad rows stop the run before anything loads.
    tokenizer = load_tokenizer(config.actor)
    data = load_data(config, tokenizer, out, functions, monitor_fn)
    actor, actor_is_peft = load_actor(config, tokenizer, world)
    ref = load_reference(config, tokenizer, world, actor_is_peft) if config.kl_coef > 0 else None
    reward = load_reward(config, tokenizer, functions, world)
    monitor = FunctionScorer(monitor_fn, tokenizer, f"--monitor-fn {config.monitor_fn}") if monitor_fn else None
    models = Models(actor, ref, reward, monitor=monitor)
    if world.rank > 0:  # same initialisation everywhere, but each rank samples its responses from a stream of its own
        torch.manual_seed(config.seed + 1_000_003 * world.rank)

    iterations = config.max_steps or max(1, math.ceil(config.epochs * len(data.prompts) / config.batch_size))
    optimizer = make_optimizer(actor, config.lr, config.weight_decay)
    steps = iterations * config.ppo_epochs * (config.rows // config.mini_batch)
    trained = Trained({"actor": (actor, optimizer, make_scheduler(optimizer, config.lr_schedule, config.warmup_steps,
                                                                  steps))})
    start = int(resume_run(resume, trained, config, world, {"actor": "lr"})["step"]) if resume is not None else 0
    settings = GRPOSettings.of(config, actor)
    train(config, "grpo", iterations, start,
          lambda i: grpo_iteration(i, settings, models, data, trained, tokenizer, world),
          lambda step: save_run(out, step, trained, {}, config, "grpo", world), out, world,
          snapshot_actor(config, actor, tokenizer, out, world))
    final = save_final_actor(config, actor, tokenizer, out, world)
    log.info(f"final actor: {final}")
    return final
