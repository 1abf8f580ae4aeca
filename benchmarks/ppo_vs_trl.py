"""PPO speed, rlhfkit against TRL 1.12, on the same models, prompts and settings, in one run.

    python benchmarks/ppo_vs_trl.py --config S [--dtype float32] [--trl] [--repeats 3] [--iterations 6]

Configurations (the Llama is the actor and reference; a one-label classifier of the same architecture is the reward
model and the starting critic/value model):
    S: hidden 256, 4 layers, 4 heads, FFN 1024 (~4.4M); 16 prompts x 32 new tokens, 4 PPO epochs, one minibatch
    M: hidden 512, 8 layers, 8 heads, FFN 2048 (~30M); 64 prompts x 128 new tokens, 1 PPO epoch, one minibatch

Each side runs in a fresh process, the sides alternate (rlhfkit, TRL, rlhfkit, ...), and every process uses the same
number of threads. TRL 1.12 is installed with `--trl` into a throwaway venv (runs/bench-trl-venv; it runs this
environment's torch and transformers, pinned, and each side prints the versions it ran) and runs from
benchmarks/trl_side.py. The table gives medians over all timed iterations (the first of each run, which includes
warm-up, is left out); "forward" is every no-gradient pass after sampling (reward, reference log-probs, values: both
sides keep the sampling logits as the old log-probs); "train" is the PPO epochs. The efficiency table divides each
phase's model FLOPs by its time and compares that with the matrix-product rate measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from train_throughput import sentence  # the word list the SFT/RM benchmark uses

HERE = Path(__file__).resolve().parent
CONFIGS = {
    "S": dict(hidden=256, layers=4, heads=4, ffn=1024, prompts=16, new_tokens=32, epochs=4, minibatches=1),
    "M": dict(hidden=512, layers=8, heads=8, ffn=2048, prompts=64, new_tokens=128, epochs=1, minibatches=1),
    "tiny": dict(hidden=32, layers=2, heads=2, ffn=64, prompts=4, new_tokens=4, epochs=1, minibatches=1),  # the test
}
TRL_VERSION = "1.12.0"


# ------------------------------------------------------------------------------------------------------- set-up
def build(work: Path, cfg: dict, iterations: int) -> dict:
    """Tokenizer (with its pad token, so neither side resizes embeddings), actor, reward model and prompts."""
    from rlhfkit.data.encode import EncodeStats, encode_prompt
    from rlhfkit.data.loading import load_examples
    from rlhfkit.data.templates import resolve_template
    from rlhfkit.models import load_sequence_classifier, load_tokenizer, save_model
    from rlhfkit.tiny import make_tiny_model, train_tokenizer

    rng = random.Random(0)
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer([sentence(rng, 50) for _ in range(2000)], work / "actor", vocab_size=2048)
    tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    actor = make_tiny_model("llama", tokenizer, work / "actor", hidden=cfg["hidden"], layers=cfg["layers"],
                            heads=cfg["heads"], ffn=cfg["ffn"])
    tokenizer = load_tokenizer(str(actor))
    save_model(load_sequence_classifier(str(actor), tokenizer, seed=1), tokenizer, work / "reward")
    n = cfg["prompts"] * (iterations + 1)
    rows = [{"prompt": f"\n\nHuman: {sentence(rng, rng.randint(16, 24))}\n\nAssistant:"} for _ in range(n)]
    (work / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples = load_examples([str(work / "prompts.jsonl")], "prompt").examples
    template = resolve_template("auto", tokenizer)
    ids = [encode_prompt(e, tokenizer, template, 256, EncodeStats()) for e in examples]
    (work / "prompt_ids.json").write_text(json.dumps(ids))
    model = load_sequence_classifier(str(actor), tokenizer)
    return {"vocab": len(tokenizer), "params": sum(p.numel() for p in model.parameters()),
            "prompt_len": statistics.mean(len(i) for i in ids)}


def trl_python(out: Path, version: str = TRL_VERSION) -> str:
    """The Python of a venv that has TRL `version` (created on first use) and runs this interpreter's torch and
    transformers.

    The venv sees this environment's packages through a .pth file naming its site-packages (`--system-site-packages`
    would show the base interpreter's instead, which a user's venv does not install into), and pip installs TRL
    under constraints that pin torch and transformers to the versions running here: pip then finds them installed
    and never pulls another build (a CUDA torch of several GB). The versions the venv imports are checked."""
    import site
    import transformers

    venv = out / ("bench-trl-venv" if version == TRL_VERSION else f"bench-trl-{version}-venv")
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    ours = [p for p in site.getsitepackages() + [site.getusersitepackages()] if Path(p).is_dir()]
    (Path(purelib) / "rlhfkit-bench-parent.pth").write_text("".join(p + "\n" for p in ours))
    constraints = out / "bench-trl-constraints.txt"
    constraints.write_text(f"torch=={torch.__version__}\ntransformers=={transformers.__version__}\n")
    probe = "import json, torch, transformers; print(json.dumps([torch.__version__, transformers.__version__]))"
    check = subprocess.run([str(python), "-c", "import trl; print(trl.__version__)"], capture_output=True, text=True)
    if check.stdout.strip() != version:
        subprocess.run([str(python), "-m", "pip", "install", "-q", f"trl=={version}", "-c", str(constraints)],
                       check=True)
    seen = json.loads(subprocess.run([str(python), "-c", probe], capture_output=True, text=True,
                                     check=True).stdout)
    if seen != [torch.__version__, transformers.__version__]:
        raise SystemExit(f"the TRL venv {venv} imports torch {seen[0]} and transformers {seen[1]}, this process "
                         f"torch {torch.__version__} and transformers {transformers.__version__}: delete {venv}")
    return str(python)


# ------------------------------------------------------------------------------------------------------ one side
def run_rlhfkit(work: Path, out_file: Path, cfg: dict, args) -> None:
    """rlhfkit's PPO (called in a fresh process by `side`), its per-iteration phases written like trl_side.py's."""
    import shutil

    from rlhfkit.config import make_config
    from rlhfkit.ppo.config import PPOConfig
    from rlhfkit.ppo.train import run_ppo

    torch.set_num_threads(args.threads)
    run_dir = work / "rlhfkit-out"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_ppo(make_config(PPOConfig, {
        "actor": str(work / "actor"), "reward": str(work / "reward"), "prompts": [str(work / "prompts.jsonl")],
        "output": str(run_dir), "max_steps": args.iterations, "batch_size": cfg["prompts"],
        "mini_batch_size": cfg["prompts"] // cfg["minibatches"], "ppo_epochs": cfg["epochs"],
        "max_new_tokens": cfg["new_tokens"], "dtype": args.dtype, "save_every": 0, "sample_every": 0,
        "lr": 1e-6, "critic_lr": 1e-6, "kl_coef": 0.05, "reward_norm": "none", "reward_clip": 0.0}))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    iterations = [{"time_iteration": r["time_iteration"], "time_generate": r["time_generate"],
                   "time_forward": r["time_score"] + r["time_experience"], "time_train": r["time_train"],
                   "response_tokens": r["response_length"] * cfg["prompts"]} for r in records]
    import transformers

    out_file.write_text(json.dumps({"side": "rlhfkit", "iterations": iterations, "threads": torch.get_num_threads(),
                                    "versions": {"torch": torch.__version__,
                                                 "transformers": transformers.__version__},
                                    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                                    "dtype": args.dtype}))


def run_side(side: str, work: Path, out_file: Path, args, python: str | None) -> dict:
    cfg = CONFIGS[args.config]
    common = ["--work", str(work), "--out", str(out_file), "--iterations", str(args.iterations), "--dtype", args.dtype,
              "--threads", str(args.threads)]
    if side == "rlhfkit":
        command = [sys.executable, __file__, "--side", "rlhfkit", "--config", args.config] + common
    else:
        command = [python, str(HERE / "trl_side.py"), "--batch", str(cfg["prompts"]), "--new-tokens",
                   str(cfg["new_tokens"]), "--epochs", str(cfg["epochs"]), "--minibatches", str(cfg["minibatches"]),
                   "--micro", str(args.trl_micro)] + common
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONWARNINGS": "ignore",
           "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{side} run failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads(out_file.read_text())


# ---------------------------------------------------------------------------------------------------- the report
def matmul_rate(dtype: torch.dtype, threads: int, n: int, seconds: float = 1.0) -> float:
    """GFLOP/s of an n x n x n matrix product on this machine (the best of repeated timings)."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best, end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best / 1e9


