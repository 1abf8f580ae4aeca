"""Stage 3, PPO: the actor generates, the reward model (or functions) scores, the reference keeps it close, the critic
estimates values; clipped policy and value updates, with the pretraining loss (PTX) mixed into the actor's.

`run_ppo` sets up the models; `ppo_iteration` is one iteration, its six steps in order; `ppo_update` is step 6.
PPO's own math is in ppo/core.py. The RL layer the algorithms share: the shared math in rl/core.py, prompts, models,
sampling and scoring, PTX and checkpoints in rl/setup.py (rollouts in rl/rollout.py, sampled by rl/sampler.py; the
reward in rl/scoring.py), the outer loop (iterations, skipped ones, logging, samples, checkpoints) in rl/loop.py.

On several ranks (DDP or FSDP), each rank generates, scores and runs the experience passes for its share of the
iteration's prompts; then every rank holds the whole batch of experience, so rewards, GAE, advantage whitening and the
reward and KL statistics are those of the global batch, computed as one process would. Each minibatch is split over
the ranks, and its loss divided by the token count of the whole minibatch.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhfkit.config import ConfigError
from rlhfkit.models import (TokenValues, autocast, disable_dropout, is_peft, load_sequence_classifier,
                            load_tokenizer, load_trainable_state, read_reward_stats, trainable_state)
from rlhfkit.ppo import core
from rlhfkit.ppo.config import PPOConfig
from rlhfkit.rl.core import (aggregate, kl_estimate, masked_mean, masked_sum, masked_var, masked_whiten,
                             per_token_rewards, policy_loss)
from rlhfkit.rl.rollout import Rollout, micro_batches, response_logprobs
from rlhfkit.rl.scoring import FunctionScorer, RunningMoments, same_vocabulary, shape_scores
from rlhfkit.rl.setup import (Data, Models, PhaseTimer, RolloutSettings, Trained, UpdateSettings, add,
                              check_scores, fresh_actor, load_actor, load_data, load_reference, load_reward,
                              load_reward_functions, minibatch_order, model_kwargs, passes_of, place, ptx_backward,
                              reference_logprobs, resume_run, rollout_settings, sample_and_score, sample_rows,
                              save_final_actor, save_run, score_parts, snapshot_actor, train, update_settings,
                              whole_batch)
from rlhfkit.training.common import (log, make_optimizer, make_scheduler, save_final, setup_logging, start_run,
                                     with_lora, write_model)
from rlhfkit.training.distributed import World, full_tensor, gradient_sync, rank_share, unwrap, wrap_model
from rlhfkit.training.guards import check_finite
from rlhfkit.training.loop import optimizer_step


@dataclass(frozen=True)
class PPOSettings:
    """What an iteration reads besides the models and data: the config, cut down at the entry point."""
    rollout: RolloutSettings
    update: UpdateSettings
    reward_norm: str  # none, running, or the stored statistics (rm-stats, auto)
    reward_clip: float
    missing_eos_penalty: float
    missing_eos_score: float | None
    kl_estimator: str
    gamma: float
    lam: float
    whiten_advantages: bool
    cliprange_value: float
    vf_coef: float
    critic_warmup_steps: int

    @classmethod
    def of(cls, config: PPOConfig, actor: torch.nn.Module) -> PPOSettings:
        passes = passes_of(config, actor)
        return cls(rollout_settings(config, passes), update_settings(config, passes), config.reward_norm,
                   config.reward_clip, config.missing_eos_penalty, config.missing_eos_score, config.kl_estimator,
                   config.gamma, config.lam, config.whiten_advantages, config.cliprange_value, config.vf_coef,
                   config.critic_warmup_steps)


@dataclass
class Experience:
    """One iteration's rollout and everything computed from it; tensors (B, R) unless noted."""
    rollout: Rollout
    old_logprobs: torch.Tensor  # actor, at sampling time
    ref_logprobs: torch.Tensor
    old_values: torch.Tensor  # critic, at sampling time
    scores: torch.Tensor  # (B,) raw score from the reward sources
    rewards: torch.Tensor  # per-token: -beta * KL + shaped score at the last token
    advantages: torch.Tensor
    returns: torch.Tensor

    @property
    def response_mask(self) -> torch.Tensor:
        return self.rollout.response_mask


@dataclass
class TrainState:
    """What the run changes besides the weights; all of it goes into checkpoints."""
    trained: Trained  # "actor", "critic": each with its optimizer and schedule
    kl_ctl: core.AdaptiveKLController
    moments: RunningMoments
    ema: ActorEMA | None


