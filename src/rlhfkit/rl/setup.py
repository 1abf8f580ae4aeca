"""What every on-policy algorithm sets up and repeats, whatever it trains: prompts and PTX data, the policy, the
frozen reference (only when a KL term reads it), the reward (a reward model and/or weighted functions, and a monitor),
sampling and scoring a batch on every rank, putting the ranks' shares together, the PTX loss, placement of the
frozen models, and checkpoints of whatever the algorithm trains. The algorithms' pages (ppo/train.py,
grpo/train.py) build on this; the config stops at their entry points, and the loops take the frozen records below.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from rlhfkit.config import ConfigError
from rlhfkit.data.batching import chunks, step_indices, to_device
from rlhfkit.data.encode import EncodeStats, Encoded, encode_conversation, encode_prompt
from rlhfkit.data.formats import PromptExample
from rlhfkit.data.loading import load_examples, write_problems
from rlhfkit.data.templates import resolve_template
from rlhfkit.models import (TokenValues, autocast, disable_dropout, is_peft, load_causal_lm,
                            load_sequence_classifier, load_tokenizer)
from rlhfkit.rl.config import RLConfig
from rlhfkit.rl.rollout import Rollout, Sampling, concat_rollouts, generate, micro_batches, pad_responses
from rlhfkit.rl.scoring import (FunctionScorer, Reward, RewardModelScorer, check_finite_scores, check_reward_columns,
                                load_reward_fn, same_vocabulary)
from rlhfkit.training.checkpoint import load_checkpoint, save_checkpoint
from rlhfkit.rl.loop import Iteration, LoopSettings, run_iterations
from rlhfkit.training.common import (SNAPSHOTS, Resume, cpu_pass_tokens, log, model_shape, rows_per_pass, run_state,
                                     save_final, set_peak_lr, set_weight_decay, with_lora)
from rlhfkit.training.distributed import (World, adapter_disabled, gathered, gradient_sync, place_frozen, rank_share,
                                          wrap_model)
from rlhfkit.training.guards import TrainingError
from rlhfkit.training.lm_loss import collate as collate_lm, sft_loss
from rlhfkit.training.metrics import RunLogger


# ---------------------------------------------------------------------------------------- settings for the loops
@dataclass(frozen=True)
class Passes:
    """How rows are grouped into forward passes, and in which dtype they run."""
    micro_batch_size: int  # 0: from micro_batch_tokens
    micro_batch_tokens: int
    dtype: str
    offload_frozen: bool
    cpu_tokens: int = 0  # the default token budget on CPU, sized to the policy (0: CPU_PASS_TOKENS)

    def rows(self, width: int, device) -> int:
        return rows_per_pass(self.micro_batch_size, self.micro_batch_tokens, width, device, self.cpu_tokens)


@dataclass(frozen=True)
class RolloutSettings:
    """Step 1 and 2 of an iteration: which prompts, how they are sampled."""
    batch_size: int  # prompts per iteration
    seed: int
    sampling: Sampling
    passes: Passes
    num_samples: int  # rows of the sample table


@dataclass(frozen=True)
class UpdateSettings:
    """The clipped policy update every algorithm here shares, and the PTX term mixed into it."""
    ppo_epochs: int
    mini_batch: int  # sequences per optimizer step
    cliprange: float
    cliprange_high: float  # the ratio's upper bound is 1 + cliprange_high (DAPO's clip-higher)
    dual_clip: float
    entropy_coef: float
    loss_agg: str
    max_new_tokens: int  # seq-mean-token-sum-norm's constant
    temperature: float
    max_grad_norm: float
    ptx_coef: float
    ptx_batch: int  # PTX rows per actor optimizer step
    seed: int
    passes: Passes


def passes_of(config: RLConfig, actor: torch.nn.Module) -> Passes:
    """How this run's passes are cut, their default budget on CPU sized to the actor."""
    return Passes(config.micro_batch_size, config.micro_batch_tokens, config.dtype, config.offload_frozen,
                  cpu_pass_tokens(*model_shape(actor)))


