"""Load tokenizers and models (any Hugging Face causal LM, local or hub), add LoRA, save in Hugging Face format.

Policies are `AutoModelForCausalLM`; reward models and critics are `AutoModelForSequenceClassification` with one label,
so any Hugging Face reward model loads as is and every model rlhfkit writes loads back with plain transformers.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import math
import re
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from rlhfkit.config import ConfigError

PAD_TOKEN = "<|pad|>"
REWARD_STATS_FILE = "reward_stats.json"
WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin")


# ------------------------------------------------------------------------------- checks before anything loads
def model_source_problem(path: str) -> str | None:
    """Why `path` cannot be loaded as a model, in one line, or None: it must be a local model folder (config.json
    and weights, or a LoRA adapter folder) or a hub id that the hub, or its cache here, can provide."""
    local = Path(path)
    if local.is_file():
        return f"{path} is a file; expected a model folder (config.json and weights) or a hub id"
    if local.is_dir():
        return _folder_problem(local)
    if not path or path.count("/") > 1 or path.startswith((".", "/")):  # cannot be a hub id (owner/name or name)
        return f"{path} does not exist"
    return _hub_problem(path)


def _folder_problem(folder: Path) -> str | None:
    if (folder / "adapter_config.json").is_file():
        if not any(folder.glob("adapter_model.*")):
            return f"{folder} has adapter_config.json but no adapter weights (adapter_model.safetensors)"
        problem = model_source_problem(adapter_base(str(folder)))
        return None if problem is None else f"{folder} is a LoRA adapter whose base model cannot load: {problem}"
    if not (folder / "config.json").is_file():
        names = sorted(p.name for p in folder.iterdir())
        held = "it is empty" if not names else "it holds " + ", ".join(names[:5]) + (", ..." if names[5:] else "")
        return f"{folder} is not a model folder: it has no config.json ({held}){_run_hint(folder)}"
    if not any(next(folder.glob(pattern), None) for pattern in WEIGHT_FILES):
        return f"{folder} has config.json but no weights (model.safetensors or pytorch_model.bin)"
    return None


def _run_hint(folder: Path) -> str:
    """Where the model is when `folder` is one of rlhfkit's run or checkpoint folders."""
    if (folder / "final" / "config.json").is_file():
        return f"; did you mean {folder / 'final'}?"
    if (folder / "state.json").is_file():
        return "; a training checkpoint continues with --resume, the trained model is in the run's final/"
    return ""


def _hub_problem(repo_id: str) -> str | None:
    """None when the hub (or its cache here) has `repo_id`'s config.json. One request without retries: a download
    would retry an unreachable hub for most of a minute before failing."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, OfflineModeIsEnabled, RepositoryNotFoundError

    try:
        if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
            return None
        get_hf_file_metadata(hf_hub_url(repo_id, "config.json"), timeout=10)
        return None
    except GatedRepoError:
        reason = "it is gated: accept its terms on the hub and log in with `hf auth login`"
    except RepositoryNotFoundError:
        reason = "no such model, or a private one: check the name, or log in with `hf auth login`"
    except EntryNotFoundError:
        reason = "it has no config.json, so it is not a transformers model"
    except OfflineModeIsEnabled:
        reason = "offline mode (HF_HUB_OFFLINE) is on and it is not in the local cache"
    except Exception as exc:  # no network, a timeout, a bad name: whatever it is, say it in one line
        reason = f"{type(exc).__name__}: {_first_line(exc)}"
    return f"{repo_id} is not a local folder, and the hub could not provide it ({reason})"


# A kernel on the hub, `owner/repo[@revision][:function]` (transformers' `is_kernel` pattern).
HUB_KERNEL = re.compile(r"^[^/:]+/[^/:]+(?:@[^/:]+)?(?::[^/:]+)?$")


def attn_implementation_problem(name: str) -> str | None:
    """None for an attention implementation transformers knows (its own registry, so a newer kernel is accepted
    too) or a hub kernel; whether the model and this machine support it shows when the model loads."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    known = ["eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()]
    if name in known or name.removeprefix("paged|") in known or HUB_KERNEL.match(name):
        return None
    return f"expected one of {', '.join(known)} or a hub kernel such as kernels-community/flash-attn2, got {name!r}"


# Architectures whose positions are a learned table: a longer sequence indexes past its end and the run dies mid-way
# (IndexError). Rotary and ALiBi models run past the length they were trained on, only less well.
LEARNED_POSITIONS = ("gpt2", "gpt_neo", "gpt_bigcode", "opt", "biogpt")


