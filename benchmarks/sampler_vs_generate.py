"""rlhfkit's rollout sampler against transformers' `generate`: response tokens per second by batch size and response
length, on the PPO benchmark's models, in one process.

    python benchmarks/sampler_vs_generate.py --config M [--dtype bfloat16] [--repeats 3]

Both sides sample the same prompts with the same seed at temperature 1 (the sampler gives `generate`'s tokens, so
they do the same work); the calls alternate (sampler, generate, sampler, ...) and the table gives medians. Two
response-length regimes:
- "full": EOS is made impossible (its logit -inf), every response runs to the length asked for;
- "early": EOS is made likely (a bias on its logit), so responses end at different steps, as an RL batch does; the
  sampler drops finished rows from its batch, `generate` carries them to the end.
The last columns compare the model FLOPs of the work (one forward pass over prompt + response per row) with the
matrix-product rate measured here, and the time of the model's forward passes alone (prefill and one call per step for
every row, no sampling or stopping: the floor for any sampler that calls the model) with the sampler's; `--profile`
prints one decoding step's time split by operator for the largest case.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ppo_vs_trl import CONFIGS, build, matmul_rate  # noqa: E402  (the same models and prompts)


def load(work: Path, eos_bias: float | None, vocab: int | None = None):
    """The actor with an EOS bias in its head; with `vocab`, its embeddings and head widened to that many tokens, the
    added ones never sampled (logit -inf) but paid for, as a real tokenizer's are, by every draw over the vocabulary."""
    from rlhfkit.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(str(work / "actor"))
    model = load_causal_lm(str(work / "actor"), tokenizer).eval()
    if vocab:
        model.resize_token_embeddings(vocab, mean_resizing=False)
    head = model.get_output_embeddings()
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.zero_()
        biased.bias[tokenizer.eos_token_id] = float("-inf") if eos_bias is None else eos_bias
        biased.bias[len(tokenizer):] = float("-inf")
    model.set_output_embeddings(biased)
    return model, tokenizer


