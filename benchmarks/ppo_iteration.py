"""Seconds per PPO iteration and per phase on a small Llama, in float32 and bfloat16.

    python benchmarks/ppo_iteration.py [--iterations 6] [--prompts 16] [--new-tokens 32] [--out runs/bench-ppo]

The same ~4.4M-parameter Llama as benchmarks/train_throughput.py (hidden 256, 4 layers, FFN 1024) is the actor and
reference; a sequence classifier from it is the reward model and the critic (all four models in full, no LoRA, unless
--lora-r is given). Each iteration: 16 prompts of ~45 tokens, 32 sampled tokens each, one PPO epoch over one
minibatch. Prints the median of the iterations after the first (which includes warm-up), read from metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics

import torch
from train_throughput import base_model, fresh_dir, sentence  # the same model and word list

from rlhfkit.config import make_config
from rlhfkit.models import load_sequence_classifier, load_tokenizer, save_model
from rlhfkit.ppo.config import PPOConfig
from rlhfkit.ppo.train import run_ppo

PHASES = ("time_generate", "time_score", "time_experience", "time_train", "time_iteration")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--lora-r", type=int, default=0)
    parser.add_argument("--out", default="runs/bench-ppo")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    args = parser.parse_args()
    out = fresh_dir(args.out)
    rng = random.Random(0)
    prompts = [{"prompt": f"\n\nHuman: {sentence(rng, 40)}\n\nAssistant:"} for _ in range(256)]
    (out / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prompts))
    base = base_model(out, rng)
    tok = load_tokenizer(str(base))
    reward = save_model(load_sequence_classifier(str(base), tok), tok, out / "rm")
    n_params = sum(p.numel() for p in load_sequence_classifier(str(base), tok).parameters())
    print(f"model: Llama hidden 256, 4 layers, FFN 1024, vocab {len(tok)}: {n_params / 1e6:.2f}M parameters (x4 "
          f"models); torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = []
    for dtype in args.dtypes:
        run_dir = out / f"ppo-{dtype}"
        run_ppo(make_config(PPOConfig, {
            "actor": str(base), "reward": str(reward), "prompts": [str(out / "prompts.jsonl")],
            "output": str(run_dir), "max_steps": args.iterations, "batch_size": args.prompts,
            "max_new_tokens": args.new_tokens, "dtype": dtype, "lora_r": args.lora_r, "save_every": 0,
            "sample_every": 0}))
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][1:]
        rows.append((dtype, {k: statistics.median(r[k] for r in records) for k in PHASES + ("response_length",
                                                                                         "tokens_per_s")},
                     len(records)))
    print(f"\n{args.prompts} prompts x {args.new_tokens} new tokens per iteration; median seconds:\n")
    print("| dtype | generate | score | log-probs + values | train | iteration | response tokens/s | "
          "mean response length | iterations timed |")
    print("|---|---|---|---|---|---|---|---|---|")
    for dtype, m, n in rows:
        print(f"| {dtype} | " + " | ".join(f"{m[k]:.3f}" for k in PHASES) +
              f" | {m['tokens_per_s']:.0f} | {m['response_length']:.1f} | {n} |")


if __name__ == "__main__":
    main()
