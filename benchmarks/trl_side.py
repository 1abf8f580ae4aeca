"""TRL 1.12's PPO on the models and prompts that ppo_vs_trl.py built: one timed run, results as JSON.

Run by ppo_vs_trl.py with the Python of a throwaway venv that has trl==1.12.0 (never a dependency of rlhfkit), so it
imports nothing from rlhfkit. TRL's trainer runs unchanged; its module-level helpers are wrapped with timers to split
each iteration into phases:
- generate: `batch_generation` (sampling; TRL keeps the sampling logits as the old log-probs);
- forward: `forward` and `get_reward` without gradients (reference log-probs, values, scores);
- train: the rest of the iteration (PPO epochs, forward and backward of policy and value model, optimizer steps).
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", required=True, help="the folder ppo_vs_trl.py wrote: actor/, reward/, prompts")
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--iterations", type=int, required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--new-tokens", type=int, required=True)
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--minibatches", type=int, required=True)
    parser.add_argument("--micro", type=int, default=0, help="sequences per training forward pass (gradient "
                                                             "accumulation); 0 = the whole minibatch")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], required=True)
    parser.add_argument("--threads", type=int, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    import datasets
    import trl
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as trainer_module

    phases = {"generate": 0.0, "forward": 0.0, "generated": 0}
    marks: list[float] = []
    per_iteration: list[dict] = []

    def timed(fn, phase):
        def wrapper(*a, **k):
            if phase == "forward" and torch.is_grad_enabled():
                return fn(*a, **k)  # a training forward: counted in the train phase
            start = time.perf_counter()
            result = fn(*a, **k)
            phases[phase] += time.perf_counter() - start
            if phase == "generate":  # (query_responses, logits): the columns sampled, for every row
                phases["generated"] += result[0].shape[0] * (result[0].shape[1] - a[1].shape[1])
            return result
        return wrapper

    trainer_module.batch_generation = timed(trainer_module.batch_generation, "generate")
    trainer_module.forward = timed(trainer_module.forward, "forward")
    trainer_module.get_reward = timed(trainer_module.get_reward, "forward")

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            marks.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            now = time.perf_counter()
            total = now - marks[-1]
            marks.append(now)
            per_iteration.append({"time_iteration": total, "time_generate": phases["generate"],
                                  "time_forward": phases["forward"],
                                  "time_train": total - phases["generate"] - phases["forward"],
                                  "response_tokens": phases["generated"]})
            phases.update(generate=0.0, forward=0.0, generated=0)

    work = args.work
    # TRL's batch is per_device_train_batch_size x gradient_accumulation_steps, and per_device_train_batch_size is
    # also its training micro-batch; generation and the no-gradient passes go local_rollout_forward_batch_size rows
    # at a time (here the whole batch, as rlhfkit generates).
    micro = args.micro or args.batch // args.minibatches
    tokenizer = AutoTokenizer.from_pretrained(f"{work}/actor", padding_side="left")
    prompts = json.load(open(f"{work}/prompt_ids.json"))
    dataset = datasets.Dataset.from_dict({"input_ids": prompts[: args.batch * args.iterations]})
    policy = AutoModelForCausalLM.from_pretrained(f"{work}/actor", dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(f"{work}/actor", dtype=torch.float32)
    reward = AutoModelForSequenceClassification.from_pretrained(f"{work}/reward", num_labels=1, dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_pretrained(f"{work}/reward", num_labels=1, dtype=torch.float32)
    config = PPOConfig(
        output_dir=f"{work}/trl-out", report_to="none", save_strategy="no", logging_steps=1, seed=0,
        per_device_train_batch_size=micro, gradient_accumulation_steps=args.batch // micro,
        num_mini_batches=args.minibatches,
        local_rollout_forward_batch_size=args.batch, num_ppo_epochs=args.epochs, response_length=args.new_tokens,
        total_episodes=args.batch * args.iterations, stop_token="eos", temperature=1.0, kl_coef=0.05,
        learning_rate=1e-6, num_sample_generations=0, bf16=args.dtype == "bfloat16", use_cpu=True,
        dataloader_num_workers=0)
    trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=ref, reward_model=reward,
                         value_model=value, train_dataset=dataset, callbacks=[Clock()])
    trainer.train()
    import transformers

    result = {"side": "trl", "version": trl.__version__, "iterations": per_iteration,
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "trl": trl.__version__},
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "threads": torch.get_num_threads(), "dtype": args.dtype}
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