def check_positions(needs: list[tuple[str, str, int, str]]) -> None:
    """For each (path, field, tokens, what): refuse sequences of `tokens` (what `what` adds up to) beyond a learned
    position table of the model at `path`, then warn where they exceed the positions a rotary model was trained with.
    Reads only the models' configs."""
    warnings = []
    for path, field, tokens, what in needs:
        config = _model_config(path, field)
        limit = getattr(config, "max_position_embeddings", None)
        if not isinstance(limit, int) or tokens <= limit:
            continue
        if config.model_type in LEARNED_POSITIONS:
            raise ConfigError(f"{what}: {tokens} tokens exceed the {limit} positions of {field} {path} "
                              f"({config.model_type} has a learned table of {limit} positions, and a longer sequence "
                              f"crashes); use at most {limit}")
        warnings.append(f"warning: {what}: {tokens} tokens exceed the {limit} positions {field} {path} was trained "
                        "with (max_position_embeddings); it runs, but the model has not learned such lengths")
    for warning in warnings:
        logging.getLogger("rlhfkit").warning(warning)


def _model_config(path: str, field: str):
    """The model's transformers config (a LoRA adapter folder's base model's); a ConfigError when unreadable."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(adapter_base(path) or path)
    except (OSError, ValueError, KeyError) as exc:  # bad JSON, an unknown model_type
        raise ConfigError(f"{field}: cannot read the config of {path} ({_first_line(exc)})") from exc


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0].strip() if lines else type(exc).__name__


# ---------------------------------------------------------------------------------------------------- loading
def load_tokenizer(path: str):
    """The model's tokenizer with a pad token distinct from EOS (one is added when missing or shared)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:  # a folder without tokenizer files, or files transformers cannot read
        if Path(path).is_dir() and not any(_is_tokenizer_file(p.name) for p in Path(path).iterdir()):
            raise ConfigError(f"{path}: no tokenizer files (tokenizer.json, tokenizer_config.json) beside the "
                              "model; copy them from the model it was made from") from exc
        raise ConfigError(f"{path}: cannot load its tokenizer ({_first_line(exc)})") from exc
    if tokenizer.eos_token is None:
        raise ConfigError(f"{path}: the tokenizer has no EOS token; every response must end with one")
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    tokenizer.padding_side = "right"
    return tokenizer


def _is_tokenizer_file(name: str) -> bool:
    return name.startswith(("tokenizer", "vocab", "spiece", "merges")) or name.endswith((".model", ".tiktoken"))


def _fit_vocab(model, tokenizer, seed: int) -> None:
    """Grow the embeddings for added tokens; the new rows are random, so draw them from `seed` (resume rebuilds them)."""
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id


def _finish(model, gradient_checkpointing: bool):
    if gradient_checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name warns there
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.config.use_cache = False
    return model


def checkpoints_activations(model) -> bool:
    """Whether `model` recomputes its layers' activations in the backward pass (gradient checkpointing)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # the new name first: the old warns
        value = getattr(model, name, None)
        if value is not None:
            return bool(value)
    return False


@functools.lru_cache(maxsize=1)
def sdpa_float32_on_cpu_bf16_backward() -> None:
    """Make transformers' `sdpa` attention compute in float32 where gradients will flow through it in bf16 on a CPU.

    torch's CPU flash-attention backward is slow in bf16: 8-10x its forward, 3x float32's backward with the casts
    (a 4-layer Llama of hidden 128: 45% of a bf16 training step; hidden 512: 16% of GRPO's update; README "bf16 on
    CPUs"). Forward-only passes (sampling, reference and reward scoring) and GPUs keep bf16. Installed once, for
    every model of the process that uses `sdpa`; the result differs only in float32 accumulation inside attention."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        # Under autocast, q and k come out of the rotary embedding in float32 and autocast casts them to bf16 here.
        bf16 = (torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
                or torch.bfloat16 in (query.dtype, key.dtype, value.dtype))
        if query.device.type == "cpu" and bf16 and (query.requires_grad or key.requires_grad or value.requires_grad):
            if attention_mask is not None and attention_mask.is_floating_point():
                attention_mask = attention_mask.float()
            with torch.autocast("cpu", enabled=False):  # autocast would cast the inputs back to bf16
                out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(),
                                                      attention_mask, *args, **kwargs)
            return out.to(torch.bfloat16), weights
        return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)

    AttentionInterface.register("sdpa", attention)