def rollout_settings(config: RLConfig, passes: Passes, samples_per_prompt: int = 1) -> RolloutSettings:
    sampling = Sampling(config.max_new_tokens, config.temperature, config.top_p, config.top_k,
                        tuple(config.stop_strings), samples_per_prompt)
    return RolloutSettings(config.batch_size, config.seed, sampling, passes, config.num_samples)


def update_settings(config: RLConfig, passes: Passes, cliprange_high: float = 0.0) -> UpdateSettings:
    return UpdateSettings(config.ppo_epochs, config.mini_batch, config.cliprange, cliprange_high or config.cliprange,
                          config.dual_clip, config.entropy_coef, config.loss_agg, config.max_new_tokens,
                          config.temperature, config.max_grad_norm, config.ptx_coef,
                          config.ptx_batch_size or config.mini_batch, config.seed, passes)


# ----------------------------------------------------------------------------------------------------------- data
@dataclass
class Data:
    prompts: list[PromptExample]
    prompt_ids: list[list[int]]  # each prompt rendered and tokenized, ending with the assistant header
    ptx: list[Encoded]  # pretraining rows (empty without PTX)
    pad_id: int


def load_reward_functions(config: RLConfig) -> tuple[list[tuple[str, Callable]], Callable | None]:
    """(spec, function) for each --reward-fn, and the --monitor-fn; a broken function fails before anything else."""
    functions = [(spec, load_reward_fn(spec)) for spec in config.reward_fn]
    monitor = load_reward_fn(config.monitor_fn, "monitor_fn") if config.monitor_fn else None
    return functions, monitor


def load_data(config: RLConfig, tokenizer, out: Path, functions: list[tuple[str, Callable]],
              monitor: Callable | None) -> Data:
    """Prompts (each rendered with the template and tokenized) and PTX rows; bad rows stop the run before any model
    loads, and so does a reward function that needs a prompt column the rows lack."""
    prompts = _load(config.prompts, "prompt", config, out)
    columns = {key for example in prompts for key in example.extra}
    for who, fn in [(f"reward_fn {spec}", fn) for spec, fn in functions] + [(f"monitor_fn {config.monitor_fn}",
                                                                            monitor)]:
        if fn is not None:
            check_reward_columns(fn, columns, who)
    ptx_rows = _load(config.ptx_data, "text", config, out) if config.use_ptx else []
    template = resolve_template(config.template, tokenizer)
    stats = EncodeStats()
    prompt_ids = [encode_prompt(p, tokenizer, template, config.max_prompt_len, stats) for p in prompts]
    log.info(f"template {template}; prompts: {stats.rows}, {stats.truncated} cut to {config.max_prompt_len} tokens")
    ptx = [e for e in (encode_conversation(c, tokenizer, template, config.max_len, EncodeStats()) for c in ptx_rows)
           if e]
    return Data(prompts, prompt_ids, ptx, tokenizer.pad_token_id)


def _load(specs: list[str], kind: str, config: RLConfig, out: Path) -> list:
    loaded = load_examples(specs, kind, skip_invalid=config.skip_invalid, seed=config.seed)
    for r in loaded.reports:
        log.info(f"{kind} data {r.path}: {r.rows} rows, {r.invalid} invalid, {r.used} used")
    if loaded.problems:
        write_problems(loaded.problems, out / f"skipped_{kind}_rows.jsonl")
        log.warning(f"skipped {len(loaded.problems)} invalid {kind} rows; reasons in {out}/skipped_{kind}_rows.jsonl")
    if not loaded.examples:
        raise ConfigError(f"{'prompts' if kind == 'prompt' else 'ptx_data'}: no valid rows")
    return loaded.examples


