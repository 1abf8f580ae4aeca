"""What the per-step weight check costs: `nonfinite_parameter` beside one AdamW step and one forward and backward pass,
on a Llama of the chosen size (float32, this machine's CPU threads).

    python benchmarks/finite_check.py --hidden 512 --layers 8 --batch 8 --seq 128
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rlhfkit.training.guards import nonfinite_parameter


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=8000, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=8)
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq))

    def forward_backward():
        model.zero_grad(set_to_none=False)
        model(input_ids=ids, labels=ids).loss.backward()

    forward_backward()
    n = sum(p.numel() for p in model.parameters())
    check = timed(lambda: nonfinite_parameter(model), args.repeats)
    step = timed(optimizer.step, args.repeats)
    passes = timed(forward_backward, max(3, args.repeats // 3))
    print(f"{n / 1e6:.1f}M parameters, {torch.get_num_threads()} threads: weight check {check * 1e3:.1f} ms, "
          f"AdamW step {step * 1e3:.1f} ms, forward+backward ({args.batch}x{args.seq}) {passes * 1e3:.0f} ms; "
          f"the check is {100 * check / (step + passes):.1f}% of a step")


if __name__ == "__main__":
    main()
