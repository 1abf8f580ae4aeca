"""A few steps of every training stage on a CUDA machine, in bf16: tokens/s, peak GPU memory, and each phase's share
of the bf16 matrix-product rate measured in the same run.

    python benchmarks/gpu_check.py [--out runs/gpu-check]      # on a GPU: a ~0.5B Llama (94 s on an H100)
    python benchmarks/gpu_check.py --tiny                      # anywhere (the test suite's): tiny model, float32

It installs nothing: rlhfkit on an environment that has torch, transformers and peft (`pip install --no-deps -e .`).
It builds a tokenizer on synthetic text and a Llama from its config (hidden 1280, 24 layers, 20 heads, FFN 3456, a
32,000-token embedding and head: ~0.55B parameters), then runs rlhfkit's own entry points, one after another in this
process: SFT, RM (from the SFT model), PPO (actor from SFT, critic and reward from RM), GRPO (reward from RM) and DPO
(from SFT, on the RM's pairs), each for a few steps, and on two or more GPUs an FSDP SFT run on 2 ranks. Per stage it
reads the steps' timings from the run's metrics.jsonl (the first step, with warm-up, left out) and
torch.cuda.max_memory_allocated. A stage that fails is reported and the others still run (a lent GPU's minutes are
few); the exit code is then 1.

Model FLOPs: 2 per multiply-add per token through the non-embedding weights and the head (attention's T^2 terms are
left out: at these lengths they are a few percent), times 3 for a training step (forward and backward), plus one
forward pass for DPO's reference. Sampling is counted as one forward pass over prompt and response per sequence.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
# vocab: what the tokenizer is trained to; head_vocab: the model's embedding and head rows (see make_inputs).
SIZES = {"full": dict(hidden=1280, layers=24, heads=20, ffn=3456, vocab=4096, head_vocab=32000, sft_steps=8,
                      rm_steps=8, rl_steps=3, batch=32, prompts=32, groups=8, generations=8, new_tokens=128, words=160),
         "tiny": dict(hidden=32, layers=2, heads=2, ffn=64, vocab=300, head_vocab=1000, sft_steps=2, rm_steps=2,
                      rl_steps=2, batch=4, prompts=4, groups=2, generations=2, new_tokens=4, words=12)}


def make_inputs(out: Path, size: dict) -> dict[str, Path]:
    """Tokenizer, the Llama, SFT rows, preference pairs and prompts of synthetic text."""
    sys.path.insert(0, str(HERE))
    from train_throughput import sentence

    from rlhfkit.tiny import make_tiny_model, train_tokenizer

    rng = random.Random(0)
    w = size["words"]
    tokenizer = train_tokenizer([sentence(rng, 60) for _ in range(3000)], out / "init", vocab_size=size["vocab"])
    make_tiny_model("llama", tokenizer, out / "init", hidden=size["hidden"], layers=size["layers"],
                    heads=size["heads"], ffn=size["ffn"])
    # The synthetic text needs only ~450 tokens, where a real tokenizer has 32k-150k: the model gets a real-sized
    # embedding and head (the extra rows are never in the data, but every logit is computed).
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "init")
    model.resize_token_embeddings(size["head_vocab"], mean_resizing=False)
    model.save_pretrained(out / "init")
    n = 8 * size["batch"]

    def write(name: str, rows: list[dict]) -> Path:
        path = out / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path

    return {"sft": write("sft", [{"instruction": sentence(rng, w // 2), "input": "", "output": sentence(rng, w)}
                                 for _ in range(n)]),
            "pairs": write("pairs", [{"prompt": f"\n\nHuman: {sentence(rng, w // 2)}\n\nAssistant:",
                                      "chosen": " " + sentence(rng, w), "rejected": " " + sentence(rng, w)}
                                     for _ in range(n)]),
            "prompts": write("prompts", [{"prompt": f"\n\nHuman: {sentence(rng, w // 4)}\n\nAssistant:"}
                                         for _ in range(n)])}


def matmul_rate(dtype: torch.dtype, device: str, n: int) -> float:
    """FLOP/s of an n x n x n product (the best of repeated timings)."""
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    best = float("inf")
    for _ in range(12):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(5):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - start) / 5)
    return 2 * n ** 3 / best


def params(size: dict, head: int) -> int:
    """Weights a token passes through: the blocks and a head of `head` outputs."""
    h = size["hidden"]
    return size["layers"] * (4 * h * h + 3 * h * size["ffn"]) + h * head


def records(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r.get("split", "train") == "train"]
    return rows[1:] or rows


def median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def run_stages(out: Path, files: dict[str, Path], size: dict, dtype: str, vocab: int) -> list[dict]:
    from rlhfkit.config import make_config
    from rlhfkit.dpo.train import DPOConfig, run_dpo
    from rlhfkit.grpo.config import GRPOConfig
    from rlhfkit.grpo.train import run_grpo
    from rlhfkit.ppo.config import PPOConfig
    from rlhfkit.ppo.train import run_ppo
    from rlhfkit.rm.train import RMConfig, run_rm
    from rlhfkit.sft.train import SFTConfig, run_sft

    common = dict(dtype=dtype, save_every=0, overwrite=True, lr_schedule="constant")
    rl = dict(common, actor=str(out / "sft" / "final"), reward=str(out / "rm" / "final"),
              prompts=[str(files["prompts"])], max_new_tokens=size["new_tokens"], max_steps=size["rl_steps"],
              sample_every=0, lr=1e-6, micro_batch_tokens=0)
    stages = [
        ("sft", run_sft, SFTConfig, dict(common, model=str(out / "init"), data=[str(files["sft"])],
                                         max_steps=size["sft_steps"], batch_size=size["batch"], max_len=512,
                                         eval_split=0.02, lr=1e-5)),
        ("rm", run_rm, RMConfig, dict(common, model=str(out / "sft" / "final"), data=[str(files["pairs"])],
                                      max_steps=size["rm_steps"], batch_size=size["batch"], max_len=512,
                                      eval_split=0.02, lr=1e-5)),
        ("ppo", run_ppo, PPOConfig, dict(rl, batch_size=size["prompts"], critic_lr=1e-6)),
        ("grpo", run_grpo, GRPOConfig, dict(rl, batch_size=size["groups"], num_generations=size["generations"])),
        ("dpo", run_dpo, DPOConfig, dict(common, model=str(out / "sft" / "final"), data=[str(files["pairs"])],
                                         max_steps=size["rm_steps"], batch_size=size["batch"], max_len=512,
                                         eval_split=0.02, lr=1e-6)),
    ]
    from rlhfkit.models import load_tokenizer

    tokenizer = load_tokenizer(str(out / "init"))
    prompt_len = statistics.mean(len(tokenizer(json.loads(line)["prompt"]).input_ids)
                                 for line in files["prompts"].read_text().splitlines())
    lm, rm = params(size, vocab), params(size, 1)
    results = []
    for name, run, cls, values in stages:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        try:
            run(make_config(cls, {**values, "output": str(out / name)}))
        except Exception as error:  # report it and go on: on a lent GPU one failed stage must not cost the others
            traceback.print_exc()
            results.append({"stage": name, "error": f"{type(error).__name__}: {error}"})
            continue
        wall = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() / 2 ** 30 if torch.cuda.is_available() else float("nan")
        rows = records(out / name)
        if name in ("sft", "rm", "dpo"):  # tokens_per_s: the attended tokens of every sequence (both of a pair)
            tokens = median(rows, "tokens_per_s")
            passes = {"sft": 3 * lm, "rm": 3 * rm, "dpo": (3 + 1) * lm}[name]  # DPO: + the reference's forward
            rates, seconds = {"train": 2 * passes * tokens}, {}
        else:  # tokens_per_s: the response tokens of an iteration / its seconds
            tokens = median(rows, "tokens_per_s")
            sequences = size["prompts"] if name == "ppo" else size["groups"] * size["generations"]
            seq = 2 * (prompt_len + median(rows, "response_length")) * sequences  # x weights = one forward
            critic = rm if name == "ppo" else 0
            work = {"generate": seq * lm, "score": seq * rm, "experience": seq * (lm + critic),
                    "train": 3 * seq * (lm + critic)}
            seconds = {p: median(rows, f"time_{p}") for p in work}
            rates = {p: f / seconds[p] for p, f in work.items()}
        results.append({"stage": name, "wall_s": wall, "tokens_per_s": tokens, "peak_gib": peak,
                        "phases": rates, "phase_s": seconds})
        print(f"[gpu_check] {name} done in {wall:.1f} s", flush=True)
    return results


def fsdp_check(out: Path, files: dict[str, Path], size: dict, dtype: str) -> dict | None:
    """SFT on 2 ranks with FSDP2, when this machine has two GPUs."""
    if torch.cuda.device_count() < 2:
        return None
    args = [sys.executable, "-m", "rlhfkit", "sft", "--model", str(out / "init"), "--data", str(files["sft"]),
            "--output", str(out / "sft-fsdp"), "--max-steps", str(size["sft_steps"]), "--batch-size",
            str(size["batch"]), "--max-len", "512", "--dtype", dtype, "--strategy", "fsdp", "--nproc", "2",
            "--save-every", "0", "--overwrite", "--eval-split", "0.02"]
    start = time.perf_counter()
    subprocess.run(args, check=True)
    return {"stage": "sft, FSDP on 2 GPUs", "wall_s": time.perf_counter() - start,
            "tokens_per_s": median(records(out / "sft-fsdp"), "tokens_per_s")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny model in float32 (runs on a CPU too)")
    parser.add_argument("--out", default="runs/gpu-check")
    args = parser.parse_args()
    size = SIZES["tiny" if args.tiny else "full"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = "bfloat16" if device == "cuda" and not args.tiny else "float32"
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    import transformers

    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"device {name}; torch {torch.__version__}, transformers {transformers.__version__}; {dtype}", flush=True)
    rate = matmul_rate(torch.bfloat16 if dtype == "bfloat16" else torch.float32, device,
                       8192 if device == "cuda" and not args.tiny else 256)
    files = make_inputs(out, size)
    vocab = json.loads((out / "init" / "config.json").read_text())["vocab_size"]  # the head's width
    results = run_stages(out, files, size, dtype, vocab)
    fsdp = fsdp_check(out, files, size, dtype)
    print(f"\n{name}: {dtype} matrix-product rate measured here {rate / 1e12:.1f} TFLOP/s; Llama hidden "
          f"{size['hidden']}, {size['layers']} layers, FFN {size['ffn']}, vocab {vocab} "
          f"({params(size, vocab) / 1e9:.2f}B weights a token passes through)\n")
    print("| stage | wall s | tokens/s | peak GPU GiB | phase: seconds, TFLOP/s, share of the rate |")
    print("|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['stage']} | failed: {r['error']} | | | |")
            continue
        phases = "; ".join(f"{p} " + (f"{r['phase_s'][p]:.2f} s, " if p in r["phase_s"] else "")
                           + f"{f / 1e12:.2f}, {f / rate:.0%}" for p, f in r["phases"].items())
        print(f"| {r['stage']} | {r['wall_s']:.1f} | {r['tokens_per_s']:.0f} | {r['peak_gib']:.1f} | {phases} |")
    if fsdp:
        print(f"| {fsdp['stage']} | {fsdp['wall_s']:.1f} | {fsdp['tokens_per_s']:.0f} | | |")
    else:
        print("\n(one GPU or none here: the 2-rank FSDP step was not run)")
    (out / "gpu_check.json").write_text(json.dumps({"device": name, "dtype": dtype, "rate": rate, "stages": results,
                                                    "fsdp": fsdp}, indent=2))
    if any("error" in r for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