def _from_pretrained(auto_class, path: str, attn_implementation: str, **kwargs):
    """`auto_class.from_pretrained`, with a kernel this model or machine cannot run as a one-line ConfigError."""
    sdpa_float32_on_cpu_bf16_backward()
    try:
        return auto_class.from_pretrained(path, dtype=torch.float32, attn_implementation=attn_implementation, **kwargs)
    except (ImportError, ValueError) as exc:
        # transformers says "attn_implementation" when the model lacks the kernel; an ImportError with a kernel
        # asked for is its package missing (flash_attn, kernels)
        kernel_missing = isinstance(exc, ImportError) and attn_implementation not in ("sdpa", "eager")
        if kernel_missing or "attn_implementation" in str(exc):
            raise ConfigError(f"attn_implementation: {attn_implementation} cannot be used with {path} here "
                              f"({_first_line(exc)})") from exc
        raise


def load_causal_lm(path: str, tokenizer, *, attn_implementation: str = "sdpa", gradient_checkpointing: bool = False,
                   seed: int = 0):
    """A causal LM in float32 (bf16 runs as autocast on top of fp32 master weights)."""
    base = adapter_base(path)
    model = _from_pretrained(AutoModelForCausalLM, base or path, attn_implementation)
    _fit_vocab(model, tokenizer, seed)
    if base:
        model = _load_adapter(model, path)
    return _finish(model, gradient_checkpointing)


def load_sequence_classifier(path: str, tokenizer, *, attn_implementation: str = "sdpa",
                             gradient_checkpointing: bool = False, seed: int = 0):
    """A one-label sequence classifier. From a causal LM (an SFT model) the score head is new: std 1/sqrt(hidden+1)."""
    base = adapter_base(path)
    model, info = _from_pretrained(AutoModelForSequenceClassification, base or path, attn_implementation,
                                  num_labels=1, output_loading_info=True)
    head = score_head(model)
    if any(key.split(".")[0] == head_name(model) for key in info["missing_keys"]):
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            torch.nn.init.normal_(head.weight, std=1.0 / math.sqrt(model.config.hidden_size + 1))
            if head.bias is not None:
                torch.nn.init.zeros_(head.bias)
    _fit_vocab(model, tokenizer, seed)
    if base:  # the adapter's saved score head replaces the one initialised above
        model = _load_adapter(model, path)
    return _finish(model, gradient_checkpointing)


def adapter_base(path: str) -> str | None:
    """The base model of an adapter-only folder (`lora_merge: false`), or None for a full model."""
    file = Path(path) / "adapter_config.json"
    return json.loads(file.read_text())["base_model_name_or_path"] if file.is_file() else None


def _load_adapter(model, path: str):
    """The base `model`, its vocabulary already grown to the tokenizer's as in training, with the adapter at `path`.

    (Loading the folder directly with transformers fails when training added a pad token: the adapter holds the
    grown embeddings, the base model's config the old vocabulary size.)"""
    from peft import PeftModel

    # Merged, so a loaded model is always a plain one: the next stage can train it fully or add a fresh adapter.
    merged = PeftModel.from_pretrained(model, path).merge_and_unload()
    merged.requires_grad_(True)  # peft froze the base weights; a loaded model starts fully trainable like any other
    return merged


def head_name(model) -> str:
    """The attribute that holds a sequence classifier's head (`score` for Llama, GPT-2, OPT and most others)."""
    for name in ("score", "classifier", "v_head"):
        if isinstance(getattr(model, name, None), torch.nn.Module):
            return name
    raise ValueError(f"{type(model).__name__}: cannot find the score head")


