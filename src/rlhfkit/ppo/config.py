"""`rlhfkit ppo` options: the critic, reward shaping, the adaptive KL controller and GAE, on top of the options every
on-policy algorithm shares (rl/config.py). Defaults name their source."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from rlhfkit.config import option, require
from rlhfkit.rl.config import RLConfig
from rlhfkit.training.common import require_adamw_scale


@dataclass
class PPOConfig(RLConfig):
    critic: str = option("", "value model to start from; default: the reward model (with --reward-fn, or a reward "
                             "model of another tokenizer: the actor with a new value head)", group="models")
    # reward
    reward_norm: str = option("auto", "score normalisation before clipping: rm-stats = the mean/std `rlhfkit rm` "
                                      "stored with the model, running = of all scores so far, auto = rm-stats when "
                                      "stored, else none", group="reward",
                              choices=("auto", "none", "rm-stats", "running"))
    reward_clip: float = option(5.0, "clip the (normalised) score to +-this; 0 = off (5: DeepSpeed-Chat)",
                                group="reward")
    kl_coef: float = option(0.05, "beta, the KL penalty's weight in the reward (start value when adaptive; 0.05: "
                                  "TRL)", group="reward")
    kl_target: float = option(0.0, "adapt beta towards this per-sequence KL (Ziegler et al. 2019: 6); 0 = fixed",
                              group="reward")
    kl_horizon: int = option(10000, "horizon of the adaptive controller, in sequences (Ziegler et al. 2019)",
                             group="reward")
    # ppo
    critic_lr: float = option(5e-6, "critic learning rate (the actor's is --lr; 5e-6: DeepSpeed-Chat)",
                              group="ppo")
    gamma: float = option(1.0, "discount (1: DeepSpeed-Chat, TRL)", group="ppo")
    lam: float = option(0.95, "GAE lambda (0.95: DeepSpeed-Chat, TRL)", group="ppo")
    cliprange_value: float = option(0.2, "value clip around the rollout's values (0.2: DeepSpeed-Chat, TRL)",
                                    group="ppo")
    vf_coef: float = option(1.0, "value-loss weight (the critic has its own optimizer: this only scales its "
                                 "gradient before clipping)", group="ppo")
    whiten_advantages: bool = option(True, "normalise advantages to mean 0, std 1 over valid tokens", group="ppo")
    critic_warmup_steps: int = option(0, "first iterations that train only the critic", group="ppo")
    ema_decay: float = option(0.0, "keep an EMA of the actor with this decay, saved as final_ema "
                                   "(0.992: DeepSpeed-Chat); 0 = off", group="ppo")

    extra_models: ClassVar[tuple[str, ...]] = ("critic",)

    def check(self) -> None:
        super().check()
        require(self.reward_norm != "rm-stats" or (self.reward and not self.reward_fn),
                "reward_norm: rm-stats needs a reward model as the only reward source")
        require(self.reward_clip >= 0, f"reward_clip: must be >= 0, got {self.reward_clip}")
        require(self.kl_target >= 0, f"kl_target: must be >= 0, got {self.kl_target}")
        require(self.kl_horizon >= 1, f"kl_horizon: must be >= 1, got {self.kl_horizon}")
        require(self.critic_lr > 0, f"critic_lr: must be > 0, got {self.critic_lr}")
        require_adamw_scale(self.critic_lr, self.weight_decay, "critic_lr")
        require(0 <= self.gamma <= 1, f"gamma: must be in [0, 1], got {self.gamma}")
        require(0 <= self.lam <= 1, f"lam: must be in [0, 1], got {self.lam}")
        require(self.cliprange_value > 0, f"cliprange_value: must be > 0, got {self.cliprange_value}")
        require(self.vf_coef > 0, f"vf_coef: must be > 0, got {self.vf_coef}")
        require(self.critic_warmup_steps >= 0, f"critic_warmup_steps: must be >= 0, got {self.critic_warmup_steps}")
        require(0 <= self.ema_decay < 1, f"ema_decay: must be in [0, 1), got {self.ema_decay}")