# --------------------------------------------------------------------------------------------------------- models
@dataclass
class Models:
    """What an on-policy run holds. `ref` is None when the reference is the LoRA actor with its adapter disabled, or
    when nothing reads it (an algorithm without a KL term); `critic` is None for the critic-free algorithms."""
    actor: torch.nn.Module  # a causal LM (DDP-wrapped or FSDP-sharded on several ranks)
    ref: torch.nn.Module | None
    reward: Reward
    reward_stats: tuple[float, float] | None = None  # the reward model's stored (mean, std), when it is the reward
    monitor: FunctionScorer | None = None  # logged, never trained on
    critic: torch.nn.Module | None = None  # TokenValues of a sequence classifier (likewise wrapped)

    @property
    def frozen(self) -> list[torch.nn.Module]:
        """Separate frozen copies (reference, reward model): what --offload-frozen moves."""
        rm = self.reward.model_scorer
        rm = rm.model if rm is not None and not rm.adapter_disabled else None
        return [m for m in (self.ref, rm) if m is not None]


def model_kwargs(config: RLConfig) -> dict[str, Any]:
    return dict(attn_implementation=config.attn_implementation, seed=config.seed)


def load_actor(config: RLConfig, tokenizer, world: World) -> tuple[torch.nn.Module, bool]:
    """The policy (+LoRA), dropout off, wrapped for the strategy; and whether it has a LoRA adapter."""
    actor = load_causal_lm(config.actor, tokenizer, gradient_checkpointing=config.gradient_checkpointing,
                           **model_kwargs(config))
    actor = with_lora(actor, config, "CAUSAL_LM")
    disable_dropout(actor)
    return wrap_model(actor, world, dtype=config.dtype, cpu_offload=config.fsdp_cpu_offload), is_peft(actor)


def frozen(model: torch.nn.Module, config: RLConfig, world: World) -> torch.nn.Module:
    """A model that is never trained: no gradients, eval mode, dropout off; replicated, or sharded with
    --shard-frozen."""
    disable_dropout(model)
    return place_frozen(model.requires_grad_(False).eval(), world, shard=config.shard_frozen, dtype=config.dtype)


def load_reference(config: RLConfig, tokenizer, world: World, actor_is_peft: bool) -> torch.nn.Module | None:
    """The frozen reference; None when it is the LoRA actor with its adapter disabled (one copy of the weights)."""
    if config.ref or not actor_is_peft:
        return frozen(load_causal_lm(config.ref or config.actor, tokenizer, **model_kwargs(config)), config, world)
    return None


def load_reward(config: RLConfig, tokenizer, functions: list[tuple[str, Callable]], world: World,
                shared_critic: torch.nn.Module | None = None) -> Reward:
    """The reward model (if any) and the functions with their weights. `shared_critic`: a LoRA critic started from
    the reward model, whose disabled adapter is the reward model (PPO passes it; no second copy)."""
    scorers = []
    if config.reward:
        reward_tokenizer = load_tokenizer(config.reward)
        if shared_critic is not None:
            model = shared_critic
        else:
            model = frozen(TokenValues(load_sequence_classifier(config.reward, reward_tokenizer,
                                                                **model_kwargs(config))), config, world)
        scorers.append(RewardModelScorer(model, reward_tokenizer, adapter_disabled=shared_critic is not None,
                                         same_tokenizer=same_vocabulary(tokenizer, reward_tokenizer),
                                         template=resolve_template(config.template, reward_tokenizer),
                                         max_len=config.max_prompt_len + config.max_new_tokens + 8))
    scorers += [FunctionScorer(fn, tokenizer, f"--reward-fn {spec}") for spec, fn in functions]
    return Reward(scorers, config.reward_weights or [1.0] * len(scorers))


# ----------------------------------------------------------------------------------- steps 1 and 2 of an iteration
@dataclass
class Scored:
    """This rank's share of an iteration's batch, sampled and scored; per-sequence tensors (b,), b = prompts * G."""
    indices: list[int]  # the iteration's prompts (every rank's)
    mine: list[int]  # this rank's share of them
    rollout: Rollout
    texts: list[str]  # the decoded responses
    scores: torch.Tensor  # the (weighted) reward
    parts: dict[str, torch.Tensor]  # each reward source's own score, by name
    monitor: torch.Tensor | None
    micro: int  # rows per forward pass, the same on every rank


