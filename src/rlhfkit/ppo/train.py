"""Stage 3, PPO: the actor generates, the reward model (or function) scores, the reference keeps it close, the critic
estimates values; clipped policy and value updates, with the pretraining loss (PTX) mixed into the actor's.

`run_ppo` sets up the models; `ppo_iteration` is one iteration, its six steps in order; `ppo_update` is step 6.
PPO's own math is in ppo/core.py. The RL layer the algorithms share: the shared math in rl/core.py, rollouts and
forward passes in rl/rollout.py (sampled by rl/sampler.py), the reward in rl/scoring.py, the outer loop (iterations,
skipped ones, logging, samples, checkpoints) in rl/loop.py.

On several ranks (DDP or FSDP), each rank generates, scores and runs the experience passes for its share of the
iteration's prompts; then every rank holds the whole batch of experience, so rewards, GAE, advantage whitening and the
reward and KL statistics are those of the global batch, computed as one process would. Each minibatch is split over
the ranks, and its loss divided by the token count of the whole minibatch.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhfkit.config import ConfigError
from rlhfkit.data.batching import chunks, step_indices
from rlhfkit.data.encode import EncodeStats, Encoded, encode_conversation, encode_prompt
from rlhfkit.data.formats import PromptExample
from rlhfkit.data.loading import load_examples, write_problems
from rlhfkit.data.templates import resolve_template
from rlhfkit.models import (TokenValues, autocast, is_peft, load_causal_lm, load_sequence_classifier, load_tokenizer,
                            load_trainable_state, read_reward_stats, trainable_state)
from rlhfkit.ppo import core
from rlhfkit.ppo.config import PPOConfig
from rlhfkit.rl.core import (aggregate, kl_estimate, masked_mean, masked_sum, masked_var, masked_whiten,
                             per_token_rewards, policy_loss)
from rlhfkit.rl.loop import LoopSettings, run_iterations
from rlhfkit.rl.rollout import (Rollout, Sampling, concat_rollouts, disable_dropout, generate, micro_batches,
                                pad_responses, response_logprobs)
from rlhfkit.rl.scoring import (FunctionScorer, RewardModelScorer, RunningMoments, check_finite_scores,
                                check_reward_columns, load_reward_fn, same_vocabulary, shape_scores)
from rlhfkit.training.checkpoint import load_checkpoint, save_checkpoint
from rlhfkit.training.common import (Resume, log, make_optimizer, make_scheduler, rows_per_pass, run_state,
                                     save_final, set_peak_lr, set_weight_decay, setup_logging, start_run, with_lora,
                                     write_model)
from rlhfkit.training.distributed import (World, adapter_disabled, full_tensor, gathered, gradient_sync, place_frozen,
                                          rank_share, unwrap, wrap_model)
from rlhfkit.training.guards import TrainingError, check_finite
from rlhfkit.training.lm_loss import collate as collate_lm, sft_loss
from rlhfkit.training.loop import optimizer_step
from rlhfkit.training.metrics import RunLogger


@dataclass
class Experience:
    """One iteration's rollout and everything computed from it; tensors (B, R) unless noted."""
    rollout: Rollout
    old_logprobs: torch.Tensor  # actor, at sampling time
    ref_logprobs: torch.Tensor
    old_values: torch.Tensor  # critic, at sampling time
    scores: torch.Tensor  # (B,) raw score from the reward model or function
    rewards: torch.Tensor  # per-token: -beta * KL + shaped score at the last token
    advantages: torch.Tensor
    returns: torch.Tensor

    @property
    def response_mask(self) -> torch.Tensor:
        return self.rollout.response_mask