# ------------------------------------------------------------------------------------------------- the iteration
def ppo_iteration(iteration: int, settings: PPOSettings, models: Models, data: Data, state: TrainState, tokenizer,
                  world: World = World()) -> tuple[dict[str, float], list[dict]]:
    """One PPO iteration; returns (metrics, sample rows)."""
    device, timer = world.device, PhaseTimer()
    # 1. Rollout: the iteration's prompts, this rank's share of them, left-padded; the actor samples.
    # 2. Scoring: the reward model and/or functions.
    scored = sample_and_score(iteration, settings.rollout, models, data, tokenizer, world, timer)
    # 3. Log-probs of the sampled tokens under the reference (the actor's were kept while sampling), at the sampling
    #    temperature, and the critic's values.
    with timer("experience"), torch.no_grad(), autocast(settings.rollout.passes.dtype, device):
        models.actor.eval()
        ref_logprobs = reference_logprobs(models, scored.rollout, settings.update.temperature, device, scored.micro)
        old_values = critic_values(models.critic, scored.rollout, device, scored.micro)
        place(models.frozen, torch.device("cpu"), settings.rollout.passes)
    scored, (ref_logprobs, old_values) = whole_batch(world, scored, [ref_logprobs, old_values], data.pad_id)
    rollout, scores = scored.rollout, scored.scores
    old_logprobs, mask = rollout.logprobs, rollout.response_mask
    check_scores(iteration, scored, models)
    # 4. Per-token rewards: the score, normalised, with the missing-EOS rule and clipping, at the last token, and
    #    -beta * KL estimate at every token.
    if settings.reward_norm == "running":
        state.moments.update(scores)
        mean, std = state.moments.mean, state.moments.std
    else:
        mean, std = models.reward_stats or (0.0, 1.0)  # set for rm-stats (and auto) when the reward model stored them
    shaped = shape_scores(scores, rollout.stopped, mean=mean, std=std, missing_eos_penalty=settings.missing_eos_penalty,
                          missing_eos_score=settings.missing_eos_score, clip=settings.reward_clip)
    kl = kl_estimate(old_logprobs, ref_logprobs, settings.kl_estimator)
    rewards = per_token_rewards(shaped, kl, state.kl_ctl.value, mask)
    # 5. GAE over valid tokens; returns = advantages + values; advantages whitened over valid tokens.
    advantages, returns = core.gae(old_values, rewards, mask, settings.gamma, settings.lam)
    advantage_mean, advantage_var = masked_mean(advantages, mask).item(), masked_var(advantages, mask).item()
    if settings.whiten_advantages:
        advantages = masked_whiten(advantages, mask)
    experience = Experience(rollout, old_logprobs, ref_logprobs, old_values, scores, rewards, advantages, returns)
    # 6. Update: ppo_epochs over shuffled minibatches; clipped policy loss (+ PTX) for the actor, clipped value loss
    #    for the critic.
    with timer("train"):
        train_metrics = ppo_update(iteration, experience, settings, models, data, state, world)

    # The KL controller sees this batch's mean per-sequence KL (k1, whatever estimator shapes the reward).
    sequence_kl = masked_sum(old_logprobs - ref_logprobs, mask, dim=-1)
    beta = state.kl_ctl.value
    state.kl_ctl.update(sequence_kl.mean().item(), settings.rollout.batch_size)
    n_tokens = int(mask.sum())
    metrics = {
        "score": scores.mean().item(), "score_std": scores.std().item() if len(scores) > 1 else 0.0,
        **score_parts(scored),
        "shaped_score": shaped.mean().item(), "reward": masked_sum(rewards, mask, dim=-1).mean().item(),
        "kl": sequence_kl.mean().item(), "beta": beta,
        "response_length": mask.sum(-1).float().mean().item(), "eos_rate": rollout.stopped.float().mean().item(),
        # the whitening statistics: mean and std of the advantages over the batch's valid tokens, before whitening
        "advantage_mean": advantage_mean, "advantage_std": math.sqrt(advantage_var),
        "explained_variance": core.explained_variance(old_values, returns, mask),
        **train_metrics,
        "tokens_per_s": n_tokens / timer.total(), **timer.seconds(),
    }
    return metrics, sample_rows(scored, shaped, rollout.stopped, data, tokenizer, iteration,
                                settings.rollout.num_samples)


