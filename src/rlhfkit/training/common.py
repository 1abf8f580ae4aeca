"""What every training stage shares: the common config fields, the run set-up (output folder, resume, ranks), the
optimizer and schedule, LoRA, and writing the final model."""

from __future__ import annotations

import logging
import math
import os
import random
import shutil
import sys
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhfkit.config import ConfigError, option, require, require_seed, to_dict, write_config
from rlhfkit.data.loading import check_spec_exists
from rlhfkit.data.readers import DataError
from rlhfkit.models import DTYPES, resolve_dtype, transformers_model
from rlhfkit.training.checkpoint import checkpoint_problem, latest_checkpoint, previous_intact, read_state
from rlhfkit.training.distributed import World, init_world, unwrap
from rlhfkit.training.guards import TrainingError, check_finite

log = logging.getLogger("rlhfkit")


@dataclass
class CommonConfig:
    """What every training stage has: model format, LoRA, the run, the optimizer and checkpoints."""
    # model
    template: str = option("auto", "chat template: auto (the tokenizer's, else human-assistant), tokenizer, "
                                   "human-assistant, alpaca or chatml", group="model",
                           choices=("auto", "tokenizer", "human-assistant", "alpaca", "chatml"))
    max_len: int = option(512, "longest sequence in tokens; longer rows lose prompt tokens from the left",
                          group="model")
    dtype: str = option("auto", "compute dtype: bfloat16 runs autocast over float32 master weights; auto picks it "
                                "where the GPU or CPU multiplies bf16 natively (AVX512-BF16, AMX), else float32",
                        group="model", choices=DTYPES)
    attn_implementation: str = option("sdpa", "attention kernel passed to transformers (sdpa, eager, "
                                              "flash_attention_2, ...)", group="model")
    gradient_checkpointing: bool = option(False, "recompute activations in the backward pass to save memory",
                                          group="model")
    # LoRA
    lora_r: int = option(0, "LoRA rank; 0 trains every weight", group="lora")
    lora_alpha: float = option(16.0, "LoRA scaling alpha", group="lora")
    lora_dropout: float = option(0.0, "dropout on the LoRA input", group="lora")
    lora_target_modules: list[str] = option(["all-linear"], "modules that get adapters (all-linear = every "
                                                            "linear layer but the output head)", group="lora")
    lora_merge: bool = option(True, "merge the adapter into the base when saving the final model (false: save "
                                    "the adapter alone)", group="lora")
    # data
    skip_invalid: bool = option(False, "skip bad rows (counted, written to OUTPUT/skipped_rows.jsonl; PPO: "
                                       "skipped_prompt_rows.jsonl and skipped_text_rows.jsonl) instead of stopping",
                                group="data")
    # training
    output: str = option("", "output folder: checkpoints, metrics, final model", group="training")
    max_steps: int = option(0, "optimizer steps; 0 = as many as `epochs` needs", group="training")
    epochs: float = option(1.0, "passes over the training data when max_steps is 0", group="training")
    batch_size: int = option(8, "examples per optimizer step (the global batch)", group="training")
    micro_batch_size: int = option(0, "examples per forward pass (gradient accumulation); 0 = batch_size",
                                   group="training")
    lr: float = option(1e-5, "peak learning rate (AdamW)", group="training")
    weight_decay: float = option(0.0, "AdamW weight decay (not on biases and norms)", group="training")
    lr_schedule: str = option("cosine", "decay after warmup", group="training",
                              choices=("cosine", "linear", "constant"))
    warmup_steps: int = option(0, "steps of linear warmup from 0 to lr", group="training")
    max_grad_norm: float = option(1.0, "clip the gradient norm to this; 0 = no clipping", group="training")
    seed: int = option(42, "seed for data order, initialisation and sampling", group="training")
    save_every: int = option(100, "write a checkpoint every N steps (0 = never)", group="training")
    keep_last: int = option(2, "checkpoints kept on disk", group="training")
    resume: str = option("", "continue from a checkpoint: bare --resume = the latest in OUTPUT, or a "
                             "checkpoint folder; its checksums are verified and the settings compared", group="training")
    resume_allow: list[str] = option([], "on --resume, settings that may differ from the checkpoint's run, e.g. "
                                         "lr,kl_coef: the new values are used from the resume on (logging, saving "
                                         "and run-length fields may always change)", group="training")
    overwrite: bool = option(False, "start afresh in an output folder that holds a previous run (its checkpoints, "
                                    "metrics and final models are deleted first)", group="training")
    max_bad_steps: int = option(5, "stop after this many non-finite losses in a row (each is skipped)",
                                group="training")
    log_every: int = option(1, "log metrics every N steps", group="training")
    wandb_project: str = option("", "also log to this Weights & Biases project (needs wandb installed)",
                                group="training")
    # several processes (torchrun, or --nproc)
    strategy: str = option("single", "single: one process; ddp: each rank holds the whole model; fsdp: FSDP2 shards "
                                     "parameters, gradients and optimizer state over the ranks", group="distributed",
                           choices=("single", "ddp", "fsdp"))
    nproc: int = option(0, "start this many processes on this machine (torchrun) and run there; 0 = this process",
                        group="distributed")
    fsdp_cpu_offload: bool = option(False, "FSDP: keep parameters, gradients and optimizer state in CPU memory",
                                    group="distributed")
    dist_timeout_s: float = option(1800.0, "seconds a collective waits for the other ranks before the run fails",
                                   group="distributed")

    def check(self) -> None:
        require(bool(self.output), "output: required (a folder for checkpoints and the final model)")
        require(self.lr > 0 and math.isfinite(self.lr), f"lr: must be > 0, got {self.lr}")
        require(self.batch_size >= 1, f"batch_size: must be >= 1, got {self.batch_size}")
        require(self.micro_batch_size >= 0, f"micro_batch_size: must be >= 0, got {self.micro_batch_size}")
        require(self.max_len >= 8, f"max_len: must be >= 8, got {self.max_len}")
        require(self.max_steps >= 0, f"max_steps: must be >= 0, got {self.max_steps}")
        require(self.epochs > 0, f"epochs: must be > 0, got {self.epochs}")
        require(self.lora_r >= 0, f"lora_r: must be >= 0, got {self.lora_r}")
        require(0 <= self.lora_dropout < 1, f"lora_dropout: must be in [0, 1), got {self.lora_dropout}")
        require(self.warmup_steps >= 0, f"warmup_steps: must be >= 0, got {self.warmup_steps}")
        require(self.max_grad_norm >= 0, f"max_grad_norm: must be >= 0, got {self.max_grad_norm}")
        require(self.weight_decay >= 0, f"weight_decay: must be >= 0, got {self.weight_decay}")
        require_adamw_scale(self.lr, self.weight_decay, "lr")
        for name in ("save_every", "log_every"):
            require(getattr(self, name) >= 0, f"{name}: must be >= 0, got {getattr(self, name)}")
        require(self.keep_last >= 1, f"keep_last: must be >= 1, got {self.keep_last}")
        require_seed(self.seed)
        require(self.max_bad_steps >= 1, f"max_bad_steps: must be >= 1, got {self.max_bad_steps}")
        require(self.nproc >= 0, f"nproc: must be >= 0, got {self.nproc}")
        require(self.nproc <= 1 or self.strategy != "single",
                f"nproc: {self.nproc} processes need --strategy ddp or fsdp")
        require(self.dist_timeout_s > 0, f"dist_timeout_s: must be > 0, got {self.dist_timeout_s}")
        require(self.strategy == "fsdp" or not self.fsdp_cpu_offload, "fsdp_cpu_offload: needs --strategy fsdp")
        fields = {f.name for f in dataclasses.fields(self)}
        for name in self.resume_allow:
            require(name in fields, f"resume_allow: {name!r} is not a setting of this stage")
        require(not (self.resume and self.overwrite), "overwrite: cannot be combined with --resume")
        from rlhfkit.models import attn_implementation_problem

        problem = attn_implementation_problem(self.attn_implementation)
        require(problem is None, f"attn_implementation: {problem}")

    @property
    def micro(self) -> int:
        return self.micro_batch_size or self.batch_size