@dataclass
class Models:
    """The four models. `ref` is None when the reference is the LoRA actor with its adapter disabled; the scorer
    holds the reward model (which may be the LoRA critic with its adapter disabled) or the reward function."""
    actor: torch.nn.Module  # a causal LM (DDP-wrapped or FSDP-sharded on several ranks)
    critic: torch.nn.Module  # TokenValues of a sequence classifier (likewise)
    ref: torch.nn.Module | None
    scorer: RewardModelScorer | FunctionScorer
    reward_stats: tuple[float, float] | None  # the reward model's stored (mean, std), when rm-stats/auto uses them
    monitor: FunctionScorer | None = None  # logged, never trained on

    @property
    def frozen(self) -> list[torch.nn.Module]:
        """Separate frozen copies (reference, reward model): what --offload-frozen moves."""
        rm = self.scorer.model if isinstance(self.scorer, RewardModelScorer) and not self.scorer.adapter_disabled \
            else None
        return [m for m in (self.ref, rm) if m is not None]


@dataclass
class Data:
    prompts: list[PromptExample]
    prompt_ids: list[list[int]]  # each prompt rendered and tokenized, ending with the assistant header
    ptx: list[Encoded]  # pretraining rows (empty without PTX)
    pad_id: int


@dataclass
class TrainState:
    """What the run changes besides the weights; all of it goes into checkpoints."""
    optimizers: dict[str, torch.optim.Optimizer]  # "actor", "critic"
    schedulers: dict[str, object]
    kl_ctl: core.AdaptiveKLController
    moments: RunningMoments
    ema: ActorEMA | None