def timed_call(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def run_case(model, tokenizer, prompts, new_tokens: int, dtype: torch.dtype, repeats: int, group: int = 1) -> dict:
    from rlhfkit.rl import rollout as rollout_module
    from rlhfkit.rl.rollout import Sampling, generate

    sampling = Sampling(max_new_tokens=new_tokens, temperature=1.0, samples_per_prompt=group)

    def ours():
        torch.manual_seed(0)
        return generate(model, prompts, tokenizer, sampling)

    def theirs():
        torch.manual_seed(0)
        saved = rollout_module.driver
        rollout_module.driver = lambda m: "benchmark"
        try:
            return generate(model, prompts, tokenizer, sampling)
        finally:
            rollout_module.driver = saved

    times: dict[str, list[float]] = {"sampler": [], "generate": [], "forward": []}
    tokens = {}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        ours()  # warm-up (allocator, kernels)
        for _ in range(repeats):
            for name, fn in (("sampler", ours), ("generate", theirs)):
                seconds, rollout = timed_call(fn)
                times[name].append(seconds)
                tokens[name] = int(rollout.response_mask.sum())
                tokens[name + "_rollout"] = rollout
            steps = tokens["sampler_rollout"].response_mask.shape[1]
            every_row = [p for p in prompts for _ in range(group)]
            times["forward"].append(timed_call(lambda: forward_only(model, tokenizer, every_row, steps))[0])
    same = torch.equal(tokens["sampler_rollout"].input_ids, tokens["generate_rollout"].input_ids)
    r = tokens["sampler_rollout"]
    return {"sampler_s": statistics.median(times["sampler"]), "generate_s": statistics.median(times["generate"]),
            "forward_s": statistics.median(times["forward"]), "tokens": tokens["sampler"], "same_tokens": same,
            "prompt_len": float(r.attention_mask[:, :r.prompt_len].sum(-1).float().mean()),
            "response_len": float(r.response_mask.sum(-1).float().mean())}


@torch.no_grad()
def forward_only(model, tokenizer, prompts, steps: int) -> None:
    """The model's forward passes alone, as many as the sampler ran, every row to the end (no sampling, no
    stopping): the least time any sampler that calls the model's forward can take for the full regime."""
    from rlhfkit.models import position_ids
    from rlhfkit.rl.rollout import left_pad
    from rlhfkit.rl.sampler import buffer_cache, driver

    drive = driver(model)
    ids, mask = left_pad(prompts, tokenizer.pad_token_id)
    P = ids.shape[1]
    cache = buffer_cache(drive.n_layers, P + steps)
    positions = position_ids(mask)
    logits = drive.forward(model, ids, mask, positions, cache, keep_last=True)
    full = torch.ones((len(prompts), P + steps), dtype=mask.dtype)
    full[:, :P] = mask
    position = positions[:, -1:] + 1
    for t in range(steps - 1):
        logits = drive.forward(model, logits.argmax(-1, keepdim=True), full[:, :P + t + 1], position, cache,
                               keep_last=False)
        position = position + 1


def forward_flops(cfg: dict, vocab: int, rows: int, prompt_len: float, response_len: float) -> float:
    """One forward pass over prompt + response per row (what generation with a KV cache computes): the matrix
    products of the blocks, attention over the causal half, and the output head at every response position."""
    h, layers, ffn = cfg["hidden"], cfg["layers"], cfg["ffn"]
    T = prompt_len + response_len
    block = layers * (4 * h * h + 3 * h * ffn)
    return rows * (2 * block * T + 2 * layers * h * T * T + 2 * h * vocab * (response_len + 1))


def step_profile(model, tokenizer, prompts, new_tokens: int, dtype: torch.dtype) -> list[tuple[str, float]]:
    """(operator, ms per decoding step) for the sampler's decoding steps, largest first."""
    from torch.profiler import ProfilerActivity, profile

    from rlhfkit.rl.rollout import Sampling, generate

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            torch.manual_seed(0)
            generate(model, prompts, tokenizer, Sampling(max_new_tokens=new_tokens, temperature=1.0))
    rows = [(e.key, e.self_cpu_time_total / 1000 / new_tokens) for e in prof.key_averages()]
    return sorted(rows, key=lambda r: -r[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="S")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--batches", default="1,16,64", help="prompts per call")
    parser.add_argument("--lengths", default="32,128", help="new tokens per response")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--group", type=int, default=1, help="samples per prompt (GRPO's G): each call samples G "
                        "responses to each of prompts / G prompts (generate: num_return_sequences)")
    parser.add_argument("--vocab", type=int, help="widen the model's vocabulary to this many tokens (a real "
                        "tokenizer's size: 32000, 151936); the tokens added are never sampled")
    parser.add_argument("--eos-bias", type=float, default=2.5, help="EOS logit bias of the 'early' regime")
    parser.add_argument("--profile", action="store_true", help="also split one decoding step by operator")
    parser.add_argument("--matmul-size", type=int, default=1024, help="n of the n x n x n product timed for the rate")
    parser.add_argument("--out", default="runs/bench-sampler")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = CONFIGS[args.config]
    dtype = getattr(torch, args.dtype)
    work = Path(args.out) / args.config
    batches, lengths = [int(b) for b in args.batches.split(",")], [int(n) for n in args.lengths.split(",")]
    facts = build(work, {**cfg, "prompts": max(batches)}, 0)
    facts["vocab"] = max(facts["vocab"], args.vocab or 0)
    prompt_ids = json.loads((work / "prompt_ids.json").read_text())
    rate = matmul_rate(dtype, args.threads, args.matmul_size)
    import transformers

    print(f"config {args.config}: Llama hidden {cfg['hidden']}, {cfg['layers']} layers, FFN {cfg['ffn']}, vocab "
          f"{facts['vocab']}; {args.group} sample(s) per prompt; {args.dtype}; {args.threads} threads; torch "
          f"{torch.__version__}, transformers {transformers.__version__}; matrix-product rate {rate:.0f} GFLOP/s\n")
    print("| regime | rows | new tokens | mean response | sampler tok/s | generate tok/s | speed-up | same tokens "
          "| sampler share of the matmul rate | generate share | forward passes alone, share of sampler time |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    results = []
    for regime, bias in (("full", None), ("early", args.eos_bias)):
        model, tokenizer = load(work, bias, args.vocab)
        for batch in batches:
            for new_tokens in lengths:
                prompts = max(1, batch // args.group)
                rows = prompts * args.group  # what is sampled: `batch` rounded to whole groups
                m = run_case(model, tokenizer, prompt_ids[:prompts], new_tokens, dtype, args.repeats, args.group)
                flops = forward_flops(cfg, facts["vocab"], rows, m["prompt_len"], m["response_len"])
                m.update(regime=regime, batch=rows, new_tokens=new_tokens)
                results.append(m)
                print(f"| {regime} | {rows} | {new_tokens} | {m['response_len']:.0f} | "
                      f"{m['tokens'] / m['sampler_s']:.0f} | {m['tokens'] / m['generate_s']:.0f} | "
                      f"{m['generate_s'] / m['sampler_s']:.2f}x | {m['same_tokens']} | "
                      f"{flops / m['sampler_s'] / 1e9 / rate:.0%} | {flops / m['generate_s'] / 1e9 / rate:.0%} | "
                      f"{m['forward_s'] / m['sampler_s']:.0%} |", flush=True)
    (work / f"sampler-{args.dtype}.json").write_text(json.dumps({"rate": rate, "results": results}, indent=2))
    if args.profile:
        model, tokenizer = load(work, None, args.vocab)
        batch, new_tokens = max(batches), max(lengths)
        print(f"\none decoding step of the sampler ({batch} rows, {new_tokens} new tokens), self time by operator:")
        for name, ms in step_profile(model, tokenizer, prompt_ids[:batch], new_tokens, dtype)[:12]:
            print(f"  {name:40s} {ms:7.2f} ms")


if __name__ == "__main__":
    main()
