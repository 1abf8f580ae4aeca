"""SFT and reward-model training throughput on a small Llama, in float32 and bfloat16.

    python benchmarks/train_throughput.py [--steps 12] [--out runs/bench-train]

Builds a byte-level BPE tokenizer and a Llama with hidden 256, 4 layers, 4 heads, FFN 1024 (~4.4M parameters with the
~450-token vocabulary that the synthetic word list gives) locally, then runs `rlhfkit sft` and `rlhfkit rm` through their Python entry points on synthetic rows
of about 128 tokens, batch 16. Prints the median sequences/s and tokens/s of the training steps (the first two, which
include warm-up, are left out), read back from each run's metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import time
from pathlib import Path

import torch

from rlhfkit.config import make_config
from rlhfkit.rm.train import RMConfig, run_rm
from rlhfkit.sft.train import SFTConfig, run_sft
from rlhfkit.tiny import make_tiny_model, train_tokenizer

WORDS = ("the a of to and in is it that was for on are with as his they at be this from have or by one had not but "
         "what all were when we there can an your which their said if do will each about how up out them then she "
         "many some so these would other into has more her two like him see time could no make than first been").split()


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def make_data(out: Path, rng: random.Random, rows: int) -> tuple[Path, Path]:
    sft = [{"instruction": sentence(rng, 40), "input": "", "output": sentence(rng, 60)} for _ in range(rows)]
    pairs = [{"prompt": f"\n\nHuman: {sentence(rng, 40)}\n\nAssistant:", "chosen": " " + sentence(rng, 60),
              "rejected": " " + sentence(rng, 60)} for _ in range(rows)]
    (out / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft))
    (out / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    return out / "sft.jsonl", out / "pairs.jsonl"


def fresh_dir(path: str) -> Path:
    out = Path(path)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    return out


def base_model(out: Path, rng: random.Random) -> Path:
    """The benchmark model: a BPE tokenizer on the word list and a Llama, hidden 256, 4 layers, FFN 1024."""
    tokenizer = train_tokenizer([sentence(rng, 50) for _ in range(2000)], out / "base", vocab_size=2048)
    return make_tiny_model("llama", tokenizer, out / "base", hidden=256, layers=4, heads=4, ffn=1024)


def median_rates(run_dir: Path) -> tuple[float, float, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"][2:]
    return (statistics.median(r["sequences_per_s"] for r in train), statistics.median(r["tokens_per_s"] for r in train),
            len(train))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", default="runs/bench-train")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    args = parser.parse_args()
    out = fresh_dir(args.out)
    rng = random.Random(0)
    sft_data, pair_data = make_data(out, rng, 256)
    base = base_model(out, rng)
    n_params = sum(p.numel() for p in __import__("transformers").AutoModelForCausalLM.from_pretrained(base).parameters())
    print(f"model: Llama hidden 256, 4 layers, FFN 1024: {n_params / 1e6:.2f}M parameters; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    common = {"model": str(base), "max_steps": args.steps, "batch_size": args.batch_size, "lr": 1e-4,
              "eval_split": 0.0, "save_every": 0, "max_len": 256}
    rows = []
    for dtype in args.dtypes:
        for stage, cls, run, data in (("sft", SFTConfig, run_sft, sft_data), ("rm", RMConfig, run_rm, pair_data)):
            run_dir = out / f"{stage}-{dtype}"
            start = time.perf_counter()
            run(make_config(cls, {**common, "data": [str(data)], "output": str(run_dir), "dtype": dtype}))
            wall = time.perf_counter() - start
            seq_s, tok_s, n = median_rates(run_dir)
            rows.append((stage, dtype, seq_s, tok_s, n, wall))
    print("\n| stage | dtype | sequences/s | tokens/s | steps timed | wall s (incl. load, save) |")
    print("|---|---|---|---|---|---|")
    for stage, dtype, seq_s, tok_s, n, wall in rows:
        unit = "(2 per pair)" if stage == "rm" else ""
        print(f"| {stage} | {dtype} | {seq_s:.1f} {unit} | {tok_s:.0f} | {n} | {wall:.1f} |")


if __name__ == "__main__":
    main()
