"""TRL 1.16's GRPOTrainer on the models and prompts that grpo_vs_trl.py built: one timed run, or (--check) one
batch's advantages and loss per loss type, as JSON.

Run by grpo_vs_trl.py with the Python of a throwaway venv that has trl==1.16.0 (never a dependency of rlhfkit), so it
imports nothing from rlhfkit. TRL's trainer runs unchanged (`use_vllm=False`); its methods are wrapped with timers to
split each iteration into phases:
- generate: `_generate` (tokenizing the prompts, sampling, decoding);
- score: `_calculate_rewards` (the reward function);
- forward: `_get_per_token_logps_and_entropies` without gradients (the reference's log-probs);
- train: the rest of the iteration (the policy's forward and backward, the optimizer step).
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch


def count_e(completions, **kwargs):
    """The benchmark's reward, the same as rlhfkit's side: letters e per response, / 4."""
    return [text.count("e") / 4 for text in completions]


def make_trainer(args, work: str, loss_type: str, callbacks=(), scale_rewards: str = "group", lr: float = 1e-6):
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(f"{work}/actor", padding_side="left")
    prompts = [json.loads(line)["prompt"] for line in open(f"{work}/prompts.jsonl")]
    dataset = datasets.Dataset.from_dict({"prompt": prompts[: args.prompts * args.iterations]})
    rows = args.prompts * args.generations
    config = GRPOConfig(
        output_dir=f"{work}/trl-grpo-out", report_to="none", save_strategy="no", logging_steps=1, seed=0,
        per_device_train_batch_size=rows, gradient_accumulation_steps=1, num_generations=args.generations,
        max_completion_length=args.new_tokens, beta=args.beta, num_iterations=1, temperature=1.0,
        learning_rate=lr, lr_scheduler_type="constant", max_steps=args.iterations, loss_type=loss_type,
        scale_rewards=scale_rewards, use_vllm=False, bf16=args.dtype == "bfloat16", use_cpu=True,
        gradient_checkpointing=False,  # TRL's GRPO turns it on by default; rlhfkit's is off: the same work both sides
        dataloader_num_workers=0, shuffle_dataset=False, log_completions=False)
    policy = AutoModelForCausalLM.from_pretrained(f"{work}/actor", dtype=torch.float32)
    return GRPOTrainer(model=policy, reward_funcs=count_e, args=config, train_dataset=dataset,
                       processing_class=tokenizer, callbacks=list(callbacks))


def timed_run(args) -> dict:
    from transformers import TrainerCallback

    phases = {"generate": 0.0, "score": 0.0, "forward": 0.0, "generated": 0}
    marks: list[float] = []
    per_iteration: list[dict] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            marks.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            now = time.perf_counter()
            total = now - marks[-1]
            marks.append(now)
            per_iteration.append({"time_iteration": total, "time_generate": phases["generate"],
                                  "time_score": phases["score"], "time_forward": phases["forward"],
                                  "time_train": total - phases["generate"] - phases["score"] - phases["forward"],
                                  "response_tokens": phases["generated"]})
            phases.update(generate=0.0, score=0.0, forward=0.0, generated=0)

    trainer = make_trainer(args, args.work, "dapo", [Clock()])

    def timer(fn, phase, only_without_grad=False):
        def wrapper(*a, **k):
            if only_without_grad and torch.is_grad_enabled():
                return fn(*a, **k)  # the training forward: counted in the train phase
            start = time.perf_counter()
            result = fn(*a, **k)
            phases[phase] += time.perf_counter() - start
            return result
        return wrapper

    trainer._generate = timer(trainer._generate, "generate")
    trainer._calculate_rewards = timer(trainer._calculate_rewards, "score")
    trainer._get_per_token_logps_and_entropies = timer(trainer._get_per_token_logps_and_entropies, "forward", True)
    real_loss = trainer._compute_loss

    def counting_loss(model, inputs):  # the sampled tokens: every valid completion token of the batch
        phases["generated"] += int(inputs["completion_mask"].sum())
        return real_loss(model, inputs)

    trainer._compute_loss = counting_loss
    trainer.train()
    return {"iterations": per_iteration}


def check(args) -> dict:
    """The second step's batch per loss type (after a first step at lr 1e-2, so the policy differs from the reference
    and the KL term is not zero): the rewards the function returned, the completion mask, the policy's and the
    reference's per-token log-probs, TRL's advantages and TRL's loss, for rlhfkit to recompute from the same
    inputs."""
    from trl.trainer import grpo_trainer

    # TRL shuffles the scored batch before splitting it into steps; one step holds the whole batch here, so the loss
    # does not depend on the order, and keeping it lets the rewards (recorded in generation order) line up with the
    # rows of the loss.
    grpo_trainer.shuffle_sequence_dict = lambda batch: batch
    found = {}
    for loss_type, scale in (("grpo", "group"), ("dr_grpo", "none"), ("dapo", "group")):
        torch.manual_seed(0)
        trainer = make_trainer(args, args.work, loss_type, scale_rewards=scale, lr=1e-2)
        seen: dict = {}
        real_rewards, real_logps, real_loss = (trainer._calculate_rewards, trainer._get_per_token_logps_and_entropies,
                                               trainer._compute_loss)

        def rewards(*a, **k):
            out = real_rewards(*a, **k)
            seen["rewards"] = out.sum(1).tolist()
            return out

        def logps(*a, **k):
            out = real_logps(*a, **k)
            if torch.is_grad_enabled():
                seen["logps"] = out[0].detach().tolist()
            return out

        def loss(model, inputs):
            out = real_loss(model, inputs)
            seen.update(loss=out.item(), advantages=inputs["advantages"].tolist(),
                        mask=inputs["completion_mask"].tolist(), ref_logps=inputs["ref_per_token_logps"].tolist())
            return out

        trainer._calculate_rewards, trainer._get_per_token_logps_and_entropies, trainer._compute_loss = (
            rewards, logps, loss)
        trainer.train()
        found[loss_type] = seen | {"scale_rewards": scale, "beta": args.beta,
                                   "max_completion_length": args.new_tokens, "generations": args.generations}
    return {"check": found}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", required=True, help="the folder grpo_vs_trl.py wrote: actor/, prompts")
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--iterations", type=int, required=True)
    parser.add_argument("--prompts", type=int, required=True)
    parser.add_argument("--generations", type=int, required=True)
    parser.add_argument("--new-tokens", type=int, required=True)
    parser.add_argument("--beta", type=float, required=True)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--check", action="store_true", help="the loss cross-check instead of the timed run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    import transformers
    import trl

    if args.check:
        args.iterations = 2
    result = check(args) if args.check else timed_run(args)
    result.update({"side": "trl", "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                                               "trl": trl.__version__},
                   "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                   "threads": torch.get_num_threads(), "dtype": args.dtype})
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