def phase_flops(cfg: dict, vocab: int, prompt_len: float, response_len: float, side: str) -> dict[str, float]:
    """Model FLOPs of each phase of one iteration (matrix products and attention; 2 per multiply-add; backward = 2x
    forward). Generation with a KV cache does one forward's work over the prompt and response."""
    h, layers, ffn, B = cfg["hidden"], cfg["layers"], cfg["ffn"], cfg["prompts"]
    T = prompt_len + response_len
    block = layers * (4 * h * h + 3 * h * ffn)
    attention = 2 * layers * h * T * T  # QK^T and AV over the causal half, per sequence

    def forward(head_tokens: float, head_width: int) -> float:
        return B * (2 * block * T + attention + 2 * h * head_width * head_tokens)

    lm_all, lm_response, value = forward(T, vocab), forward(response_len, vocab), forward(T, 1)
    generate = lm_all
    # Both sides keep the sampling logits as the old log-probs. rlhfkit: reference log-probs (logits at the response
    # only), critic, reward model; TRL: reference log-probs (all logits), value model, reward model.
    no_grad = (lm_response if side == "rlhfkit" else lm_all) + 2 * value
    train_logits = lm_response if side == "rlhfkit" else lm_all
    train = cfg["epochs"] * 3 * (train_logits + value)
    return {"generate": generate, "forward": no_grad, "train": train}