def check_data_specs(specs: list[str], field: str) -> None:
    for spec in specs:
        try:
            problem = check_spec_exists(spec)
        except DataError as exc:  # a bad PATH:WEIGHT
            problem = str(exc)
        require(problem is None, f"{field}: {problem}")


def check_model_path(path: str, field: str) -> None:
    """A local model folder, or a hub id the hub can provide (see `model_source_problem`)."""
    from rlhfkit.models import model_source_problem

    problem = model_source_problem(path)
    require(problem is None, f"{field}: {problem}")


def check_output_file(path: str, field: str) -> None:
    """A file a tool writes when it is done: what would stop the write then is refused now, before the work."""
    if not path:
        return
    target = Path(path)
    require(not target.is_dir(), f"{field}: {path} is a folder; give the file to write, e.g. {target / 'results.json'}")
    existing = next(p for p in target.absolute().parents if p.exists())
    require(existing.is_dir(), f"{field}: cannot create {path}: {existing} is a file")
    require(os.access(existing, os.W_OK), f"{field}: cannot create {path}: {existing} is not writable")


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is at each record (tests and tools swap it), not the one at set-up."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def setup_logging() -> None:
    if not log.handlers:
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


@dataclass(frozen=True)
class Resume:
    """Where a run continues from, and the fields it was allowed to change there (their new values are applied to the
    restored optimizer and run state)."""
    path: Path
    step: int
    changed: frozenset[str] = frozenset()