# ------------------------------------------------------------------------------------------------- the iteration
def ppo_iteration(iteration: int, config: PPOConfig, models: Models, data: Data, state: TrainState, tokenizer,
                  world: World = World()) -> tuple[dict[str, float], list[dict]]:
    """One PPO iteration; returns (metrics, sample rows)."""
    device = world.device
    prompt_ids = data.prompt_ids
    timer = _PhaseTimer()
    sampling = Sampling(config.max_new_tokens, config.temperature, config.top_p, config.top_k,
                        tuple(config.stop_strings))
    # 1. Rollout: the iteration's prompts (a function of seed and iteration), this rank's share of them, left-padded;
    #    the actor samples.
    indices = step_indices(len(data.prompts), config.batch_size, config.seed, iteration)
    mine = rank_share(indices, world)
    # Rows per forward pass, from the longest layout any rank can have: every rank makes as many passes (FSDP and a
    # sharded reward model gather parameters in each).
    micro = _rows_per_pass(config, max(len(prompt_ids[i]) for i in indices) + config.max_new_tokens, device)
    with timer("generate"), autocast(config.dtype, device), gathered(models.actor) as actor:
        rollout = generate(actor, [prompt_ids[i] for i in mine], tokenizer, sampling)
    response_texts = tokenizer.batch_decode(rollout.responses.masked_fill(~rollout.response_mask,
                                                                          tokenizer.pad_token_id),
                                            skip_special_tokens=True)
    # 2. Scoring: reward model or function.
    #    A function that raises or returns the wrong thing stops the run on every rank.
    with timer("score"), torch.no_grad(), autocast(config.dtype, device):
        _place(models.frozen, device, config)
        batch_prompts = [data.prompts[i] for i in mine]
        failure = None
        try:
            scores = models.scorer(rollout, batch_prompts, response_texts, micro)
            monitor = models.monitor(rollout, batch_prompts, response_texts) if models.monitor else None
        except TrainingError as exc:
            failure = exc
        if world.sum([float(failure is not None)])[0]:
            raise failure or TrainingError("the reward function failed on another rank")
    # 3. Log-probs of the sampled tokens under the reference (the actor's were kept while sampling), at the sampling
    #    temperature, and the critic's values.
    with timer("experience"), torch.no_grad(), autocast(config.dtype, device):
        ref_logprobs, old_values = _experience_forwards(models, rollout, config, device, micro)
        _place(models.frozen, torch.device("cpu"), config)
    rollout, (ref_logprobs, old_values), (scores, monitor), response_texts = _whole_batch(
        world, rollout, [ref_logprobs, old_values], [scores, monitor], response_texts, tokenizer.pad_token_id)
    old_logprobs, mask = rollout.logprobs, rollout.response_mask
    check_finite_scores(iteration, [(models.scorer.name, scores)] + (
        [(models.monitor.name, monitor)] if monitor is not None else []), response_texts)
    # 4. Per-token rewards: the score, normalised, with the missing-EOS rule and clipping, at the last token, and
    #    -beta * KL estimate at every token.
    if config.reward_norm == "running":
        state.moments.update(scores)
        mean, std = state.moments.mean, state.moments.std
    else:
        mean, std = models.reward_stats or (0.0, 1.0)  # set for rm-stats (and auto) when the reward model stored them
    shaped = shape_scores(scores, rollout.stopped, mean=mean, std=std, missing_eos_penalty=config.missing_eos_penalty,
                          missing_eos_score=config.missing_eos_score, clip=config.reward_clip)
    kl = kl_estimate(old_logprobs, ref_logprobs, config.kl_estimator)
    rewards = per_token_rewards(shaped, kl, state.kl_ctl.value, mask)
    # 5. GAE over valid tokens; returns = advantages + values; advantages whitened over valid tokens.
    advantages, returns = core.gae(old_values, rewards, mask, config.gamma, config.lam)
    advantage_mean, advantage_var = masked_mean(advantages, mask).item(), masked_var(advantages, mask).item()
    if config.whiten_advantages:
        advantages = masked_whiten(advantages, mask)
    experience = Experience(rollout, old_logprobs, ref_logprobs, old_values, scores, rewards, advantages, returns)
    # 6. Update: ppo_epochs over shuffled minibatches; clipped policy loss (+ PTX) for the actor, clipped value loss
    #    for the critic.
    with timer("train"):
        train_metrics = ppo_update(iteration, experience, config, models, data, state, world)

    # The KL controller sees this batch's mean per-sequence KL (k1, whatever estimator shapes the reward).
    sequence_kl = masked_sum(old_logprobs - ref_logprobs, mask, dim=-1)
    beta = state.kl_ctl.value
    state.kl_ctl.update(sequence_kl.mean().item(), config.batch_size)
    n_tokens = int(mask.sum())
    metrics = {
        "score": scores.mean().item(), "score_std": scores.std().item() if len(scores) > 1 else 0.0,
        "shaped_score": shaped.mean().item(), "reward": masked_sum(rewards, mask, dim=-1).mean().item(),
        **({"monitor": monitor.mean().item()} if monitor is not None else {}),
        "kl": sequence_kl.mean().item(), "beta": beta,
        "response_length": mask.sum(-1).float().mean().item(), "eos_rate": rollout.stopped.float().mean().item(),
        # the whitening statistics: mean and std of the advantages over the batch's valid tokens, before whitening
        "advantage_mean": advantage_mean, "advantage_std": math.sqrt(advantage_var),
        "explained_variance": core.explained_variance(old_values, returns, mask),
        **train_metrics,
        "tokens_per_s": n_tokens / timer.total(), **timer.seconds(),
    }
    samples = [{"step": iteration + 1, "prompt": tokenizer.decode(prompt_ids[indices[i]], skip_special_tokens=True),
                "response": response_texts[i], "score": scores[i].item(), "reward": shaped[i].item(),
                "stopped": bool(rollout.stopped[i])} for i in range(min(config.num_samples, len(indices)))]
    return metrics, samples


def _whole_batch(world: World, rollout: Rollout, per_token: list[torch.Tensor], per_sequence: list,
                 texts: list[str], pad_id: int) -> tuple[Rollout, list[torch.Tensor], list, list[str]]:
    """Every rank's share put together in rank order, which is the order of the iteration's prompts: the rollout,
    per-token tensors (B, R) right-padded to the longest response, per-sequence tensors (B,) (or None) and the
    response texts. The identity on one process."""
    if world.size == 1:
        return rollout, per_token, per_sequence, texts
    parts = world.gather_objects((rollout, per_token, per_sequence, texts))
    whole = concat_rollouts([part[0] for part in parts], pad_id)
    R = whole.response_mask.shape[1]
    per_token = [torch.cat([pad_responses(part[1][k], R) for part in parts]) for k in range(len(per_token))]
    per_sequence = [None if value is None else torch.cat([part[2][k] for part in parts])
                    for k, value in enumerate(per_sequence)]
    return whole, per_token, per_sequence, [text for part in parts for text in part[3]]