def summarise(results: list[dict]) -> dict[str, float]:
    timed = [it for r in results for it in (r["iterations"][1:] or r["iterations"])]
    keys = ("time_iteration", "time_generate", "time_forward", "time_train", "response_tokens")
    m = {k: statistics.median(it[k] for it in timed) for k in keys}
    m["tokens_per_s"] = statistics.median(it["response_tokens"] / it["time_iteration"] for it in timed)
    m["peak_rss_mb"] = max(r["peak_rss_mb"] for r in results)
    m["n"] = len(timed)
    return m


def alternate(sides: list[str], args, run_one, summarise) -> tuple[dict, dict[str, float]]:
    """`args.repeats` runs of each side, alternating (a fresh process each), then the matrix-product rates: the
    summary of each side (with the versions it ran) and the rates."""
    results: dict[str, list[dict]] = {s: [] for s in sides}
    for repeat in range(args.repeats):
        for side in sides:
            results[side].append(run_one(side, repeat))
            print(f"run {repeat + 1}/{args.repeats} {side}: {summarise(results[side][-1:])['time_iteration']:.3f} "
                  "s/iter", flush=True)
    rates = {name: matmul_rate(dtype, args.threads, args.matmul_size)
             for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16))}
    summary = {s: summarise(r) for s, r in results.items()}
    for side, runs in results.items():
        summary[side]["versions"] = runs[0].get("versions", {})
    return summary, rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="S")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--iterations", type=int, default=6, help="PPO iterations per run (the first is not timed)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side, alternating")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--trl", action="store_true", help="also run TRL 1.12 (installed into a throwaway venv)")
    parser.add_argument("--trl-micro", type=int, default=0, help="TRL's training micro-batch (its "
                        "per_device_train_batch_size); 0 = the whole minibatch, as the issue's set-up")
    parser.add_argument("--matmul-size", type=int, default=1024, help="n of the n x n x n product timed for the rate")
    parser.add_argument("--out", default="runs/bench-ppo-vs-trl")
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
    python = trl_python(out.resolve()) if args.trl else None
    summary, rates = alternate(["rlhfkit"] + (["trl"] if args.trl else []), args,
                               lambda side, repeat: run_side(side, work, work / f"{side}-{repeat}.json", args, python),
                               summarise)
    report(args, cfg, facts, summary, rates)
    (work / "summary.json").write_text(json.dumps({"config": args.config, "dtype": args.dtype, "facts": facts,
                                                   "trl_micro": args.trl_micro,
                                                   "summary": summary, "matmul_gflops": rates}, indent=2))


