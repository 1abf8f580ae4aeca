"""Where bf16 autocast pays on a CPU: one training step (forward, backward, AdamW) of a 4-layer Llama in float32 and
in bf16 autocast, per hidden size, in fresh processes alternating dtypes. What `--dtype auto`'s width rule
(models.CPU_BF16_MIN_HIDDEN) rests on.

    python benchmarks/bf16_width.py --hidden 128,192,256,384 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def one(hidden: int, dtype: str, steps: int, batch: int, length: int, plain_attention: bool = False) -> float:
    """Median seconds per step of `steps` timed steps after 3 warm-up steps."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhfkit.models import sdpa_float32_on_cpu_bf16_backward

    if not plain_attention:
        sdpa_float32_on_cpu_bf16_backward()  # what rlhfkit's model loaders install
    torch.manual_seed(0)
    heads = max(4, hidden // 64)
    config = LlamaConfig(vocab_size=600, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=4,
                         num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=256)
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, 600, (batch, length))
    times = []
    for i in range(3 + steps):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if i >= 3:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", default="128,192,256,384", help="hidden sizes, comma-separated")
    parser.add_argument("--repeats", type=int, default=2, help="fresh processes per hidden size and dtype")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per process")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--length", type=int, default=48)
    parser.add_argument("--plain-attention", action="store_true",
                        help="transformers' sdpa as is (bf16 attention backward), not rlhfkit's float32 one")
    parser.add_argument("--one", nargs=2, metavar=("HIDDEN", "DTYPE"), help=argparse.SUPPRESS)  # a worker process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(int(args.one[0]), args.one[1], args.steps, args.batch, args.length,
                             args.plain_attention)))
        return
    print("hidden | float32 ms/step | bfloat16 ms/step | bf16 speed-up")
    for hidden in (int(h) for h in args.hidden.split(",")):
        seconds = {"float32": [], "bfloat16": []}
        for _ in range(args.repeats):
            for dtype in seconds:  # alternating, each in a fresh process
                out = subprocess.run([sys.executable, __file__, "--one", str(hidden), dtype, "--steps",
                                      str(args.steps), "--batch", str(args.batch), "--length", str(args.length)]
                                     + ["--plain-attention"] * args.plain_attention,
                                     check=True, capture_output=True, text=True).stdout
                seconds[dtype].append(json.loads(out.splitlines()[-1]))
        fp32, bf16 = (sorted(v)[len(v) // 2] for v in seconds.values())
        print(f"{hidden} | {1000 * fp32:.0f} | {1000 * bf16:.0f} | {fp32 / bf16:.2f}x", flush=True)


if __name__ == "__main__":
    main()
