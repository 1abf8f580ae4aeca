"""DPO, rlhfkit against TRL 1.16's DPOTrainer: the same per-step losses and final weights (--check), and the speed
of both on the same model, pairs, order, learning rate, beta and batch.

    python benchmarks/dpo_vs_trl.py --check                          # 20 steps of each loss on a tiny Llama, float32
    python benchmarks/dpo_vs_trl.py --config S --trl [--repeats 3] [--steps 8] [--dtype bfloat16]   # speed; also M
    python benchmarks/dpo_vs_trl.py --config S --trl --pairs hh      # speed on HH-RLHF's multi-turn dialogues

Both sides train from the same Llama (built from a config) on the same pairs in the same order (TRL reads a file
written in the order rlhfkit's steps take the pairs, without shuffling), dropout off, AdamW at a constant learning
rate, the gradient clipped at 1, no gradient checkpointing (TRL's DPO turns it on by default), the reference's
log-probs computed at every step (neither side precomputes them). Configurations (the PPO benchmark's Llamas):
    tiny: hidden 64, 2 layers; pairs of about 70 tokens, batch 8, 20 steps, lr 1e-4, beta 0.1 (--check)
    S: hidden 256, 4 layers (~4.4M); M: hidden 512, 8 layers (~30M); pairs of about 256 tokens, batch 16
Pairs (--pairs): `synthetic`, a 40-word prompt and two answers of 140-160 random words; or `hh`, Anthropic's HH-RLHF
dialogues (harmless-base test split, ../shared/datasets beside the checkout; the dialogue data of Rafailov et al.
2023), the prompt being every turn before the last answer, the pairs whose two sequences both have 161-256 tokens.
Each side runs in a fresh process, the sides alternate, every process uses the same number of threads; TRL runs in a
throwaway venv (runs/bench-trl-1.16.0-venv) on this environment's torch and transformers. Speed: the median seconds
per optimizer step (the first step of each run, with warm-up, left out), as pairs/s; peak resident memory.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import resource
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from ppo_vs_trl import alternate, trl_python
from train_throughput import sentence

HERE = Path(__file__).resolve().parent
TRL_VERSION = "1.16.0"
CONFIGS = {
    "tiny": dict(hidden=64, layers=2, heads=4, ffn=256, prompt_words=12, response_words=(10, 30), batch=8),
    "S": dict(hidden=256, layers=4, heads=4, ffn=1024, prompt_words=40, response_words=(140, 160), batch=16),
    "M": dict(hidden=512, layers=8, heads=8, ffn=2048, prompt_words=40, response_words=(140, 160), batch=16),
}
SEED = 0
HH_RLHF = HERE.parent.parent / "shared" / "datasets" / "hh-rlhf-harmless-base-test.jsonl.gz"
ASSISTANT = "\n\nAssistant:"
HH_TOKENS = (160, 256)  # both sequences of a pair: 205 tokens on average, as long as the synthetic pairs
# rlhfkit's loss and label smoothing, and the TRL loss type they are checked against.
CASES = {"sigmoid": ("sigmoid", 0.0, "sigmoid"), "ipo": ("ipo", 0.0, "ipo"),
         "sigmoid, label smoothing 0.1 (cDPO)": ("sigmoid", 0.1, "sigmoid"),
         "robust, label smoothing 0.1": ("robust", 0.1, "robust")}


def hh_pairs() -> list[dict]:
    """HH-RLHF's harmless-base test dialogues as prompt (every turn up to the last "Assistant:") and two answers."""
    rows = []
    with gzip.open(HH_RLHF, "rt") as f:
        for line in f:
            row = json.loads(line)
            cut = row["chosen"].rfind(ASSISTANT) + len(ASSISTANT)
            prompt = row["chosen"][:cut]
            if row["rejected"].startswith(prompt) and row["chosen"][cut:].strip() and row["rejected"][cut:].strip():
                rows.append({"prompt": prompt, "chosen": row["chosen"][cut:], "rejected": row["rejected"][cut:]})
    return rows