def report(args, cfg: dict, facts: dict, summary: dict, rates: dict) -> None:
    print(f"\nconfig {args.config}: Llama hidden {cfg['hidden']}, {cfg['layers']} layers, {cfg['heads']} heads, FFN "
          f"{cfg['ffn']}, vocab {facts['vocab']} ({facts['params'] / 1e6:.1f}M parameters per model); "
          f"{cfg['prompts']} prompts (mean {facts['prompt_len']:.0f} tokens) x {cfg['new_tokens']} new tokens, "
          f"{cfg['epochs']} PPO epoch(s), {cfg['minibatches']} minibatch; {args.dtype}; {args.threads} threads; "
          f"torch {torch.__version__}")
    for side, m in summary.items():
        print(f"{side} ran " + ", ".join(f"{name} {version}" for name, version in m["versions"].items()))
    print("both sides: actor + reference (Llama), reward model + critic (classifier), sampling at temperature 1, "
          "stop at EOS, KL coef 0.05, whitened advantages, no reward normalisation; rlhfkit's micro-batches: its "
          "default (2048 padded tokens per pass); TRL's training micro-batch: "
          f"{args.trl_micro or cfg['prompts'] // cfg['minibatches']} sequences\n")
    print("| side | s/iteration | generate | forward | train | response tokens/s | peak RSS MB | iterations timed |")
    print("|---|---|---|---|---|---|---|---|")
    for side, m in summary.items():
        name = "rlhfkit" if side == "rlhfkit" else f"TRL {TRL_VERSION}"
        print(f"| {name} | {m['time_iteration']:.3f} | {m['time_generate']:.3f} | {m['time_forward']:.3f} | "
              f"{m['time_train']:.3f} | {m['tokens_per_s']:.0f} | {m['peak_rss_mb']:.0f} | {m['n']} |")
    if "trl" in summary:
        r, t = summary["rlhfkit"], summary["trl"]
        print(f"| TRL / rlhfkit (speed-up) | {t['time_iteration'] / r['time_iteration']:.2f}x | "
              f"{t['time_generate'] / r['time_generate']:.2f}x | {t['time_forward'] / r['time_forward']:.2f}x | "
              f"{t['time_train'] / r['time_train']:.2f}x | | | |")
    rate = rates[args.dtype]
    print(f"\nmatrix-product rate measured here: float32 {rates['float32']:.0f} GFLOP/s, bfloat16 "
          f"{rates['bfloat16']:.0f} GFLOP/s; model FLOPs per phase / phase time:\n")
    print("| side | phase | model GFLOP | GFLOP/s | share of the " + args.dtype + " rate |")
    print("|---|---|---|---|---|")
    for side, m in summary.items():
        response_len = m["response_tokens"] / cfg["prompts"]
        flops = phase_flops(cfg, facts["vocab"], facts["prompt_len"], response_len, side)
        for phase, f in flops.items():
            speed = f / m[f"time_{phase}"] / 1e9
            print(f"| {side} | {phase} | {f / 1e9:.1f} | {speed:.1f} | {speed / rate:.0%} |")


if __name__ == "__main__":
    main()