# Fields that change only logging, saving, the run's length or how the work is laid out over processes and passes:
# free to differ on --resume. Any other difference changes the run and must be asked for with --resume-allow.
FREE_ON_RESUME = frozenset({
    "output", "resume", "resume_allow", "overwrite", "log_every", "save_every", "keep_last", "max_steps", "epochs",
    "eval_every", "sample_every", "num_samples", "wandb_project", "strategy", "nproc", "fsdp_cpu_offload",
    "dist_timeout_s", "shard_frozen", "offload_frozen", "micro_batch_size", "micro_batch_tokens", "snapshot_every"})
# What a previous run leaves in its output folder; --overwrite deletes exactly these.
SNAPSHOTS = "snapshots"
RUN_FILES = ("checkpoints", SNAPSHOTS, "final", "final_critic", "final_ema", "metrics.jsonl", "samples.jsonl",
             "tensorboard", "skipped_rows.jsonl", "skipped_prompt_rows.jsonl", "skipped_text_rows.jsonl")


def start_run(config: CommonConfig, stage: str, model: str) -> tuple[Path, Resume | None, World]:
    """Join the other ranks (if any), resolve `--dtype auto` for the trained `model` (its folder), check the output
    folder and the checkpoint to resume from, write the resolved config, seed everything; return (output, where to
    resume or None, this process's World)."""
    world = init_world(config.strategy, config.dist_timeout_s)
    # Resolved before anything is compared or written: the saved config and a resume check name the dtype that ran.
    config.dtype = resolve_dtype(config.dtype, world.device, model)
    if config.batch_size % world.size:
        raise ConfigError(f"batch_size: the global batch of {config.batch_size} must split evenly over the "
                          f"{world.size} ranks")
    out = Path(config.output)
    resume = _find_resume(config, stage, out, world) if config.resume else None
    if resume is None:
        previous = [name for name in RUN_FILES if (out / name).exists()]
        if previous and not config.overwrite:
            raise ConfigError(f"output: {out} already holds a run ({', '.join(previous)}); pass --resume to continue "
                              "it, --overwrite to replace it, or choose another --output")
        if previous and world.main:
            for name in previous:
                if (out / name).is_dir():
                    shutil.rmtree(out / name)
                else:
                    (out / name).unlink()
        world.barrier()
    if world.main:
        _writable(out)
        write_config(config, out / "config.yaml")
    world.barrier()
    seed_everything(config.seed)
    return out, resume, world