@torch.no_grad()
def critic_values(critic, rollout: Rollout, device, micro: int) -> torch.Tensor:
    """(B, R) the critic's V(s_t), the value of the state before response token t, 0 where masked."""
    critic.eval()
    values = torch.zeros(rollout.response_mask.shape)
    for mb in micro_batches(rollout, list(range(rollout.input_ids.shape[0])), micro):
        ids, attn, p = mb.input_ids.to(device), mb.attention_mask.to(device), mb.prompt_len
        values[mb.rows, :mb.response_len] = critic(ids, attn)[:, p - 1:-1].float().cpu()
    return values.masked_fill(~rollout.response_mask, 0.0)


# --------------------------------------------------------------------------------------------------------- step 6
def ppo_update(iteration: int, exp: Experience, settings: PPOSettings, models: Models, data: Data, state: TrainState,
               world: World = World()) -> dict[str, float]:
    """`ppo_epochs` passes over the experience in shuffled minibatches: one optimizer step per minibatch for the
    actor (unless the critic is still warming up) and the critic. Each rank takes its share of every minibatch and
    accumulates micro-batches; every loss is a sum over this rank's part divided by the whole minibatch's count."""
    actor, critic, device, up = models.actor, models.critic, world.device, settings.update
    train_actor = iteration >= settings.critic_warmup_steps
    actor.train()
    critic.train()
    B = exp.rollout.input_ids.shape[0]
    micro = up.passes.rows(exp.rollout.input_ids.shape[1], device)  # the whole batch's width: same everywhere
    minibatches = minibatch_order(B, up, iteration)
    sums: dict[str, float] = {}  # this rank's parts of the minibatch means, summed over ranks at the end
    steps: dict[str, float] = {}  # gradient norms and learning rates, the same on every rank
    for update, mini in enumerate(minibatches):
        mask = exp.response_mask[mini]
        denominator = float(mask.sum()) if up.loss_agg == "token-mean" else float(len(mini))
        parts = micro_batches(exp.rollout, rank_share(mini, world), micro)  # this rank's share, in passes
        for i, mb in enumerate(parts):
            last = i == len(parts) - 1  # gradients are reduced over ranks once, after the last backward
            ids, attn, p = mb.input_ids.to(device), mb.attention_mask.to(device), mb.prompt_len
            mb_mask = mb.take(exp.response_mask).to(device)
            weight = float(mb_mask.sum()) / float(mask.sum())  # this micro-batch's share of the tokens
            if train_actor:
                with gradient_sync(actor, last and not data.ptx), autocast(up.passes.dtype, device):
                    logprobs, entropy = response_logprobs(actor, ids, attn, p, up.temperature, with_entropy=True,
                                                          entropy_grad=up.entropy_coef > 0)
                    pg, pg_stats = policy_loss(logprobs, mb.take(exp.old_logprobs).to(device),
                                               mb.take(exp.advantages).to(device), mb_mask, up.cliprange,
                                               up.dual_clip)
                    pg_loss = aggregate(pg, mb_mask, up.loss_agg, denominator, up.max_new_tokens)
                    entropy_mean = aggregate(entropy, mb_mask, up.loss_agg, denominator, up.max_new_tokens)
                    # DDP and FSDP average the ranks' gradients: times world.size makes that their sum.
                    ((pg_loss - up.entropy_coef * entropy_mean) * world.size).backward()
                add(sums, {"policy_loss": pg_loss.item(), "entropy": entropy_mean.item()})
                add(sums, {k: v.item() * weight for k, v in pg_stats.items()})
            with gradient_sync(critic, last), autocast(up.passes.dtype, device):
                values = critic(ids, attn)[:, p - 1:-1]
                vf, vf_stats = core.value_loss(values, mb.take(exp.old_values).to(device),
                                               mb.take(exp.returns).to(device), mb_mask, settings.cliprange_value)
                vf_loss = aggregate(vf, mb_mask, up.loss_agg, denominator, up.max_new_tokens)
                (settings.vf_coef * vf_loss * world.size).backward()
            add(sums, {"value_loss": vf_loss.item(), **{k: v.item() * weight for k, v in vf_stats.items()}})
        if train_actor and data.ptx:
            actor_step = (iteration - settings.critic_warmup_steps) * len(minibatches) + update  # picks PTX rows
            add(sums, {"ptx_loss": ptx_backward(actor, data, actor_step, up, world)})
        stepped = _optimizer_steps(models, up, state, train_actor, steps)
        if stepped:
            check_finite({"critic": critic, **({"actor": actor} if train_actor else {})},
                         f"after an optimizer step of iteration {iteration + 1}", world)
        if stepped and train_actor and state.ema is not None:
            state.ema.update(unwrap(actor))
    keys = sorted(sums)
    sums = dict(zip(keys, world.sum([sums[k] for k in keys])))
    return {k: v / len(minibatches) for k, v in (sums | steps).items()}