def build(work: Path, cfg: dict, steps: int, pairs: str = "synthetic") -> dict:
    """Tokenizer (with its pad token, so neither side resizes embeddings), the Llama, the pairs (pairs.jsonl, what
    rlhfkit reads) and the same pairs in the order rlhfkit's steps take them (ordered.jsonl, what TRL reads)."""
    from rlhfkit.data.batching import step_indices
    from rlhfkit.models import load_tokenizer
    from rlhfkit.tiny import make_tiny_model, train_tokenizer

    rng = random.Random(0)
    work.mkdir(parents=True, exist_ok=True)
    n = 4 * cfg["batch"]
    if pairs == "hh":
        if not HH_RLHF.is_file():
            raise SystemExit(f"--pairs hh reads {HH_RLHF}, which is not there")
        dialogues = hh_pairs()
        texts = [r["prompt"] + r[k] for r in dialogues for k in ("chosen", "rejected")]
    else:
        texts = [sentence(rng, 50) for _ in range(2000)]
    tokenizer = train_tokenizer(texts, work / "policy", vocab_size=2048)
    tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    make_tiny_model("llama", tokenizer, work / "policy", hidden=cfg["hidden"], layers=cfg["layers"],
                    heads=cfg["heads"], ffn=cfg["ffn"])
    tokenizer = load_tokenizer(str(work / "policy"))

    def length(row: dict, key: str) -> int:  # with the EOS both sides append
        return len(tokenizer(row["prompt"] + row[key]).input_ids) + 1

    if pairs == "hh":
        fits = [r for r in dialogues if HH_TOKENS[0] < length(r, "chosen") <= HH_TOKENS[1]
                and HH_TOKENS[0] < length(r, "rejected") <= HH_TOKENS[1]]
        rows = random.Random(0).sample(fits, n)
    else:
        low, high = cfg["response_words"]
        rows = [{"prompt": f"\n\nHuman: {sentence(rng, cfg['prompt_words'])}\n\nAssistant:",
                 "chosen": " " + sentence(rng, rng.randint(low, high)),
                 "rejected": " " + sentence(rng, rng.randint(low, high))} for _ in range(n)]
    (work / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    order = [i for step in range(steps) for i in step_indices(n, cfg["batch"], SEED, step)]
    (work / "ordered.jsonl").write_text("".join(json.dumps(rows[i]) + "\n" for i in order))
    lengths = [length(r, k) for r in rows for k in ("chosen", "rejected")]
    prompts = [len(tokenizer(r["prompt"]).input_ids) for r in rows]
    return {"vocab": len(tokenizer), "sequence_tokens": statistics.mean(lengths), "pairs": n,
            "prompt_share": sum(prompts) * 2 / sum(lengths)}


# ------------------------------------------------------------------------------------------------------ one side
def run_rlhfkit(work: Path, out_file: Path, args) -> None:
    """rlhfkit's DPO (called in a fresh process by `run_side`): per-step losses and seconds, as trl_dpo_side.py."""
    import shutil

    import transformers

    from rlhfkit.config import make_config
    from rlhfkit.dpo.train import DPOConfig, run_dpo

    torch.set_num_threads(args.threads)
    run_dir = work / "rlhfkit-dpo-out"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dpo(make_config(DPOConfig, {
        "model": str(work / "policy"), "data": [str(work / "pairs.jsonl")], "output": str(run_dir), "eval_split": 0.0,
        "max_steps": args.steps, "batch_size": CONFIGS[args.config]["batch"], "lr": args.lr, "beta": args.beta,
        "loss": args.loss, "label_smoothing": args.label_smoothing, "lr_schedule": "constant", "dtype": args.dtype,
        "seed": SEED, "save_every": 0, "max_len": 1024}))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    out_file.write_text(json.dumps({
        "side": "rlhfkit", "losses": [r["loss"] for r in records],
        "step_seconds": [r["sequences_per_s"] and 2 * CONFIGS[args.config]["batch"] / r["sequences_per_s"]
                         for r in records],
        "metrics": [{k: v for k, v in r.items() if k.startswith(("rewards/", "logps/"))} for r in records],
        "final": str(run_dir / "final"), "threads": torch.get_num_threads(), "dtype": args.dtype,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def run_side(side: str, work: Path, out_file: Path, args, python: str | None, loss: tuple | None = None) -> dict:
    ours, smoothing, theirs = loss or ("sigmoid", 0.0, "sigmoid")
    common = ["--work", str(work), "--out", str(out_file), "--steps", str(args.steps), "--dtype", args.dtype,
              "--threads", str(args.threads), "--lr", str(args.lr), "--beta", str(args.beta),
              "--label-smoothing", str(smoothing)]
    if side == "rlhfkit":
        command = [sys.executable, __file__, "--side", "rlhfkit", "--config", args.config, "--loss", ours] + common
    else:
        command = [python, str(HERE / "trl_dpo_side.py"), "--batch", str(CONFIGS[args.config]["batch"]),
                   "--loss", theirs] + common + (["--save", str(work / "trl-final")] if args.check else [])
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONWARNINGS": "ignore",
           "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{side} run failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads(out_file.read_text())


# ------------------------------------------------------------------------------------------------ the cross-check
def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def check(work: Path, args, python: str) -> dict:
    """Each case: the largest relative difference of the per-step losses, of the logged rewards, and the largest
    absolute difference of the final weights."""
    results = {}
    for name, case in CASES.items():
        ours = run_side("rlhfkit", work, work / "check-rlhfkit.json", args, python, case)
        theirs = run_side("trl", work, work / "check-trl.json", args, python, case)
        a, b = torch.tensor(ours["losses"], dtype=torch.float64), torch.tensor(theirs["losses"], dtype=torch.float64)
        margins = [torch.tensor([m["rewards/margins"] for m in side["metrics"]], dtype=torch.float64)
                   for side in (ours, theirs)]
        ours_w, theirs_w = weights(Path(ours["final"])), weights(work / "trl-final")
        results[name] = {
            "steps": len(a), "loss_first": (a[0].item(), b[0].item()), "loss_last": (a[-1].item(), b[-1].item()),
            "loss_max_rel_diff": ((a - b).abs() / b.abs()).max().item(),
            "margin_max_abs_diff": (margins[0] - margins[1]).abs().max().item(),
            "weights_max_abs_diff": max((ours_w[k] - theirs_w[k]).abs().max().item() for k in ours_w),
            "versions": theirs["versions"]}
    return results


# ---------------------------------------------------------------------------------------------------- the report
def summarise(results: list[dict]) -> dict[str, float]:
    timed = [s for r in results for s in (r["step_seconds"][1:] or r["step_seconds"])]
    return {"time_iteration": statistics.median(timed), "peak_rss_mb": max(r["peak_rss_mb"] for r in results),
            "n": len(timed)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="S")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per run (the first is not timed)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side, alternating")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--trl", action="store_true", help=f"also run TRL {TRL_VERSION} (in a throwaway venv)")
    parser.add_argument("--check", action="store_true", help="the loss and weight cross-check (tiny, 20 steps)")
    parser.add_argument("--matmul-size", type=int, default=1024, help="n of the n x n x n product timed for the rate")
    parser.add_argument("--pairs", choices=["synthetic", "hh"], default="synthetic",
                        help="synthetic pairs, or HH-RLHF's dialogues (long prompts shared by both answers)")
    parser.add_argument("--out", default="runs/bench-dpo-vs-trl")
    parser.add_argument("--side", choices=["rlhfkit"], help=argparse.SUPPRESS)  # internal: one run of one side
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--loss", default="sigmoid", help=argparse.SUPPRESS)
    parser.add_argument("--label-smoothing", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        run_rlhfkit(Path(args.work), Path(args.out), args)  # --out: the JSON file to write
        return
    if args.check:
        args.config, args.steps, args.dtype = "tiny", 20, "float32"
    out = Path(args.out)
    work = out / (f"{args.config}-{args.dtype}" + ("-hh" if args.pairs == "hh" else ""))
    facts = build(work, CONFIGS[args.config], args.steps, args.pairs)
    python = trl_python(out.resolve().parent, TRL_VERSION) if args.trl or args.check else None
    if args.check:
        results = check(work, args, python)
        print(f"TRL ran {', '.join(f'{k} {v}' for k, v in next(iter(results.values()))['versions'].items())}; tiny "
              f"Llama, pairs of {facts['sequence_tokens']:.0f} tokens, batch {CONFIGS['tiny']['batch']}, "
              f"{args.steps} steps, lr {args.lr}, beta {args.beta}, float32")
        print("\n| loss | first loss rlhfkit / TRL | last loss rlhfkit / TRL | max relative loss difference | "
              "max margin difference | max weight difference |")
        print("|---|---|---|---|---|---|")
        for name, r in results.items():
            print(f"| {name} | {r['loss_first'][0]:.7f} / {r['loss_first'][1]:.7f} | {r['loss_last'][0]:.7f} / "
                  f"{r['loss_last'][1]:.7f} | {r['loss_max_rel_diff']:.1e} | {r['margin_max_abs_diff']:.1e} | "
                  f"{r['weights_max_abs_diff']:.1e} |")
        (work / "check.json").write_text(json.dumps(results, indent=2))
        return
    summary, rates = alternate(["rlhfkit"] + (["trl"] if args.trl else []), args,
                               lambda side, repeat: run_side(side, work, work / f"{side}-{repeat}.json", args, python),
                               summarise)
    cfg = CONFIGS[args.config]
    print(f"\nconfig {args.config}: Llama hidden {cfg['hidden']}, {cfg['layers']} layers, FFN {cfg['ffn']}, vocab "
          f"{facts['vocab']}; {args.pairs} pairs of {facts['sequence_tokens']:.0f} tokens per sequence (the prompt "
          f"{facts['prompt_share']:.0%} of them), batch {cfg['batch']}; "
          f"{args.dtype}; {args.threads} threads; matrix-product rate here: float32 {rates['float32']:.0f}, bfloat16 "
          f"{rates['bfloat16']:.0f} GFLOP/s")
    for side, m in summary.items():
        print(f"{side} ran " + ", ".join(f"{name} {version}" for name, version in m["versions"].items()))
    print("\n| side | s/step | pairs/s | peak RSS MB | steps timed |")
    print("|---|---|---|---|---|")
    for side, m in summary.items():
        name = "rlhfkit" if side == "rlhfkit" else f"TRL {TRL_VERSION}"
        print(f"| {name} | {m['time_iteration']:.3f} | {cfg['batch'] / m['time_iteration']:.1f} | "
              f"{m['peak_rss_mb']:.0f} | {m['n']} |")
    if "trl" in summary:
        r, t = summary["rlhfkit"], summary["trl"]
        print(f"\nspeed-up (TRL's s/step / rlhfkit's): {t['time_iteration'] / r['time_iteration']:.2f}x")
    (work / "summary.json").write_text(json.dumps({"config": args.config, "dtype": args.dtype, "facts": facts,
                                                   "summary": summary, "matmul_gflops": rates}, indent=2))


if __name__ == "__main__":
    main()