def _writable(out: Path) -> None:
    """Create the output folder and prove a file can be written there (root ignores permission bits, so only a write
    tells a read-only mount apart)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output: {out} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".rlhfkit-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"output: cannot write into {out} ({exc.strerror or exc})") from None


def _find_resume(config: CommonConfig, stage: str, out: Path, world: World) -> Resume | None:
    """The checkpoint to continue from: its checksums verified on rank 0 (every rank reads the same files), its stage
    and settings compared on every rank."""
    path = latest_checkpoint(out) if config.resume == "latest" else Path(config.resume)
    if path is None:
        log.info(f"--resume: no checkpoint in {out}/checkpoints yet, starting from the beginning")
        return None
    problem = checkpoint_problem(path) if world.main else None
    if world.sum([float(problem is not None)])[0]:
        raise ConfigError(f"resume: {problem}; {previous_intact(path)}" if problem else
                          f"resume: rank 0 found {path} damaged")
    state = read_state(path)
    return Resume(path, int(state["step"]), _resume_changes(config, stage, state, path, quiet=not world.main))


def _resume_changes(config: CommonConfig, stage: str, state: dict, path: Path, quiet: bool = False
                    ) -> frozenset[str]:
    """The fields whose value differs from the checkpoint's run and that --resume-allow names; any other difference
    (beyond FREE_ON_RESUME) is a ConfigError listing each field with both values."""
    saved_stage = state.get("stage")
    if saved_stage is not None and saved_stage != stage:
        raise ConfigError(f"resume: {path} is a checkpoint of `rlhfkit {saved_stage}`, not of `rlhfkit {stage}`")
    saved = state.get("config")
    if saved is None:  # written before checkpoints recorded their settings
        if not quiet:
            log.warning(f"{path} does not record its run's settings; they cannot be compared with this run's")
        return frozenset()
    current = to_dict(config)
    changed = {k: (saved.get(k), v) for k, v in current.items() if k not in FREE_ON_RESUME and saved.get(k) != v}
    refused = {k: pair for k, pair in changed.items() if k not in config.resume_allow}
    if refused:
        listed = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in refused.items())
        raise ConfigError(f"resume: these settings differ from the run in {path}: {listed}. Resume with the "
                          f"checkpoint's values, or pass --resume-allow {','.join(refused)} to use the new ones "
                          f"from step {state['step']} on")
    for k, (old, new) in changed.items():
        if not quiet:
            log.warning(f"--resume-allow: {k} is {new!r} from step {state['step']} on (the checkpoint's run used "
                        f"{old!r})")
    return frozenset(changed)


def run_state(config: CommonConfig, stage: str) -> dict:
    """What every checkpoint records about its run, so that a resume can check it continues the same one."""
    return {"stage": stage, "config": to_dict(config)}


def set_peak_lr(scheduler, lr: float) -> None:
    """Give a restored schedule (a LambdaLR, as transformers' are) a new peak learning rate from its current step on;
    the optimizer's current rate becomes what the schedule would have set."""
    scheduler.base_lrs = [lr] * len(scheduler.base_lrs)
    for group, factor in zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"] = lr
        group["lr"] = lr * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


def require_adamw_scale(lr: float, weight_decay: float, name: str) -> None:
    """AdamW moves each weight by about lr per step and multiplies the decayed ones by 1 - lr x weight_decay: lr >= 1
    or a factor <= 0 is never meant, and larger values overflow float32 inside the optimizer (a traceback from torch,
    on the GPU already where the CPU runs on to non-finite weights)."""
    require(lr < 1, f"{name}: must be < 1 (AdamW moves each weight by about lr at every step), got {lr}")
    require(lr * weight_decay < 1, f"weight_decay: {name} x weight_decay must be < 1 (AdamW multiplies each decayed "
                                   f"weight by 1 - {name} x weight_decay at every step), got {lr} x {weight_decay}")


def set_weight_decay(optimizer, weight_decay: float) -> None:
    """The new decay for the decayed group that make_optimizer builds (biases and norms stay undecayed)."""
    for group in optimizer.param_groups:
        if group["weight_decay"] != 0.0 or any(p.ndim >= 2 for p in group["params"]):
            group["weight_decay"] = weight_decay


# On CPU, passes much larger than the caches are slower per token, not faster: a 30M Llama (hidden 512 x 8 layers)'s
# forward and backward took 1.5x as long per token in passes of 11k tokens as in passes of 1.4k (its 90 MB activations
# are fresh pages every time; the elementwise operations ran 7x slower), and 2,048 tokens was its best budget. A
# smaller model holds proportionally fewer activations per token, and its passes are bound by per-operator overhead:
# a 4.4M Llama (256 x 4) spent 40% less time in GRPO's update and reference pass with 8,192-token passes. The logits
# grow with the vocabulary instead: a pass holds no more of them than 2,048 tokens of a 32k vocabulary (256 MiB in
# float32), so that a small model with a large vocabulary (TinyStories' 64 x 8 with GPT-2's 50k) keeps 2,048.
CPU_PASS_TOKENS, CPU_PASS_SCALE, CPU_PASS_TOKENS_MAX, CPU_PASS_VOCAB = 2048, 512 * 8, 16384, 32768
GPU_PASS_TOKENS = 16384


def rows_per_pass(micro_batch_size: int, micro_batch_tokens: int, width: int, device: torch.device,
                  cpu_tokens: int = 0) -> int:
    """Sequences per forward pass: micro_batch_size when set, else as many rows of `width` padded tokens as fit in
    micro_batch_tokens; by default 16384 on GPU and `cpu_tokens` on CPU (0: CPU_PASS_TOKENS; `cpu_pass_tokens` sizes
    it to a model). At least one."""
    if micro_batch_size:
        return micro_batch_size
    default = GPU_PASS_TOKENS if torch.device(device).type == "cuda" else cpu_tokens or CPU_PASS_TOKENS
    return max(1, (micro_batch_tokens or default) // max(1, width))


def cpu_pass_tokens(hidden_x_layers: int, vocab: int) -> int:
    """Padded tokens per forward pass on CPU for a model of this hidden size x layers and vocabulary: 2048 from
    512 x 8 up (or when unknown, 0), proportionally more for smaller models, up to 16384, and no more than 2048 x
    32768 / vocab (but at least 2048)."""
    if hidden_x_layers <= 0:
        return CPU_PASS_TOKENS
    tokens = min(CPU_PASS_TOKENS_MAX, max(CPU_PASS_TOKENS, CPU_PASS_TOKENS * CPU_PASS_SCALE // hidden_x_layers))
    if vocab > 0:
        tokens = min(tokens, max(CPU_PASS_TOKENS, CPU_PASS_TOKENS * CPU_PASS_VOCAB // vocab))
    return tokens


def model_shape(model: torch.nn.Module) -> tuple[int, int]:
    """(hidden size x layers, vocabulary size) of a transformers model (through DDP and peft); 0 where its config
    does not say."""
    config = getattr(transformers_model(model), "config", None)
    if config is None:
        return 0, 0
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden, layers, vocab = (getattr(text, name, 0) for name in ("hidden_size", "num_hidden_layers", "vocab_size"))
    ints = all(isinstance(v, int) for v in (hidden, layers, vocab))
    return (hidden * layers, vocab) if ints else (0, 0)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass


def total_steps(config: CommonConfig, n_train: int) -> int:
    return config.max_steps or max(1, math.ceil(config.epochs * n_train / config.batch_size))


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; no weight decay on biases and norm weights (1-D tensors)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)


def make_scheduler(optimizer, schedule: str, warmup_steps: int, total: int):
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total)


def with_lora(model, config: CommonConfig, task: str):
    """The model with a LoRA adapter when lora_r > 0 (task CAUSAL_LM or SEQ_CLS), else unchanged."""
    if config.lora_r <= 0:
        return model
    from rlhfkit.models import add_lora

    return add_lora(model, r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                    target_modules=config.lora_target_modules, task=task)


def save_final(model, tokenizer, folder: Path, world: World, fresh_model, *, merge_lora: bool,
               reward_stats: dict | None = None, when: str = "at the end of training") -> Path:
    """Write the trained model once, in Hugging Face format, from rank 0 (all ranks call this).

    Under FSDP the ranks first gather the full weights; rank 0 loads them into `fresh_model()`, an unsharded model of
    the same shape, and writes that. A non-finite model is never written."""
    check_finite({folder.name: model}, when, world)
    if world.strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if world.main:
            model = fresh_model()
            model.load_state_dict(full)
    return write_model(unwrap(model), tokenizer, folder, world, merge_lora=merge_lora, reward_stats=reward_stats)


def write_model(model, tokenizer, folder: Path, world: World, **kwargs) -> Path:
    """Rank 0 writes `model` (save_model's keyword arguments) into a temporary folder renamed to `folder` when
    complete, so a failed write (a full disk) leaves no half model; every rank raises the same TrainingError then."""
    from rlhfkit.models import save_model
    from rlhfkit.training.checkpoint import writing

    tmp = folder.parent / f".tmp-{folder.name}"
    bad = None
    with writing(f"the final model to {folder}", folder.parent, tmp, world):
        if world.main:
            shutil.rmtree(tmp, ignore_errors=True)
            save_model(model, tokenizer, tmp, **kwargs)
            bad = nonfinite_tensor_in(tmp)
            if bad is None:
                shutil.rmtree(folder, ignore_errors=True)
                os.replace(tmp, folder)
            else:
                shutil.rmtree(tmp)
    if world.sum([float(bad is not None)])[0]:
        raise TrainingError(f"{folder.name}: tensor {bad or '(named on rank 0)'} of the model as written is not "
                            "finite (a merged LoRA adapter can overflow where its factors did not); nothing was saved")
    return folder


def nonfinite_tensor_in(folder: Path) -> str | None:
    """The first tensor of a saved model's safetensors files that holds NaN or inf, else None: what is checked is what
    was written, after any LoRA merge."""
    from safetensors import safe_open

    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                tensor = f.get_tensor(key)
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    return key
    return None