def _optimizer_steps(models: Models, up: UpdateSettings, state: TrainState, train_actor: bool,
                     stats: dict[str, float]) -> bool:
    """The step engine on the critic and (unless warming up) the actor: both step, or neither on a non-finite
    gradient."""
    names = ["critic"] + (["actor"] if train_actor else [])
    stepped = optimizer_step({name: state.trained.parts[name] for name in names}, up.max_grad_norm)
    for name in names:
        add(stats, {f"{name}_grad_norm": stepped.grad_norms[name], f"{name}_lr": stepped.lrs[name]})
    add(stats, {"skipped": float(not stepped.finite)})
    return stepped.finite


class ActorEMA:
    """An exponential moving average of the actor's trainable weights (DeepSpeed-Chat keeps one with 0.992)."""

    def __init__(self, actor, decay: float):
        self.decay = decay
        self.shadow = trainable_state(actor)

    @torch.no_grad()
    def update(self, actor) -> None:
        for name, param in actor.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(param.detach(), 1.0 - self.decay)


# -------------------------------------------------------------------------------------------------------- set-up
def run_ppo(config: PPOConfig) -> Path:
    """Train and write OUTPUT/final (the actor, Hugging Face format) and OUTPUT/final_critic."""
    setup_logging()
    functions, monitor_fn = load_reward_functions(config)  # a broken function fails first
    out, resume, world = start_run(config, "ppo", config.actor)
    for field, size in (("mini_batch_size", config.mini_batch),
                        ("ptx_batch_size", (config.ptx_batch_size or config.mini_batch) if config.use_ptx else 0)):
        if size % world.size:
            raise ConfigError(f"{field}: {size} does not split evenly over {world.size} ranks")

    # Data before models, so that bad rows stop the run before anything loads.
    tokenizer = load_tokenizer(config.actor)
    data = load_data(config, tokenizer, out, functions, monitor_fn)
    models = _load_models(config, tokenizer, functions, world)
    models.monitor = FunctionScorer(monitor_fn, tokenizer, f"--monitor-fn {config.monitor_fn}") if monitor_fn \
        else None
    if world.rank > 0:  # same initialisation everywhere, but each rank samples its responses from a stream of its own
        torch.manual_seed(config.seed + 1_000_003 * world.rank)
    iterations = config.max_steps or max(1, math.ceil(config.epochs * len(data.prompts) / config.batch_size))
    state = _train_state(config, models, iterations)
    extra = {"actor_ema": state.ema.shadow} if state.ema is not None else None
    start = 0
    if resume is not None:
        saved = resume_run(resume, state.trained, config, world, {"actor": "lr", "critic": "critic_lr"}, extra)
        state.kl_ctl.value = config.kl_coef if "kl_coef" in resume.changed else saved["kl_coef"]
        state.moments = RunningMoments(**saved["reward_moments"])
        start = int(saved["step"])

    def save(step: int) -> None:
        save_run(out, step, state.trained, {"kl_coef": state.kl_ctl.value, "reward_moments": vars(state.moments)},
                 config, "ppo", world, extra)

    settings = PPOSettings.of(config, models.actor)
    train(config, "ppo", iterations, start, lambda i: ppo_iteration(i, settings, models, data, state, tokenizer, world),
          save, out, world, snapshot_actor(config, models.actor, tokenizer, out, world))

    def fresh_critic():
        return TokenValues(with_lora(load_sequence_classifier(_critic_path(config, tokenizer), tokenizer,
                                                              seed=config.seed), config, "SEQ_CLS"))

    final = save_final_actor(config, models.actor, tokenizer, out, world)
    save_final(models.critic, tokenizer, out / "final_critic", world, fresh_critic, merge_lora=config.lora_merge)
    if state.ema is not None:
        shadow = {name: full_tensor(value) for name, value in state.ema.shadow.items()}  # collective under FSDP
        averaged = None
        if world.main:
            fsdp = world.strategy == "fsdp"  # gathered weights go through an unsharded copy
            averaged = fresh_actor(config, tokenizer) if fsdp else copy.deepcopy(unwrap(models.actor))
            load_trainable_state(averaged, shadow)
        write_model(averaged, tokenizer, out / "final_ema", world, merge_lora=config.lora_merge)
    log.info(f"final actor: {final}; critic: {out / 'final_critic'}")
    return final


