"""The options every on-policy algorithm shares (`rlhfkit ppo`, `rlhfkit grpo`): the models, prompts and PTX data,
generation, the reward sources, the KL term and the clipped policy update. Each algorithm's config adds its own and
may re-state a default with its own source. The fields shared with SFT and RM (LoRA, dtype, optimizer, checkpoints)
are in training/common.py, with `max_steps`, `batch_size` and `save_every` counted in iterations."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from rlhfkit.config import option, require
from rlhfkit.rl.core import KL_ESTIMATORS, LOSS_AGGREGATIONS
from rlhfkit.training.common import CommonConfig, check_data_specs, check_model_path


@dataclass
class RLConfig(CommonConfig):
    # the models
    actor: str = option("", "policy to train, usually the SFT model (folder or hub id)", group="models")
    reward: str = option("", "reward model (a one-label sequence classifier, e.g. `rlhfkit rm`'s output); any "
                             "tokenizer: a different one than the actor's is served by re-tokenizing the text",
                         group="models")
    reward_fn: list[str] = option([], "Python reward functions `module:function` or `path/file.py:function`, each "
                                      "called as fn(prompts, responses, **prompt_columns) and returning one float "
                                      "per response; with several (or with --reward too) the reward is their "
                                      "weighted sum; repeat the flag or give several", group="models",
                                  repeat=True)
    reward_weights: list[float] = option([], "one weight per reward source, the reward model first if there is "
                                             "one, then the functions in order; default: 1 each", group="models")
    monitor_fn: str = option("", "a function of the same form as --reward-fn whose mean is logged as `monitor` each "
                                 "iteration but never trained on (e.g. a gold or verifiable metric beside a reward "
                                 "model)", group="models")
    ref: str = option("", "frozen reference policy for the KL term; default: the actor's starting weights (with "
                          "LoRA, the actor with its adapter disabled: no second copy)", group="models")
    offload_frozen: bool = option(False, "on GPU, keep the reference and reward models on the CPU while the trained "
                                         "models train (ColossalChat's offload)", group="models")
    shard_frozen: bool = option(False, "with --strategy fsdp, shard the reference and reward models over the ranks "
                                       "too (less memory, a collective in each of their forward passes); default: "
                                       "a whole copy on every rank", group="distributed")
    # data
    prompts: list[str] = option([], "prompt data (files, folders or hub names, PATH:WEIGHT); extra columns are "
                                    "passed to --reward-fn", group="data")
    ptx_data: list[str] = option([], "pretraining text ({\"text\": ...} rows) whose LM loss is mixed into the actor "
                                     "update (InstructGPT's PPO-ptx)", group="data")
    max_prompt_len: int = option(256, "prompts longer than this lose tokens from the left (after BOS)",
                                 group="data")
    # generation
    max_new_tokens: int = option(128, "longest response in tokens", group="generation")
    temperature: float = option(1.0, "sampling temperature, also applied to the log-probs the update trains on",
                                group="generation")
    top_p: float = option(1.0, "nucleus sampling: keep the smallest set of tokens with this much probability",
                          group="generation")
    top_k: int = option(0, "sample among the k most likely tokens (0 = all)", group="generation")
    stop_strings: list[str] = option([], "text that ends a response like EOS does (kept, the rest masked)",
                                     group="generation")
    # reward
    missing_eos_penalty: float = option(0.0, "subtracted from the score of a response that hit max_new_tokens "
                                             "without stopping", group="reward")
    missing_eos_score: float | None = option(None, "instead, the score such a response gets (after normalisation)",
                                             group="reward")
    kl_estimator: str = option("k1", "per-token KL estimate, with r = log pi - log pi_ref: k1 = r, k2 = r^2/2, "
                                     "k3 = exp(-r) - 1 + r, i.e. ratio - 1 - log ratio for ratio = pi_ref/pi "
                                     "(Schulman 2020)", group="reward", choices=KL_ESTIMATORS)
    kl_coef: float = option(0.05, "beta, the KL penalty's weight (0.05: TRL)", group="reward")
    # the policy update
    ppo_epochs: int = option(1, "passes over each batch of experience (1: DeepSpeed-Chat, OpenRLHF)", group="update")
    mini_batch_size: int = option(0, "sequences per optimizer step within an iteration; 0 = the whole batch",
                                  group="update")
    cliprange: float = option(0.2, "policy ratio clip (0.2: Schulman et al. 2017, DeepSpeed-Chat, TRL)",
                              group="update")
    dual_clip: float = option(0.0, "dual-clip bound c > 1 for negative advantages (Ye et al. 2020: 3); 0 = off",
                              group="update")
    entropy_coef: float = option(0.0, "entropy bonus weight (0: DeepSpeed-Chat, TRL)", group="update")
    loss_agg: str = option("token-mean", "loss reduction: token-mean over all valid tokens (DAPO), "
                                         "seq-mean-token-mean (mean per sequence, then over sequences; the original "
                                         "GRPO), or seq-mean-token-sum-norm (each "
                                         "sequence's sum / max_new_tokens, then the mean; Dr.GRPO)", group="update",
                           choices=LOSS_AGGREGATIONS)
    ptx_coef: float = option(0.05, "weight of the PTX LM loss in the actor loss, when --ptx-data is given "
                                   "(0.05: OpenRLHF)", group="update")
    ptx_batch_size: int = option(0, "PTX rows per actor optimizer step; 0 = mini_batch_size", group="update")
    # reporting
    sample_every: int = option(10, "every N iterations, log a table of prompts, responses and scores and append "
                                    "it to samples.jsonl (0 = never)", group="training")
    num_samples: int = option(3, "rows in that table", group="training")
    # shared fields, re-documented for RL
    lr: float = option(1e-6, "actor learning rate (AdamW; 1e-6 is in the range DeepSpeed-Chat and OpenRLHF use)",
                       group="training")
    batch_size: int = option(8, "prompts per iteration", group="training")
    micro_batch_size: int = option(0, "sequences per forward pass when scoring and updating; 0 = as many as "
                                      "micro_batch_tokens allows", group="training")
    micro_batch_tokens: int = option(0, "with micro_batch_size 0: padded tokens per forward pass (0 = 16384 on GPU; "
                                        "on CPU 2048 for a policy of hidden size x layers >= 512 x 8, where larger "
                                        "passes are slower per token, more for smaller ones, up to 16384, with no "
                                        "more logits than 2048 tokens of a 32k vocabulary)", group="training")
    max_steps: int = option(0, "iterations; 0 = as many as `epochs` over the prompts needs", group="training")
    max_len: int = option(512, "longest PTX sequence in tokens (longer rows are cut at the end)", group="model")
    warmup_steps: int = option(0, "optimizer steps of linear learning-rate warmup", group="training")
    save_every: int = option(20, "write a checkpoint every N iterations (0 = never)", group="training")
    snapshot_every: int = option(0, "also write the actor in Hugging Face format to OUTPUT/snapshots/step-N every N "
                                    "iterations (0 = never), to evaluate the policy along training", group="training")

    def check(self) -> None:
        require(bool(self.actor), "actor: required (the SFT model to train)")
        require(bool(self.reward) or bool(self.reward_fn), "reward: give a reward model (--reward), one or more "
                                                           "Python functions (--reward-fn), or both")
        require(bool(self.prompts), "prompts: required (one or more prompt files)")
        super().check()
        sources = int(bool(self.reward)) + len(self.reward_fn)
        require(not self.reward_weights or len(self.reward_weights) == sources,
                f"reward_weights: {len(self.reward_weights)} weights for {sources} reward sources "
                f"({'the reward model and ' if self.reward else ''}{len(self.reward_fn)} functions)")
        require(not self.shard_frozen or self.strategy == "fsdp", "shard_frozen: needs --strategy fsdp")
        require(not (self.shard_frozen and self.offload_frozen),
                "shard_frozen: sharded frozen models stay in place; drop --offload-frozen")
        for field in ("actor", "reward", "ref") + self.extra_models:
            if getattr(self, field):
                check_model_path(getattr(self, field), field)
        check_data_specs(self.prompts, "prompts")
        check_data_specs(self.ptx_data, "ptx_data")
        require(self.snapshot_every >= 0, f"snapshot_every: must be >= 0, got {self.snapshot_every}")
        require(self.max_prompt_len >= 1, f"max_prompt_len: must be >= 1, got {self.max_prompt_len}")
        require(self.max_new_tokens >= 1, f"max_new_tokens: must be >= 1, got {self.max_new_tokens}")
        require(self.temperature > 0, f"temperature: must be > 0, got {self.temperature}")
        require(0 < self.top_p <= 1, f"top_p: must be in (0, 1], got {self.top_p}")
        require(self.top_k >= 0, f"top_k: must be >= 0, got {self.top_k}")
        require(self.kl_coef >= 0, f"kl_coef: must be >= 0, got {self.kl_coef}")
        require(self.ppo_epochs >= 1, f"ppo_epochs: must be >= 1, got {self.ppo_epochs}")
        require(self.mini_batch_size >= 0, f"mini_batch_size: must be >= 0, got {self.mini_batch_size}")
        require(self.rows % self.mini_batch == 0,
                f"mini_batch_size: {self.mini_batch} must divide the {self.rows} sequences of an iteration")
        require(self.mini_batch % (self.micro_batch_size or self.mini_batch) == 0,
                f"micro_batch_size: {self.micro_batch_size} must divide mini_batch_size {self.mini_batch}")
        require(self.micro_batch_tokens >= 0, f"micro_batch_tokens: must be >= 0, got {self.micro_batch_tokens}")
        require(self.cliprange > 0, f"cliprange: must be > 0, got {self.cliprange}")
        require(self.dual_clip == 0 or self.dual_clip > 1, f"dual_clip: must be 0 (off) or > 1, got {self.dual_clip}")
        require(self.entropy_coef >= 0, f"entropy_coef: must be >= 0, got {self.entropy_coef}")
        require(self.ptx_coef >= 0, f"ptx_coef: must be >= 0, got {self.ptx_coef}")
        require(self.ptx_batch_size >= 0, f"ptx_batch_size: must be >= 0, got {self.ptx_batch_size}")
        require(self.sample_every >= 0, f"sample_every: must be >= 0, got {self.sample_every}")
        require(self.num_samples >= 0, f"num_samples: must be >= 0, got {self.num_samples}")
        self._check_lengths()

    def _check_lengths(self) -> None:
        """Every model sees a prompt and its response; the actor also PTX rows of max_len."""
        from rlhfkit.models import check_positions

        tokens = self.max_prompt_len + self.max_new_tokens
        what = f"max_prompt_len + max_new_tokens ({self.max_prompt_len} + {self.max_new_tokens})"
        needs = [(getattr(self, f), f, tokens, what) for f in ("actor", "ref", "reward") + self.extra_models
                 if getattr(self, f)]
        if self.use_ptx:
            needs.append((self.actor, "actor", self.max_len, "max_len (PTX rows)"))
        check_positions(needs)

    # an algorithm's own model fields (PPO: "critic"), checked like the rest
    extra_models: ClassVar[tuple[str, ...]] = ()

    @property
    def rows(self) -> int:
        """Sequences per iteration: one per prompt (an algorithm that samples several per prompt says so)."""
        return self.batch_size

    @property
    def mini_batch(self) -> int:
        return self.mini_batch_size or self.rows

    @property
    def use_ptx(self) -> bool:
        return bool(self.ptx_data) and self.ptx_coef > 0