def score_head(model) -> torch.nn.Linear:
    return getattr(model, head_name(model))


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions 0, 1, ... over the attended tokens (what generate uses), so padding does not shift them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def transformers_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a DDP and a peft wrapper (either may be absent): what its forward accepts and
    its config say what the model can do."""
    inner = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


def takes_pair_rows(model) -> bool:
    """Whether `model` (possibly wrapped by DDP or peft) computes rows that hold a pair's two sequences
    (`collate_pair_rows`) as it computes the sequences apart: its attention is `sdpa`, which applies a (B, 1, T, T)
    boolean mask as given (flash attention kernels take none, and eager attention adds the mask to the scores), its
    forward takes position_ids, and no layer has a sliding window (which such a mask would not apply)."""
    inner = transformers_model(model)
    config = getattr(inner, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    sliding = (getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
               or "sliding_attention" in (getattr(config, "layer_types", None) or ()))
    return not sliding and "position_ids" in inspect.signature(inner.forward).parameters


def token_values(classifier, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) a one-label sequence classifier's head applied at every position: per-token values for a critic; a
    reward model's score is the value at the last attended token (where Hugging Face's classifiers read it)."""
    inner = classifier.base_model.model if is_peft(classifier) else classifier
    backbone = getattr(inner, inner.base_model_prefix)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                      use_cache=False).last_hidden_state
    return score_head(inner)(hidden).squeeze(-1).float()


class TokenValues(torch.nn.Module):
    """A sequence classifier as a module whose forward returns `token_values`: PPO's critic and reward model.

    The classifier's own forward keeps only the last token's value; DDP and FSDP need the forward they wrap to be
    the one that runs, so the per-token read-out is a module of its own rather than a call into the classifier's
    backbone."""

    def __init__(self, classifier):
        super().__init__()
        self.classifier = classifier

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return token_values(self.classifier, input_ids, attention_mask)


def add_lora(model, *, r: int, alpha: float, dropout: float, target_modules: list[str], task: str):
    """Wrap with a peft LoRA adapter; task "CAUSAL_LM" or "SEQ_CLS" (whose score head stays trainable and saved)."""
    from peft import LoraConfig, get_peft_model

    # `--lora-target-modules q_proj,v_proj` arrives as one item (flags split lists on spaces, YAML on commas)
    target_modules = [t.strip() for item in target_modules for t in item.split(",") if t.strip()]
    targets = "all-linear" if target_modules in (["all-linear"], ["all"]) else target_modules
    if targets != "all-linear":
        _check_lora_targets(model, targets)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type=task)
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as exc:  # what peft refuses that the check above did not foresee
        raise ConfigError(f"lora_target_modules: peft refused {', '.join(target_modules)}: "
                          f"{' '.join(str(exc).split())}") from exc
    if task == "SEQ_CLS":  # make sure the head trains even for architectures peft does not know
        for name, param in peft_model.named_parameters():
            if f".{head_name(model)}." in f".{name}" and "modules_to_save" in name:
                param.requires_grad_(True)
    return peft_model


def _check_lora_targets(model, targets: list[str]) -> None:
    """Every target must name (peft's rule: the full name or its last parts) at least one layer LoRA can adapt. peft
    only fails when no name matches, so a misspelt one among several would quietly adapt fewer layers than asked."""
    modules = dict(model.named_modules())
    layers = sorted({name.rsplit(".", 1)[-1] for name, m in modules.items() if _adaptable(m)})
    for target in targets:
        matched = [m for name, m in modules.items() if name == target or name.endswith(f".{target}")]
        if not matched:
            raise ConfigError(f"lora_target_modules: no module of this model is named {target!r}; its layers are "
                              f"{', '.join(layers)} (or all-linear)")
        if not any(_adaptable(m) for m in matched):
            raise ConfigError(f"lora_target_modules: {target!r} is a {type(matched[0]).__name__}, not a layer LoRA "
                              f"can adapt; this model's are {', '.join(layers)} (or all-linear)")


def _adaptable(module: torch.nn.Module) -> bool:
    """A layer type peft's LoRA wraps (quantised linear layers included, by their names)."""
    name = type(module).__name__
    return "Linear" in name or name in ("Embedding", "Conv1d", "Conv2d", "Conv3d", "Conv1D", "MultiheadAttention")


def is_peft(model) -> bool:
    return hasattr(model, "peft_config")


def trainable_state(model) -> dict[str, torch.Tensor]:
    """The parameters that training changes, by name: what a checkpoint must hold to resume."""
    return {name: p.detach().clone().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in state]
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} trainable tensors, e.g. {missing[0]}")
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor)