@torch.no_grad()
def _experience_forwards(models: Models, rollout: Rollout, config: PPOConfig, device, micro: int
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference log-probs and critic values, each (B, R) with 0 where masked, `micro` rows per forward pass."""
    models.actor.eval()
    models.critic.eval()
    ref_logprobs, values = torch.zeros(rollout.response_mask.shape), torch.zeros(rollout.response_mask.shape)
    ref = models.ref if models.ref is not None else models.actor
    for mb in micro_batches(rollout, list(range(rollout.input_ids.shape[0])), micro):
        ids, attn, p, r = mb.input_ids.to(device), mb.attention_mask.to(device), mb.prompt_len, mb.response_len
        with adapter_disabled(models.actor) if models.ref is None else contextlib.nullcontext():
            ref_logprobs[mb.rows, :r] = response_logprobs(ref, ids, attn, p, config.temperature)[0].float().cpu()
        values[mb.rows, :r] = models.critic(ids, attn)[:, p - 1:-1].float().cpu()  # V(s_t): the state before token t
    mask = rollout.response_mask
    return ref_logprobs.masked_fill(~mask, 0.0), values.masked_fill(~mask, 0.0)


def _rows_per_pass(config: PPOConfig, width: int, device) -> int:
    return rows_per_pass(config.micro_batch_size, config.micro_batch_tokens, width, device)


def _place(frozen: list[torch.nn.Module], device: torch.device, config: PPOConfig) -> None:
    """--offload-frozen on GPU: the frozen models visit the GPU only for scoring and the experience passes."""
    if config.offload_frozen and torch.cuda.is_available():
        for model in frozen:
            model.to(device)


# --------------------------------------------------------------------------------------------------------- step 6
def ppo_update(iteration: int, exp: Experience, config: PPOConfig, models: Models, data: Data, state: TrainState,
               world: World = World()) -> dict[str, float]:
    """`ppo_epochs` passes over the experience in shuffled minibatches: one optimizer step per minibatch for the
    actor (unless the critic is still warming up) and the critic. Each rank takes its share of every minibatch and
    accumulates micro-batches; every loss is a sum over this rank's part divided by the whole minibatch's count."""
    actor, critic, device = models.actor, models.critic, world.device
    train_actor = iteration >= config.critic_warmup_steps
    actor.train()
    critic.train()
    B = exp.rollout.input_ids.shape[0]
    micro = _rows_per_pass(config, exp.rollout.input_ids.shape[1], device)  # the whole batch's width: same everywhere
    # The shuffle is a function of (seed, iteration), so a resumed run replays it without saved sampler state.
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + iteration)
    n_updates = config.ppo_epochs * (B // config.mini_batch)
    sums: dict[str, float] = {}  # this rank's parts of the minibatch means, summed over ranks at the end
    steps: dict[str, float] = {}  # gradient norms and learning rates, the same on every rank
    update = 0  # optimizer steps so far in this iteration
    for epoch in range(config.ppo_epochs):
        order = torch.randperm(B, generator=generator).tolist()
        for mini in chunks(order, config.mini_batch):
            mask = exp.response_mask[mini]
            denominator = float(mask.sum()) if config.loss_agg == "token-mean" else float(len(mini))
            parts = micro_batches(exp.rollout, rank_share(mini, world), micro)  # this rank's share, in passes
            for i, mb in enumerate(parts):
                last = i == len(parts) - 1  # gradients are reduced over ranks once, after the last backward
                ids, attn, p = mb.input_ids.to(device), mb.attention_mask.to(device), mb.prompt_len
                mb_mask = mb.take(exp.response_mask).to(device)
                weight = float(mb_mask.sum()) / float(mask.sum())  # this micro-batch's share of the tokens
                if train_actor:
                    with gradient_sync(actor, last and not data.ptx), autocast(config.dtype, device):
                        logprobs, entropy = response_logprobs(actor, ids, attn, p, config.temperature,
                                                              with_entropy=True,
                                                              entropy_grad=config.entropy_coef > 0)
                        pg, pg_stats = policy_loss(logprobs, mb.take(exp.old_logprobs).to(device),
                                                        mb.take(exp.advantages).to(device), mb_mask,
                                                        config.cliprange, config.dual_clip)
                        pg_loss = aggregate(pg, mb_mask, config.loss_agg, denominator, config.max_new_tokens)
                        entropy_mean = aggregate(entropy, mb_mask, config.loss_agg, denominator,
                                                      config.max_new_tokens)
                        # DDP and FSDP average the ranks' gradients: times world.size makes that their sum.
                        ((pg_loss - config.entropy_coef * entropy_mean) * world.size).backward()
                    _add(sums, {"policy_loss": pg_loss.item(), "entropy": entropy_mean.item()})
                    _add(sums, {k: v.item() * weight for k, v in pg_stats.items()})
                with gradient_sync(critic, last), autocast(config.dtype, device):
                    values = critic(ids, attn)[:, p - 1:-1]
                    vf, vf_stats = core.value_loss(values, mb.take(exp.old_values).to(device),
                                                   mb.take(exp.returns).to(device), mb_mask, config.cliprange_value)
                    vf_loss = aggregate(vf, mb_mask, config.loss_agg, denominator, config.max_new_tokens)
                    (config.vf_coef * vf_loss * world.size).backward()
                _add(sums, {"value_loss": vf_loss.item(), **{k: v.item() * weight for k, v in vf_stats.items()}})
            if train_actor and data.ptx:
                actor_step = (iteration - config.critic_warmup_steps) * n_updates + update  # picks the PTX rows
                _add(sums, {"ptx_loss": _ptx_backward(actor, data, actor_step, config, world)})
            stepped = _optimizer_steps(models, config, state, train_actor, steps)
            if stepped:
                check_finite({"critic": critic, **({"actor": actor} if train_actor else {})},
                             f"after an optimizer step of iteration {iteration + 1}", world)
            if stepped and train_actor and state.ema is not None:
                state.ema.update(unwrap(actor))
            update += 1
    keys = sorted(sums)
    sums = dict(zip(keys, world.sum([sums[k] for k in keys])))
    return {k: v / n_updates for k, v in (sums | steps).items()}


def _ptx_backward(actor, data: Data, update_step: int, config: PPOConfig, world: World) -> float:
    """Backward of ptx_coef * (token-mean LM loss) on this update step's PTX rows (this rank's share); returns this
    rank's part of that LM loss."""
    size = config.ptx_batch_size or config.mini_batch
    step_rows = [data.ptx[i] for i in step_indices(len(data.ptx), size, config.seed + 1, update_step)]
    micro = _rows_per_pass(config, max(len(e.input_ids) for e in step_rows), world.device)  # same on every rank
    batches = [collate_lm(part, data.pad_id) for part in chunks(rank_share(step_rows, world), micro)]
    n_tokens = world.sum([sum(b["num_items"] for b in batches)])[0]
    total = 0.0
    for i, batch in enumerate(batches):
        with gradient_sync(actor, i == len(batches) - 1), autocast(config.dtype, world.device):
            loss_sum, _ = sft_loss(actor, {k: v.to(world.device) if torch.is_tensor(v) else v
                                           for k, v in batch.items()})
            (config.ptx_coef * loss_sum * world.size / n_tokens).backward()
        total += loss_sum.item()
    return total / n_tokens


