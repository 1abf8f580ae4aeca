"""TRL 1.16's DPOTrainer on the model and pairs that dpo_vs_trl.py built: its per-step losses, rewards and final
weights (--check), or its step times, as JSON.

Run by dpo_vs_trl.py with the Python of a throwaway venv that has trl==1.16.0 (never a dependency of rlhfkit), so it
imports nothing from rlhfkit. The trainer runs unchanged but for what the comparison needs: the pairs are read in the
order rlhfkit's steps take them (the file is written in that order and TRL's sampler does not shuffle), each step's
loss is recorded at full precision (the Trainer's log rounds it to 4 decimals), plain AdamW (TRL's default is the fused
one) and no gradient checkpointing (TRL's default turns it on; rlhfkit's is off).
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", required=True, help="the folder dpo_vs_trl.py wrote: policy/, ordered.jsonl")
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--lr", type=float, required=True)
    parser.add_argument("--beta", type=float, required=True)
    parser.add_argument("--loss", required=True, help="TRL's loss_type")
    parser.add_argument("--label-smoothing", type=float, default=0.0)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--save", help="write the final model here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    import datasets
    import transformers
    import trl
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    rows = [json.loads(line) for line in open(f"{args.work}/ordered.jsonl")]
    dataset = datasets.Dataset.from_list(rows[: args.steps * args.batch])
    tokenizer = AutoTokenizer.from_pretrained(f"{args.work}/policy")
    config = DPOConfig(
        output_dir=f"{args.work}/trl-dpo-out", report_to="none", save_strategy="no", logging_steps=1, seed=0,
        per_device_train_batch_size=args.batch, gradient_accumulation_steps=1, learning_rate=args.lr,
        lr_scheduler_type="constant", warmup_steps=0, max_steps=args.steps, beta=args.beta, loss_type=[args.loss],
        label_smoothing=args.label_smoothing, max_length=None, optim="adamw_torch", weight_decay=0.0,
        max_grad_norm=1.0, bf16=args.dtype == "bfloat16", use_cpu=True, dataloader_num_workers=0,
        precompute_ref_log_probs=False,
        gradient_checkpointing=False)  # TRL's DPO turns it on by default; rlhfkit's is off: the same work both sides
    policy = AutoModelForCausalLM.from_pretrained(f"{args.work}/policy", dtype=torch.float32)

    losses: list[float] = []
    step_seconds: list[float] = []
    marks: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            marks.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            step_seconds.append(time.perf_counter() - marks[-1])

    trainer = DPOTrainer(model=policy, args=config, train_dataset=dataset, processing_class=tokenizer,
                         callbacks=[Clock()])
    trainer._get_train_sampler = lambda *a, **k: SequentialSampler(trainer.train_dataset)  # rlhfkit's order
    real_loss = trainer.compute_loss

    def recording_loss(model, inputs, *a, **k):
        out = real_loss(model, inputs, *a, **k)
        if model.training:
            losses.append((out[0] if isinstance(out, tuple) else out).item())
        return out

    trainer.compute_loss = recording_loss
    trainer.train()
    metrics = [{k: v for k, v in r.items() if k.startswith(("rewards/", "logps/"))} for r in trainer.state.log_history
               if "rewards/margins" in r]
    if args.save:
        trainer.model.save_pretrained(args.save)
    result = {"side": "trl", "losses": losses, "step_seconds": step_seconds, "metrics": metrics,
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "trl": trl.__version__},
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "threads": torch.get_num_threads(), "dtype": args.dtype}
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