def save_model(model, tokenizer, out_dir: str | Path, *, merge_lora: bool = True, reward_stats: dict | None = None
               ) -> Path:
    """Write `out_dir` in Hugging Face format with the tokenizer; a LoRA model is merged or written as an adapter."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(model, TokenValues):
        model = model.classifier
    if is_peft(model) and merge_lora:
        # merge_and_unload changes the model in place; merge a copy so training objects stay valid.
        import copy

        model = copy.deepcopy(model).merge_and_unload()
    if reward_stats is not None:
        target = model.base_model.model if is_peft(model) else model
        target.config.rlhfkit_reward_mean = reward_stats["mean"]
        target.config.rlhfkit_reward_std = reward_stats["std"]
        (out_dir / REWARD_STATS_FILE).write_text(json.dumps(reward_stats, indent=2))
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def read_reward_stats(path: str | Path) -> dict | None:
    """The score mean/std that `rlhfkit rm` stored beside a reward model (None for other models)."""
    file = Path(path) / REWARD_STATS_FILE
    return json.loads(file.read_text()) if file.is_file() else None


def default_device() -> torch.device:
    """The GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(dtype: str, device: torch.device | str = "cpu"):
    """bf16 mixed precision when asked (fp32 master weights); a no-op context for float32."""
    device_type = torch.device(device).type
    if dtype == "bfloat16" and device_type == "cpu" and not cpu_bf16_instructions():
        _warn_emulated_bf16()
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")


DTYPES = ("auto", "float32", "bfloat16")
# Below this hidden size bf16 autocast loses on a CPU even with bf16 instructions: its casts and the elementwise work
# outweigh the faster matrix products (measured with the float32 attention backward above: 0.80x at hidden 32, 1.18x
# at 64, 1.48x at 128; see README "bf16 on CPUs").
CPU_BF16_MIN_HIDDEN = 64


def resolve_dtype(dtype: str, device: torch.device | str, model: str | int | None = None) -> str:
    """The compute dtype a run uses. `auto` is bfloat16 where the hardware multiplies bf16 matrices natively (CUDA
    devices that support it; CPUs with AVX512-BF16 or AMX, for models at least CPU_BF16_MIN_HIDDEN wide) and float32
    elsewhere (an AVX2-only CPU emulates bf16 about 27x slower than float32). `model`: its folder or its hidden size,
    when known. Says which and why, once."""
    if dtype != "auto":
        return dtype
    device = torch.device(device)
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported()
        why = f"{torch.cuda.get_device_name(device)} {'supports' if native else 'lacks'} bf16"
    else:
        found = cpu_bf16_instructions()
        hidden = model if isinstance(model, int) else hidden_size(model)
        native = bool(found) and (hidden is None or hidden >= CPU_BF16_MIN_HIDDEN)
        why = ("this CPU has no bf16 matrix instructions (avx512_bf16 / amx_bf16), so bf16 would be emulated"
               if not found else f"this CPU has {' and '.join(found)}" if native else
               f"this CPU has {' and '.join(found)}, but at hidden size {hidden} (< {CPU_BF16_MIN_HIDDEN}) bf16 "
               "autocast measured slower than float32")
    resolved = "bfloat16" if native else "float32"
    _log_once(f"dtype auto: {resolved} ({why})")
    return resolved


def hidden_size(path: str | None) -> int | None:
    """The hidden size in a local model folder's config.json (None for a hub id or a config without one)."""
    file = Path(path or "") / "config.json"
    if not path or not file.is_file():
        return None
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError):
        return None
    for key in ("hidden_size", "n_embd", "d_model"):
        if isinstance(config.get(key), int):
            return config[key]
    return None


@functools.lru_cache(maxsize=1)
def cpu_bf16_instructions() -> tuple[str, ...]:
    """Which native bf16 matrix instructions this CPU has, from /proc/cpuinfo (empty where it cannot be read: other
    systems get float32, the safe choice)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return ()
    return tuple(f for f in ("amx_bf16", "avx512_bf16") if f in flags)


@functools.lru_cache(maxsize=None)
def _log_once(message: str) -> None:
    logging.getLogger("rlhfkit").info(message)


@functools.lru_cache(maxsize=1)
def _warn_emulated_bf16() -> None:
    logging.getLogger("rlhfkit").warning(
        "warning: this CPU has no native bf16 matrix instructions (avx512_bf16 / amx_bf16): --dtype bfloat16 "
        "will be much slower than float32 here; --dtype auto picks float32")


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off in every form transformers uses (nn.Dropout modules and float rates read in forward), so a forward
    pass in training mode computes what eval mode does: PPO's ratio pi/pi_old is 1 at the first minibatch, and DPO's
    implicit reward is 0 at the start, only if the policy and the reference are the same function."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name, value in vars(module).items():
            if "dropout" in name and isinstance(value, float):
                setattr(module, name, 0.0)

