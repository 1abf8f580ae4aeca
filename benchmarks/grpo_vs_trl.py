"""GRPO speed, rlhfkit against TRL 1.16's GRPOTrainer, on the same models, prompts, reward function and settings;
and a check of rlhfkit's advantages and loss against TRL's on identical inputs.

    python benchmarks/grpo_vs_trl.py --config S-G [--dtype float32] [--trl] [--repeats 3] [--iterations 6]
    python benchmarks/grpo_vs_trl.py --config S-G --check     # the loss cross-check (needs the TRL venv)

Configurations (the PPO benchmark's Llamas; the policy and its reference; the reward is a Python function, letters e
per response / 4, the same on both sides):
    S-G: hidden 256, 4 layers (~4.4M); 16 prompts x 4 samples x 32 new tokens
    M-G: hidden 512, 8 layers (~30M); 16 prompts x 8 samples x 128 new tokens
Both: KL coefficient 0.04 (k3, a loss term), temperature 1, one optimizer step per batch (the whole batch), TRL's
default loss aggregation (dapo: token-mean) on both sides, use_vllm=False, no gradient checkpointing (TRL's GRPO
turns it on by default; it would make TRL recompute activations that rlhfkit keeps).

Each side runs in a fresh process, the sides alternate, every process uses the same number of threads; TRL runs in a
throwaway venv (runs/bench-trl-1.16.0-venv) on this environment's torch and transformers, and each side prints the
versions it ran. Medians over all timed iterations (the first of each run, with warm-up, is left out). Phases:
generate (sampling), score (the reward function), forward (the reference's log-probs), train (the policy's forward and
backward and the step). The efficiency table divides each phase's model FLOPs by its time and compares that with the
matrix-product rate measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from ppo_vs_trl import alternate, build, trl_python

HERE = Path(__file__).resolve().parent
CONFIGS = {
    "S-G": dict(hidden=256, layers=4, heads=4, ffn=1024, prompts=16, generations=4, new_tokens=32),
    "M-G": dict(hidden=512, layers=8, heads=8, ffn=2048, prompts=16, generations=8, new_tokens=128),
    "tiny": dict(hidden=32, layers=2, heads=2, ffn=64, prompts=2, generations=2, new_tokens=4),  # the test's
}
TRL_VERSION = "1.16.0"
BETA = 0.04
REWARD = '''
def count_e(prompts, responses, **columns):
    return [text.count("e") / 4 for text in responses]
'''


# ------------------------------------------------------------------------------------------------------ one side
def run_rlhfkit(work: Path, out_file: Path, cfg: dict, args) -> None:
    """rlhfkit's GRPO (called in a fresh process by `run_side`), its per-iteration phases written like
    trl_grpo_side.py's."""
    import shutil

    import transformers

    from rlhfkit.config import make_config
    from rlhfkit.grpo.config import GRPOConfig
    from rlhfkit.grpo.train import run_grpo

    torch.set_num_threads(args.threads)
    run_dir = work / "rlhfkit-grpo-out"
    shutil.rmtree(run_dir, ignore_errors=True)
    (work / "reward.py").write_text(REWARD)
    run_grpo(make_config(GRPOConfig, {
        "actor": str(work / "actor"), "reward_fn": [f"{work / 'reward.py'}:count_e"],
        "prompts": [str(work / "prompts.jsonl")], "output": str(run_dir), "max_steps": args.iterations,
        "batch_size": cfg["prompts"], "num_generations": cfg["generations"], "max_new_tokens": cfg["new_tokens"],
        "kl_coef": BETA, "loss_agg": "token-mean", "dtype": args.dtype, "save_every": 0, "sample_every": 0,
        "lr": 1e-6, "lr_schedule": "constant"}))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = cfg["prompts"] * cfg["generations"]
    iterations = [{"time_iteration": r["time_iteration"], "time_generate": r["time_generate"],
                   "time_score": r["time_score"], "time_forward": r["time_experience"],
                   "time_train": r["time_train"], "response_tokens": r["response_length"] * rows} for r in records]
    out_file.write_text(json.dumps({"side": "rlhfkit", "iterations": iterations, "threads": torch.get_num_threads(),
                                    "versions": {"torch": torch.__version__,
                                                 "transformers": transformers.__version__},
                                    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                                    "dtype": args.dtype}))