def sample_and_score(iteration: int, settings: RolloutSettings, models: Models, data: Data, tokenizer,
                     world: World, timer: PhaseTimer) -> Scored:
    """1. The iteration's prompts (a function of seed and iteration), this rank's share, left-padded; the actor
    samples G responses to each. 2. The reward sources score them; a function that raises or returns the wrong thing
    stops the run on every rank."""
    device = world.device
    G = settings.sampling.samples_per_prompt
    indices = step_indices(len(data.prompts), settings.batch_size, settings.seed, iteration)
    mine = rank_share(indices, world)
    # Rows per forward pass, from the longest layout any rank can have: every rank makes as many passes (FSDP and a
    # sharded reward model gather parameters in each).
    width = max(len(data.prompt_ids[i]) for i in indices) + settings.sampling.max_new_tokens
    micro = settings.passes.rows(width, device)
    with timer("generate"), autocast(settings.passes.dtype, device), gathered(models.actor) as actor:
        rollout = generate(actor, [data.prompt_ids[i] for i in mine], tokenizer, settings.sampling)
    texts = tokenizer.batch_decode(rollout.responses.masked_fill(~rollout.response_mask, tokenizer.pad_token_id),
                                   skip_special_tokens=True)
    with timer("score"), torch.no_grad(), autocast(settings.passes.dtype, device):
        place(models.frozen, device, settings.passes)
        examples = [data.prompts[i] for i in mine for _ in range(G)]
        failure = None
        scores = parts = monitor = None
        try:
            scores, parts = models.reward(rollout, examples, texts, micro)
            monitor = models.monitor(rollout, examples, texts) if models.monitor else None
        except TrainingError as exc:
            failure = exc
        if world.sum([float(failure is not None)])[0]:
            raise failure or TrainingError("the reward function failed on another rank")
    return Scored(indices, mine, rollout, texts, scores, parts, monitor, micro)


def check_scores(iteration: int, scored: Scored, models: Models) -> None:
    """A non-finite score from any source skips the iteration (SkippedIteration), naming the source and rows."""
    named = [(models.reward.scorer(name).name, values) for name, values in scored.parts.items()]
    if scored.monitor is not None:
        named.append((models.monitor.name, scored.monitor))
    check_finite_scores(iteration, named, scored.texts)


def score_parts(scored: Scored) -> dict[str, float]:
    """Metrics: each reward source's mean when there are several, and the monitor's."""
    parts = {f"score/{name}": values.mean().item() for name, values in scored.parts.items()} \
        if len(scored.parts) > 1 else {}
    return parts | ({"monitor": scored.monitor.mean().item()} if scored.monitor is not None else {})


def whole_batch(world: World, scored: Scored, per_token: list[torch.Tensor], pad_id: int
                ) -> tuple[Scored, list[torch.Tensor]]:
    """Every rank's share put together in rank order, which is the order of the iteration's prompts: the rollout,
    per-token tensors (B, R) right-padded to the longest response, the scores and the texts. The identity on one
    process."""
    if world.size == 1:
        return scored, per_token
    s = scored
    parts = world.gather_objects((s.rollout, per_token, s.scores, s.parts, s.monitor, s.texts))
    whole = concat_rollouts([part[0] for part in parts], pad_id)
    R = whole.response_mask.shape[1]
    per_token = [torch.cat([pad_responses(part[1][k], R) for part in parts]) for k in range(len(per_token))]
    scores = torch.cat([part[2] for part in parts])
    by_name = {name: torch.cat([part[3][name] for part in parts]) for name in s.parts}
    monitor = None if s.monitor is None else torch.cat([part[4] for part in parts])
    texts = [text for part in parts for text in part[5]]
    return Scored(s.indices, s.indices, whole, texts, scores, by_name, monitor, s.micro), per_token


