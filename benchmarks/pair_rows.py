"""Reward-model and DPO training steps with each pair in one row (its prompt computed once, what rlhfkit trains on)
against the chosen and rejected sequences padded apart (what TRL and most trainers do), on the same batches.

    python benchmarks/pair_rows.py --data hh [--threads 2] [--dtype float32]      # HH-RLHF dialogues, S Llama
    python benchmarks/pair_rows.py --data demo [--threads 1] [--dtype bfloat16]   # the demo's pairs and model size

hh: Anthropic's HH-RLHF harmless-base test dialogues (../shared/datasets beside the checkout), all 2,304 cut to 256
tokens (both sequences of a pair lose the same prompt tokens), a byte-level BPE tokenizer of 2,048 tokens trained on
them, the PPO benchmark's S Llama (hidden 256, 4 layers), batch 16 pairs. demo: `rlhfkit demo`'s 8,000 pairs of seed 0,
its tokenizer and model size (hidden 128, 4 layers), batch 32 pairs, as its reward model and DPO train. The models are
freshly initialised (the time of a step does not depend on the weights). Both layouts run on the same batches in one
process, alternating; the table gives the median step over 28 steps of each, and the padded tokens of each layout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def build(data: str, work: Path, demo_pairs: int = 8000) -> tuple[list, object, Path, int]:
    """(encoded pairs, tokenizer, model folder, pairs per batch)."""
    from rlhfkit.data.encode import EncodeStats, encode_pairs
    from rlhfkit.data.loading import load_examples
    from rlhfkit.data.templates import resolve_template
    from rlhfkit.models import load_tokenizer
    from rlhfkit.tiny import make_tiny_model, train_tokenizer

    work.mkdir(parents=True, exist_ok=True)
    if data == "hh":
        from dpo_vs_trl import HH_RLHF, hh_pairs

        if not HH_RLHF.is_file():
            raise SystemExit(f"--data hh reads {HH_RLHF}, which is not there")
        rows = hh_pairs()
        (work / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        texts = [r["prompt"] + r[k] for r in rows for k in ("chosen", "rejected")]
        sizes, vocab, batch, max_len, pairs_file = dict(hidden=256, layers=4, heads=4, ffn=1024), 2048, 16, 256, \
            work / "pairs.jsonl"
    else:
        from rlhfkit.demo.run import MODEL
        from rlhfkit.demo.task import make_task

        files = make_task(work / "data", 0, n_pairs=demo_pairs)
        texts = [json.loads(line).get("text", line) for f in ("corpus", "sft", "pairs")
                 for line in files[f].read_text().splitlines()]
        sizes, vocab, batch, max_len, pairs_file = MODEL["full"], 600, 32, 96, files["pairs"]
    tokenizer = train_tokenizer(texts, work / "model", vocab_size=vocab)
    make_tiny_model("llama", tokenizer, work / "model", **sizes)
    tokenizer = load_tokenizer(str(work / "model"))
    examples = load_examples([str(pairs_file)], "preference").examples
    pairs = encode_pairs(examples, tokenizer, resolve_template("auto", tokenizer), max_len, EncodeStats())
    return pairs, tokenizer, work / "model", batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=["hh", "demo"], default="hh")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--steps", type=int, default=30, help="steps of each layout (the first two not counted)")
    parser.add_argument("--out", default="runs/bench-pair-rows")
    parser.add_argument("--demo-pairs", type=int, default=8000, help="with --data demo: pairs made (the demo's 8,000)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from rlhfkit.data.batching import collate_pair_rows, collate_pairs, step_indices
    from rlhfkit.dpo.train import pair_logprobs
    from rlhfkit.models import autocast, load_causal_lm, load_sequence_classifier
    from rlhfkit.rm.scoring import batch_scores

    pairs, tokenizer, model_dir, B = build(args.data, Path(args.out) / args.data, args.demo_pairs)
    pad = tokenizer.pad_token_id
    classifier = load_sequence_classifier(str(model_dir), tokenizer).train()
    policy = load_causal_lm(str(model_dir), tokenizer).train()
    reference = load_causal_lm(str(model_dir), tokenizer).eval().requires_grad_(False)

    def rm_step(batch: dict) -> None:
        scores = batch_scores(classifier, batch)
        (-torch.nn.functional.logsigmoid(scores[:, 0] - scores[:, 1]).mean()).backward()

    def dpo_step(batch: dict) -> None:
        with torch.no_grad():
            ref = pair_logprobs(reference, batch)
        logps = pair_logprobs(policy, batch)
        h = (logps[:, 0] - ref[:, 0]) - (logps[:, 1] - ref[:, 1])
        (-torch.nn.functional.logsigmoid(0.1 * h).mean()).backward()

    layouts = {"apart": collate_pairs, "rows": collate_pair_rows}
    seconds = {(stage, name): [] for stage in ("rm", "dpo") for name in layouts}
    tokens = {name: 0 for name in layouts}
    for step in range(args.steps):
        group = [pairs[i] for i in step_indices(len(pairs), B, 0, step)]
        for name in (list(layouts) if step % 2 == 0 else list(layouts)[::-1]):
            batch = layouts[name](group, pad)
            tokens[name] += batch["input_ids"].numel()
            for stage, run in (("rm", rm_step), ("dpo", dpo_step)):
                start = time.perf_counter()
                with autocast(args.dtype, "cpu"):
                    run(batch)
                seconds[(stage, name)].append(time.perf_counter() - start)
                classifier.zero_grad(set_to_none=True)
                policy.zero_grad(set_to_none=True)
    print(f"{args.data}: {len(pairs)} pairs, batch {B}, {args.dtype}, {args.threads} threads; padded tokens of the "
          f"rows / apart: {tokens['rows'] / tokens['apart']:.3f}")
    print("\n| step | apart ms | rows ms | speed-up |\n|---|---|---|---|")
    for stage in ("rm", "dpo"):
        apart, rows = (statistics.median(seconds[(stage, n)][2:]) * 1e3 for n in layouts)
        print(f"| {stage} | {apart:.0f} | {rows:.0f} | {apart / rows:.2f}x |")


if __name__ == "__main__":
    main()