def _optimizer_steps(models: Models, config: PPOConfig, state: TrainState, train_actor: bool,
                     stats: dict[str, float]) -> bool:
    """The step engine on the critic and (unless warming up) the actor: both step, or neither on a non-finite
    gradient."""
    names = ["critic"] + (["actor"] if train_actor else [])
    trained = {name: (getattr(models, name), state.optimizers[name], state.schedulers[name]) for name in names}
    stepped = optimizer_step(trained, config.max_grad_norm)
    for name in names:
        _add(stats, {f"{name}_grad_norm": stepped.grad_norms[name], f"{name}_lr": stepped.lrs[name]})
    _add(stats, {"skipped": float(not stepped.finite)})
    return stepped.finite


def _add(into: dict[str, float], values: dict[str, float]) -> None:
    for k, v in values.items():
        into[k] = into.get(k, 0.0) + v


class _PhaseTimer:
    def __init__(self):
        self.phases: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        yield
        self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - start

    def seconds(self) -> dict[str, float]:
        return {f"time_{k}": v for k, v in self.phases.items()} | {"time_iteration": self.total()}

    def total(self) -> float:
        return sum(self.phases.values())


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
    reward_fn = load_reward_fn(config.reward_fn) if config.reward_fn else None  # a broken function fails first
    monitor_fn = load_reward_fn(config.monitor_fn, "monitor_fn") if config.monitor_fn else None
    out, resume, world = start_run(config, "ppo")
    for field, size in (("mini_batch_size", config.mini_batch),
                        ("ptx_batch_size", (config.ptx_batch_size or config.mini_batch) if config.use_ptx else 0)):
        if size % world.size:
            raise ConfigError(f"{field}: {size} does not split evenly over {world.size} ranks")

    # Data before models, so that bad rows stop the run before anything loads.
    prompts = _load(config.prompts, "prompt", config, out)
    columns = {key for example in prompts for key in example.extra}
    for field, fn in (("reward_fn", reward_fn), ("monitor_fn", monitor_fn)):
        if fn is not None:  # a column the function requires but the rows lack: say so before any model loads
            check_reward_columns(fn, columns, f"{field} {getattr(config, field)}")
    ptx_rows = _load(config.ptx_data, "text", config, out) if config.use_ptx else []
    tokenizer = load_tokenizer(config.actor)
    template = resolve_template(config.template, tokenizer)
    stats = EncodeStats()
    prompt_ids = [encode_prompt(p, tokenizer, template, config.max_prompt_len, stats) for p in prompts]
    log.info(f"template {template}; prompts: {stats.rows}, {stats.truncated} cut to {config.max_prompt_len} tokens")
    ptx = [e for e in (encode_conversation(c, tokenizer, template, config.max_len, EncodeStats()) for c in ptx_rows)
           if e]
    data = Data(prompts, prompt_ids, ptx, tokenizer.pad_token_id)

    models = _load_models(config, tokenizer, reward_fn, world)
    models.monitor = FunctionScorer(monitor_fn, tokenizer, f"--monitor-fn {config.monitor_fn}") if monitor_fn else None
    if world.rank > 0:  # same initialisation everywhere, but each rank samples its responses from a stream of its own
        torch.manual_seed(config.seed + 1_000_003 * world.rank)
    iterations = config.max_steps or max(1, math.ceil(config.epochs * len(prompts) / config.batch_size))
    state = _train_state(config, models, iterations)
    start = _resume(resume, models, state, config, world) if resume is not None else 0

    logger = RunLogger(out, total_steps=iterations, start_step=start, desc="ppo", wandb_project=config.wandb_project,
                       enabled=world.main)
    loop = LoopSettings(iterations, config.max_bad_steps, config.log_every, config.sample_every, config.num_samples,
                        config.save_every)
    try:
        run_iterations(lambda i: ppo_iteration(i, config, models, data, state, tokenizer, world), start, loop,
                       logger, lambda done: _save(out, done, models, state, config, world), out, world)
    finally:
        logger.close()

    def fresh_actor():  # FSDP's gathered weights are written through an unsharded copy
        return with_lora(load_causal_lm(config.actor, tokenizer, seed=config.seed), config, "CAUSAL_LM")

    def fresh_critic():
        return TokenValues(with_lora(load_sequence_classifier(_critic_path(config, tokenizer), tokenizer,
                                                              seed=config.seed), config, "SEQ_CLS"))

    final = save_final(models.actor, tokenizer, out / "final", world, fresh_actor, merge_lora=config.lora_merge)
    save_final(models.critic, tokenizer, out / "final_critic", world, fresh_critic, merge_lora=config.lora_merge)
    if state.ema is not None:
        shadow = {name: full_tensor(value) for name, value in state.ema.shadow.items()}  # collective under FSDP
        averaged = None
        if world.main:
            averaged = fresh_actor() if world.strategy == "fsdp" else copy.deepcopy(unwrap(models.actor))
            load_trainable_state(averaged, shadow)
        write_model(averaged, tokenizer, out / "final_ema", world, merge_lora=config.lora_merge)
    log.info(f"final actor: {final}; critic: {out / 'final_critic'}")
    return final