def _train_state(config: PPOConfig, models: Models, iterations: int) -> TrainState:
    """Separate AdamW and schedules for actor and critic (stepped per minibatch), the KL controller, the running
    reward statistics and the optional EMA."""
    updates = config.ppo_epochs * (config.batch_size // config.mini_batch)
    actor_opt = make_optimizer(models.actor, config.lr, config.weight_decay)
    critic_opt = make_optimizer(models.critic, config.critic_lr, config.weight_decay)
    actor_steps = max(1, (iterations - config.critic_warmup_steps) * updates)
    trained = Trained({
        "actor": (models.actor, actor_opt,
                  make_scheduler(actor_opt, config.lr_schedule, config.warmup_steps, actor_steps)),
        "critic": (models.critic, critic_opt,
                   make_scheduler(critic_opt, config.lr_schedule, config.warmup_steps, iterations * updates))})
    ema = ActorEMA(unwrap(models.actor), config.ema_decay) if config.ema_decay > 0 else None
    return TrainState(trained, core.AdaptiveKLController(config.kl_coef, config.kl_target, config.kl_horizon),
                      RunningMoments(), ema)


def _critic_path(config: PPOConfig, tokenizer) -> str:
    """The critic starts from --critic, else the reward model when it shares the actor's tokenizer, else the actor."""
    if config.critic:
        return config.critic
    return config.reward if config.reward and same_vocabulary(tokenizer, load_tokenizer(config.reward)) \
        else config.actor


def _load_models(config: PPOConfig, tokenizer, functions, world: World) -> Models:
    """Actor (+LoRA), critic (+LoRA, head trainable), frozen reference and reward model; dropout off in all. The
    actor and critic are wrapped for the strategy; the frozen models are replicated, or sharded with --shard-frozen."""
    actor, actor_is_peft = load_actor(config, tokenizer, world)
    critic_path = _critic_path(config, tokenizer)
    if config.critic and not same_vocabulary(tokenizer, load_tokenizer(config.critic)):
        raise ConfigError(f"critic: {config.critic} has another vocabulary than the actor; the critic reads the "
                          "actor's tokens, so it must share its tokenizer")
    if not config.critic and config.reward and critic_path != config.reward:
        log.info("the reward model's tokenizer differs from the actor's: responses are re-tokenized for it, and the "
                 "critic starts from the actor with a new value head")
    critic = TokenValues(with_lora(load_sequence_classifier(critic_path, tokenizer,
                                                            gradient_checkpointing=config.gradient_checkpointing,
                                                            **model_kwargs(config)), config, "SEQ_CLS"))
    disable_dropout(critic)
    critic = wrap_model(critic, world, dtype=config.dtype, cpu_offload=config.fsdp_cpu_offload)
    ref = load_reference(config, tokenizer, world, actor_is_peft)
    # With a LoRA critic started from the reward model, the reward model is that critic with its adapter disabled.
    shared = critic if config.reward and is_peft(unwrap(critic).classifier) and critic_path == config.reward else None
    reward = load_reward(config, tokenizer, functions, world, shared_critic=shared)
    return Models(actor, ref, reward, _reward_stats(config), critic=critic)


def _reward_stats(config: PPOConfig) -> tuple[float, float] | None:
    """The (mean, std) `rlhfkit rm` stored with the reward model, when reward_norm uses them (rm-stats, or auto with
    the reward model as the only source)."""
    stored = read_reward_stats(config.reward) if config.reward else None
    if config.reward_norm == "rm-stats" and stored is None:
        raise ConfigError(f"reward_norm: rm-stats, but {config.reward} has no stored score statistics "
                          "(reward_stats.json, written by `rlhfkit rm`)")
    if stored is None or config.reward_norm not in ("auto", "rm-stats") or config.reward_fn:
        return None
    stats = (stored["mean"], stored["std"] or 1.0)
    log.info(f"rewards normalised with the reward model's stored mean {stats[0]:.4f}, std {stats[1]:.4f}")
    return stats