def run_side(side: str, work: Path, out_file: Path, args, python: str | None, check: bool = False) -> dict:
    cfg = CONFIGS[args.config]
    common = ["--work", str(work), "--out", str(out_file), "--iterations", str(args.iterations), "--dtype", args.dtype,
              "--threads", str(args.threads)]
    if side == "rlhfkit":
        command = [sys.executable, __file__, "--side", "rlhfkit", "--config", args.config] + common
    else:
        command = [python, str(HERE / "trl_grpo_side.py"), "--prompts", str(cfg["prompts"]), "--generations",
                   str(cfg["generations"]), "--new-tokens", str(cfg["new_tokens"]), "--beta", str(BETA)] + common
        command += ["--check"] if check else []
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONWARNINGS": "ignore",
           "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{side} run failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads(out_file.read_text())


# ------------------------------------------------------------------------------------------ the loss cross-check
# TRL's loss type -> rlhfkit's estimator and loss aggregation. TRL divides by the group std + 1e-4.
CHECKED = {"grpo": ("grpo", "seq-mean-token-mean"), "dr_grpo": ("dr-grpo", "seq-mean-token-sum-norm"),
           "dapo": ("grpo", "token-mean")}


def cross_check(found: dict) -> dict[str, dict[str, float]]:
    """rlhfkit's advantages and loss from the inputs TRL used (its rewards, completion mask, policy and reference
    log-probs); the largest differences from TRL's, per loss type."""
    from rlhfkit.grpo import core
    from rlhfkit.rl.core import aggregate, kl_estimate, policy_loss

    result = {}
    for loss_type, seen in found.items():
        estimator, agg = CHECKED[loss_type]
        mask = torch.tensor(seen["mask"]).bool()
        logps, ref = torch.tensor(seen["logps"]), torch.tensor(seen["ref_logps"])
        rewards = torch.tensor(seen["rewards"])
        advantages = core.advantages(estimator, rewards, seen["generations"], mask, eps=1e-4)
        pg, _ = policy_loss(logps, logps, advantages, mask, 0.2)  # on-policy: ratio 1, as in TRL's first step
        loss = aggregate(pg + seen["beta"] * kl_estimate(logps, ref, "k3"), mask, agg,
                         token_norm=seen["max_completion_length"])
        trl_adv = torch.tensor(seen["advantages"])
        result[loss_type] = {
            "advantage_max_abs_diff": (advantages[:, 0] - trl_adv).abs().max().item(),
            "loss_rlhfkit": loss.item(), "loss_trl": seen["loss"],
            "loss_rel_diff": abs(loss.item() - seen["loss"]) / max(abs(seen["loss"]), 1e-12),
            "rewards_std": rewards.std().item()}
    return result


# ---------------------------------------------------------------------------------------------------- the report
def phase_flops(cfg: dict, vocab: int, prompt_len: float, response_len: float) -> dict[str, float]:
    """Model FLOPs of each phase of one iteration, for both sides alike (matrix products and attention; 2 per
    multiply-add; backward = 2x forward): sampling = one forward over prompt and response per row (rlhfkit prefills
    each prompt once for its G rows, so it does less than this), the reference's and the training forward read the
    logits at the response only."""
    h, layers, ffn = cfg["hidden"], cfg["layers"], cfg["ffn"]
    rows = cfg["prompts"] * cfg["generations"]
    T = prompt_len + response_len
    block = layers * (4 * h * h + 3 * h * ffn)
    attention = 2 * layers * h * T * T

    def forward(head_tokens: float) -> float:
        return rows * (2 * block * T + attention + 2 * h * vocab * head_tokens)

    return {"generate": forward(T), "forward": forward(response_len), "train": 3 * forward(response_len)}