def _train_state(config: PPOConfig, models: Models, iterations: int) -> TrainState:
    """Separate AdamW and schedules for actor and critic (stepped per minibatch), the KL controller, the running
    reward statistics and the optional EMA."""
    updates = config.ppo_epochs * (config.batch_size // config.mini_batch)
    optimizers = {"actor": make_optimizer(models.actor, config.lr, config.weight_decay),
                  "critic": make_optimizer(models.critic, config.critic_lr, config.weight_decay)}
    actor_steps = max(1, (iterations - config.critic_warmup_steps) * updates)
    schedulers = {"actor": make_scheduler(optimizers["actor"], config.lr_schedule, config.warmup_steps, actor_steps),
                  "critic": make_scheduler(optimizers["critic"], config.lr_schedule, config.warmup_steps,
                                           iterations * updates)}
    ema = ActorEMA(unwrap(models.actor), config.ema_decay) if config.ema_decay > 0 else None
    return TrainState(optimizers, schedulers, core.AdaptiveKLController(config.kl_coef, config.kl_target,
                                                                        config.kl_horizon), RunningMoments(), ema)


def _save(out: Path, step: int, models: Models, state: TrainState, config: PPOConfig, world: World) -> None:
    trained = {name: (getattr(models, name), state.optimizers[name]) for name in ("actor", "critic")}
    save_checkpoint(out, step, models=trained, schedulers=state.schedulers,
                    extra={"actor_ema": state.ema.shadow} if state.ema is not None else None,
                    state={"kl_coef": state.kl_ctl.value, "reward_moments": vars(state.moments),
                           **run_state(config, "ppo")}, keep_last=config.keep_last, world=world)


def _resume(resume: Resume, models: Models, state: TrainState, config: PPOConfig, world: World) -> int:
    """Load everything `_save` wrote (and the RNG states) into place, then the values --resume-allow changed; return
    the iteration to start from."""
    trained = {name: (getattr(models, name), state.optimizers[name]) for name in ("actor", "critic")}
    saved = load_checkpoint(resume.path, models=trained, schedulers=state.schedulers, world=world,
                            extra={"actor_ema": state.ema.shadow} if state.ema is not None else None)
    state.kl_ctl.value = config.kl_coef if "kl_coef" in resume.changed else saved["kl_coef"]
    state.moments = RunningMoments(**saved["reward_moments"])
    for name, field in (("actor", "lr"), ("critic", "critic_lr")):
        if field in resume.changed:
            set_peak_lr(state.schedulers[name], getattr(config, field))
        if "weight_decay" in resume.changed:
            set_weight_decay(state.optimizers[name], config.weight_decay)
    log.info(f"resumed from {resume.path} at iteration {saved['step']}")
    return int(saved["step"])


def _load(specs: list[str], kind: str, config: PPOConfig, out: Path) -> list:
    loaded = load_examples(specs, kind, skip_invalid=config.skip_invalid, seed=config.seed)
    for r in loaded.reports:
        log.info(f"{kind} data {r.path}: {r.rows} rows, {r.invalid} invalid, {r.used} used")
    if loaded.problems:
        write_problems(loaded.problems, out / f"skipped_{kind}_rows.jsonl")
        log.warning(f"skipped {len(loaded.problems)} invalid {kind} rows; reasons in {out}/skipped_{kind}_rows.jsonl")
    if not loaded.examples:
        raise ConfigError(f"{'prompts' if kind == 'prompt' else 'ptx_data'}: no valid rows")
    return loaded.examples


def _critic_path(config: PPOConfig, tokenizer) -> str:
    """The critic starts from --critic, else the reward model when it shares the actor's tokenizer, else the actor."""
    if config.critic:
        return config.critic
    return config.reward if config.reward and same_vocabulary(tokenizer, load_tokenizer(config.reward)) \
        else config.actor


def _load_models(config: PPOConfig, tokenizer, reward_fn, world: World) -> Models:
    """Actor (+LoRA), critic (+LoRA, head trainable), frozen reference and reward model; dropout off in all. The
    actor and critic are wrapped for the strategy; the frozen models are replicated, or sharded with --shard-frozen."""
    kwargs = dict(attn_implementation=config.attn_implementation, seed=config.seed)
    actor = load_causal_lm(config.actor, tokenizer, gradient_checkpointing=config.gradient_checkpointing, **kwargs)
    actor = with_lora(actor, config, "CAUSAL_LM")

    reward_tokenizer = load_tokenizer(config.reward) if config.reward else None
    same = reward_tokenizer is not None and same_vocabulary(tokenizer, reward_tokenizer)
    critic_path = _critic_path(config, tokenizer)
    if config.critic and not same_vocabulary(tokenizer, load_tokenizer(config.critic)):
        raise ConfigError(f"critic: {config.critic} has another vocabulary than the actor; the critic reads the "
                          "actor's tokens, so it must share its tokenizer")
    if not config.critic and config.reward and not same:
        log.info("the reward model's tokenizer differs from the actor's: responses are re-tokenized for it, and the "
                 "critic starts from the actor with a new value head")
    critic = TokenValues(with_lora(load_sequence_classifier(critic_path, tokenizer,
                                                            gradient_checkpointing=config.gradient_checkpointing,
                                                            **kwargs), config, "SEQ_CLS"))
    for model in (actor, critic):
        disable_dropout(model)
    actor_is_peft = is_peft(actor)
    actor = wrap_model(actor, world, dtype=config.dtype, cpu_offload=config.fsdp_cpu_offload)
    critic = wrap_model(critic, world, dtype=config.dtype, cpu_offload=config.fsdp_cpu_offload)

    def frozen(model):
        disable_dropout(model)
        return place_frozen(model.requires_grad_(False).eval(), world, shard=config.shard_frozen, dtype=config.dtype)

    ref = None
    if config.ref or not actor_is_peft:
        ref = frozen(load_causal_lm(config.ref or config.actor, tokenizer, **kwargs))
    reward_stats = None
    if reward_fn is not None:
        scorer = FunctionScorer(reward_fn, tokenizer, f"--reward-fn {config.reward_fn}")
    else:
        # With a LoRA critic started from the reward model, the reward model is that critic with its adapter
        # disabled: one copy of the weights.
        shared = is_peft(unwrap(critic).classifier) and critic_path == config.reward
        reward_model = critic if shared else frozen(TokenValues(load_sequence_classifier(config.reward,
                                                                                         reward_tokenizer, **kwargs)))
        scorer = RewardModelScorer(reward_model, reward_tokenizer, adapter_disabled=shared, same_tokenizer=same,
                                   template=resolve_template(config.template, reward_tokenizer),
                                   max_len=config.max_prompt_len + config.max_new_tokens + 8)
        stored = read_reward_stats(config.reward)
        if config.reward_norm == "rm-stats" and stored is None:
            raise ConfigError(f"reward_norm: rm-stats, but {config.reward} has no stored score statistics "
                              "(reward_stats.json, written by `rlhfkit rm`)")
        if stored is not None and config.reward_norm in ("auto", "rm-stats"):
            reward_stats = (stored["mean"], stored["std"] or 1.0)
            log.info(f"rewards normalised with the reward model's stored mean {reward_stats[0]:.4f}, "
                     f"std {reward_stats[1]:.4f}")
    return Models(actor, critic, ref, scorer, reward_stats)