@torch.no_grad()
def reference_logprobs(models: Models, rollout: Rollout, temperature: float, device, micro: int,
                       group_size: int = 1) -> torch.Tensor:
    """(B, R) log-probs of the sampled tokens under the reference, at the sampling temperature, 0 where masked.
    group_size G > 1: the rollout's rows are groups of G answering one prompt, which is computed once per group."""
    out = torch.zeros(rollout.response_mask.shape)
    ref = models.ref if models.ref is not None else models.actor
    for mb in micro_batches(rollout, list(range(rollout.input_ids.shape[0])), micro, group_size):
        with adapter_disabled(models.actor) if models.ref is None else contextlib.nullcontext():
            out[mb.rows, :mb.response_len] = mb.logprobs(ref, device, temperature)[0].float().cpu()
    return out.masked_fill(~rollout.response_mask, 0.0)


def place(frozen_models: list[torch.nn.Module], device: torch.device, passes: Passes) -> None:
    """--offload-frozen on GPU: the frozen models visit the GPU only for scoring and the experience passes."""
    if passes.offload_frozen and torch.cuda.is_available():
        for model in frozen_models:
            model.to(device)


def sample_rows(scored: Scored, shaped: torch.Tensor, stopped: torch.Tensor, data: Data, tokenizer, iteration: int,
                count: int) -> list[dict]:
    """The first `count` rows of the batch for the sample table."""
    G = scored.rollout.input_ids.shape[0] // len(scored.indices)
    return [{"step": iteration + 1,
             "prompt": tokenizer.decode(data.prompt_ids[scored.indices[i // G]], skip_special_tokens=True),
             "response": scored.texts[i], "score": scored.scores[i].item(), "reward": shaped[i].item(),
             "stopped": bool(stopped[i])} for i in range(min(count, len(scored.texts)))]


# ------------------------------------------------------------------------------------------------------ the update
def ptx_backward(actor, data: Data, update_step: int, settings: UpdateSettings, world: World) -> float:
    """Backward of ptx_coef * (token-mean LM loss) on this update step's PTX rows (this rank's share); returns this
    rank's part of that LM loss."""
    step_rows = [data.ptx[i] for i in step_indices(len(data.ptx), settings.ptx_batch, settings.seed + 1, update_step)]
    micro = settings.passes.rows(max(len(e.input_ids) for e in step_rows), world.device)  # same on every rank
    batches = [collate_lm(part, data.pad_id) for part in chunks(rank_share(step_rows, world), micro)]
    n_tokens = world.sum([sum(b["num_items"] for b in batches)])[0]
    total = 0.0
    for i, batch in enumerate(batches):
        with gradient_sync(actor, i == len(batches) - 1), autocast(settings.passes.dtype, world.device):
            loss_sum, _ = sft_loss(actor, to_device(batch, world.device))
            (settings.ptx_coef * loss_sum * world.size / n_tokens).backward()
        total += loss_sum.item()
    return total / n_tokens


def minibatch_order(B: int, settings: UpdateSettings, iteration: int, group_size: int = 1) -> list[list[int]]:
    """ppo_epochs shuffles of the B rows, cut into minibatches. The shuffle is a function of (seed, iteration), so a
    resumed run replays it without saved sampler state. group_size G > 1 shuffles whole groups (G consecutive rows),
    which stay together, in order."""
    generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + iteration)
    G = group_size
    orders = [[g * G + j for g in torch.randperm(B // G, generator=generator).tolist() for j in range(G)]
              for _ in range(settings.ppo_epochs)]
    return [mini for order in orders for mini in chunks(order, settings.mini_batch)]


def add(into: dict[str, float], values: dict[str, float]) -> None:
    for k, v in values.items():
        into[k] = into.get(k, 0.0) + v


class PhaseTimer:
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


# ---------------------------------------------------------------------------------------------------- checkpoints
@dataclass
class Trained:
    """The models an algorithm trains, each with its optimizer and schedule: name -> (model, optimizer, scheduler);
    checkpoints hold exactly these, plus the algorithm's own state."""
    parts: dict[str, tuple[torch.nn.Module, torch.optim.Optimizer, Any]] = field(default_factory=dict)

    def optimizers(self) -> dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]]:
        return {name: (model, opt) for name, (model, opt, _) in self.parts.items()}

    def schedulers(self) -> dict[str, Any]:
        return {name: sched for name, (_, _, sched) in self.parts.items()}


def save_run(out: Path, step: int, trained: Trained, state: dict, config: RLConfig, stage: str, world: World,
             extra: dict | None = None) -> None:
    save_checkpoint(out, step, models=trained.optimizers(), schedulers=trained.schedulers(), extra=extra,
                    state={**state, **run_state(config, stage)}, keep_last=config.keep_last, world=world)


def resume_run(resume: Resume, trained: Trained, config: RLConfig, world: World, lr_fields: dict[str, str],
               extra: dict | None = None) -> dict:
    """Load what `save_run` wrote (and the RNG states) into place, then the learning rates and weight decay that
    --resume-allow changed (`lr_fields`: model name -> its lr field); return the saved state."""
    saved = load_checkpoint(resume.path, models=trained.optimizers(), schedulers=trained.schedulers(), world=world,
                            extra=extra)
    for name, (_, optimizer, scheduler) in trained.parts.items():
        if lr_fields[name] in resume.changed:
            set_peak_lr(scheduler, getattr(config, lr_fields[name]))
        if "weight_decay" in resume.changed:
            set_weight_decay(optimizer, config.weight_decay)
    log.info(f"resumed from {resume.path} at iteration {saved['step']}")
    return saved


# ----------------------------------------------------------------------------------------- the run and its results
def train(config: RLConfig, stage: str, iterations: int, start: int, iterate: Iteration, save: Callable[[int], None],
          out: Path, world: World, snapshot: Callable[[int], None] | None = None) -> None:
    """Iterations `start` .. `iterations` - 1 of an algorithm (rl/loop.py), with its progress bar and logs;
    `snapshot(iteration)` every --snapshot-every iterations."""
    logger = RunLogger(out, total_steps=iterations, start_step=start, desc=stage, wandb_project=config.wandb_project,
                       enabled=world.main)
    loop = LoopSettings(iterations, config.max_bad_steps, config.log_every, config.sample_every, config.num_samples,
                        config.save_every, config.snapshot_every)
    try:
        run_iterations(iterate, start, loop, logger, save, out, world, snapshot)
    finally:
        logger.close()


def fresh_actor(config: RLConfig, tokenizer) -> torch.nn.Module:
    """An unsharded copy of the starting policy (+LoRA): FSDP's gathered weights are written through one."""
    return with_lora(load_causal_lm(config.actor, tokenizer, seed=config.seed), config, "CAUSAL_LM")


def save_final_actor(config: RLConfig, actor, tokenizer, out: Path, world: World) -> Path:
    """OUTPUT/final: the trained policy in Hugging Face format (the adapter merged unless --lora-merge false)."""
    return save_final(actor, tokenizer, out / "final", world, lambda: fresh_actor(config, tokenizer),
                      merge_lora=config.lora_merge)


def snapshot_actor(config: RLConfig, actor, tokenizer, out: Path, world: World) -> Callable[[int], None]:
    """The `snapshot` of `train`: OUTPUT/snapshots/step-N, the policy after iteration N written as OUTPUT/final is
    (what an evaluation along training, such as the demo's over-optimisation plot, loads)."""
    def write(iteration: int) -> None:
        save_final(actor, tokenizer, out / SNAPSHOTS / f"step-{iteration:08d}", world,
                   lambda: fresh_actor(config, tokenizer), merge_lora=config.lora_merge,
                   when=f"at iteration {iteration}")

    return write