def summarise(results: list[dict]) -> dict[str, float]:
    timed = [it for r in results for it in (r["iterations"][1:] or r["iterations"])]
    keys = ("time_iteration", "time_generate", "time_score", "time_forward", "time_train", "response_tokens")
    m = {k: statistics.median(it[k] for it in timed) for k in keys}
    m["tokens_per_s"] = statistics.median(it["response_tokens"] / it["time_iteration"] for it in timed)
    m["iterations_per_s"] = 1 / m["time_iteration"]
    m["peak_rss_mb"] = max(r["peak_rss_mb"] for r in results)
    m["n"] = len(timed)
    return m


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="S-G")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--iterations", type=int, default=6, help="iterations per run (the first is not timed)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side, alternating")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--trl", action="store_true", help=f"also run TRL {TRL_VERSION} (in a throwaway venv)")
    parser.add_argument("--check", action="store_true", help="only the advantage and loss cross-check against TRL")
    parser.add_argument("--matmul-size", type=int, default=1024, help="n of the n x n x n product timed for the rate")
    parser.add_argument("--out", default="runs/bench-grpo-vs-trl")
    parser.add_argument("--side", choices=["rlhfkit"], help=argparse.SUPPRESS)  # internal: one run of one side
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    cfg = CONFIGS[args.config]
    if args.side:
        run_rlhfkit(Path(args.work), Path(args.out), cfg, args)  # --out: the JSON file to write
        return
    out = Path(args.out)
    work = out / f"{args.config}-{args.dtype}"
    facts = build(work, cfg, args.iterations)
    python = trl_python(out.resolve().parent, TRL_VERSION) if args.trl or args.check else None
    if args.check:
        found = run_side("trl", work, work / "trl-check.json", args, python, check=True)
        diffs = cross_check(found["check"])
        print("TRL ran " + ", ".join(f"{k} {v}" for k, v in found["versions"].items()))
        print("| TRL loss type | rlhfkit estimator, aggregation | max abs advantage difference | loss TRL | "
              "loss rlhfkit | relative difference |")
        print("|---|---|---|---|---|---|")
        for loss_type, d in diffs.items():
            print(f"| {loss_type} | {', '.join(CHECKED[loss_type])} | {d['advantage_max_abs_diff']:.2e} | "
                  f"{d['loss_trl']:.8f} | {d['loss_rlhfkit']:.8f} | {d['loss_rel_diff']:.2e} |")
        (work / "check.json").write_text(json.dumps(diffs, indent=2))
        return
    summary, rates = alternate(["rlhfkit"] + (["trl"] if args.trl else []), args,
                               lambda side, repeat: run_side(side, work, work / f"{side}-{repeat}.json", args, python),
                               summarise)
    report(args, cfg, facts, summary, rates)
    (work / "summary.json").write_text(json.dumps({"config": args.config, "dtype": args.dtype, "facts": facts,
                                                   "summary": summary, "matmul_gflops": rates}, indent=2))


def report(args, cfg: dict, facts: dict, summary: dict, rates: dict) -> None:
    print(f"\nconfig {args.config}: Llama hidden {cfg['hidden']}, {cfg['layers']} layers, {cfg['heads']} heads, FFN "
          f"{cfg['ffn']}, vocab {facts['vocab']}; {cfg['prompts']} prompts (mean {facts['prompt_len']:.0f} tokens) "
          f"x {cfg['generations']} samples x {cfg['new_tokens']} new tokens; KL {BETA}; one step per batch; "
          f"{args.dtype}; {args.threads} threads")
    for side, m in summary.items():
        print(f"{side} ran " + ", ".join(f"{name} {version}" for name, version in m["versions"].items()))
    print("\n| side | s/iteration | iterations/s | generate | score | forward | train | response tokens/s | "
          "peak RSS MB | iterations timed |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for side, m in summary.items():
        name = "rlhfkit" if side == "rlhfkit" else f"TRL {TRL_VERSION}"
        print(f"| {name} | {m['time_iteration']:.3f} | {m['iterations_per_s']:.2f} | {m['time_generate']:.3f} | "
              f"{m['time_score']:.3f} | {m['time_forward']:.3f} | {m['time_train']:.3f} | {m['tokens_per_s']:.0f} | "
              f"{m['peak_rss_mb']:.0f} | {m['n']} |")
    if "trl" in summary:
        r, t = summary["rlhfkit"], summary["trl"]
        print("| TRL / rlhfkit (speed-up) | " + f"{t['time_iteration'] / r['time_iteration']:.2f}x | | " + " | ".join(
            f"{t[f'time_{p}'] / max(r[f'time_{p}'], 1e-9):.2f}x" for p in ("generate", "score", "forward", "train"))
              + " | | | |")
    rate = rates[args.dtype]
    print(f"\nmatrix-product rate measured here: float32 {rates['float32']:.0f} GFLOP/s, bfloat16 "
          f"{rates['bfloat16']:.0f} GFLOP/s; model FLOPs per phase / phase time:\n")
    print("| side | phase | model GFLOP | GFLOP/s | share of the " + args.dtype + " rate |")
    print("|---|---|---|---|---|")
    for side, m in summary.items():
        response_len = m["response_tokens"] / (cfg["prompts"] * cfg["generations"])
        for phase, f in phase_flops(cfg, facts["vocab"], facts["prompt_len"], response_len).items():
            speed = f / m[f"time_{phase}"] / 1e9
            print(f"| {side} | {phase} | {f / 1e9:.1f} | {speed:.1f} | {speed / rate:.0%} |")


if __name__ == "__main__":
    main()
