"""`rlhfkit grpo` options: samples per prompt, the advantage estimator, the KL term, clip-higher and dynamic
sampling, on top of the options every on-policy algorithm shares (rl/config.py). Defaults name their source."""

from __future__ import annotations

from dataclasses import dataclass

from rlhfkit.config import option, require
from rlhfkit.grpo.core import ESTIMATORS
from rlhfkit.rl.config import RLConfig


@dataclass
class GRPOConfig(RLConfig):
    num_generations: int = option(8, "G, responses sampled per prompt; the G responses of a prompt form a group "
                                     "(8: TRL)", group="grpo")
    estimator: str = option("grpo", "advantage: grpo = (r - group mean) / (group std + eps) (Shao et al. 2024); "
                                    "dr-grpo = r - group mean (Liu et al. 2025); rloo = r - mean of the other G-1 "
                                    "rewards (Ahmadian et al. 2024); reinforce++ = per-token KL penalty in the "
                                    "reward, summed to go and whitened over the batch (Hu 2025); "
                                    "reinforce++-baseline = r - group mean, whitened over the batch",
                            group="grpo", choices=ESTIMATORS)
    kl_coef: float = option(0.04, "beta: the weight of the per-token KL to the reference, a loss term (in the "
                                  "reward for reinforce++); 0.04: Shao et al. 2024; 0 loads no reference "
                                  "(TRL's default, DAPO)", group="grpo")
    kl_estimator: str = option("k3", "per-token KL estimate, with r = log pi - log pi_ref: k1 = r, k2 = r^2/2, "
                                     "k3 = exp(-r) - 1 + r (k3: Shao et al. 2024, as a loss term)", group="grpo",
                               choices=("k1", "k2", "k3"))
    cliprange_high: float = option(0.0, "upper clip of the ratio, 1 + this (DAPO's clip-higher: 0.28); 0 = "
                                        "cliprange", group="grpo")
    dynamic_sampling: bool = option(False, "drop groups whose rewards are all equal from the update (they carry "
                                           "no gradient; DAPO's dynamic sampling, without re-sampling)",
                                    group="grpo")
    std_eps: float = option(1e-6, "eps in grpo's division by the group std", group="grpo")
    mini_batch_size: int = option(0, "sequences (prompts x G) per optimizer step within an iteration; 0 = the whole "
                                     "batch (one step per iteration, as TRL's default)", group="update")
    batch_size: int = option(8, "prompts per iteration; each is sampled num_generations times", group="training")

    def check(self) -> None:
        require(self.num_generations >= 2, f"num_generations: must be >= 2 (a group needs two samples to compare), "
                                           f"got {self.num_generations}")
        super().check()
        require(self.mini_batch % self.num_generations == 0, f"mini_batch_size: {self.mini_batch} must be a multiple "
                f"of num_generations {self.num_generations} (minibatches hold whole groups)")
        require(self.cliprange_high >= 0, f"cliprange_high: must be >= 0, got {self.cliprange_high}")
        require(self.std_eps > 0, f"std_eps: must be > 0, got {self.std_eps}")

    @property
    def rows(self) -> int:
        return self.batch_size * self.num_generations

    @property
    def kl_in_reward(self) -> bool:
        """reinforce++ puts the KL penalty in the per-token reward; every other estimator makes it a loss term."""
        return self.estimator == "reinforce++"
