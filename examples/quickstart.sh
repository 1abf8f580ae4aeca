#!/usr/bin/env bash
# The three stages end to end on a CPU in a few minutes, offline: make a tiny task, a tokenizer and a small base model
# locally (stand-ins for the pretrained model and data you would bring), then SFT, reward model, evaluation, PPO + PTX.
set -euo pipefail
out=${1:-runs/quickstart}
rm -rf "$out" && mkdir -p "$out"  # a fresh run each time (checkpoints in an old output would stop it)

python - "$out" <<'PY'
import json, random, sys
from pathlib import Path
from rlhfkit.tiny import make_tiny_model, train_tokenizer

out = Path(sys.argv[1])
rng = random.Random(0)
colors = ["red", "blue", "green", "yellow", "purple", "orange"]
facts = {k: colors[k % 6] for k in range(1, 40)}
sft = [{"instruction": f"What color is item {k}?", "input": "", "output": f"Item {k} is {c}."} for k, c in facts.items()]
pairs = []
for _ in range(400):
    k = rng.randint(1, 39)
    bad = rng.choice([" I'm not sure.", f" Item {k} is {rng.choice([c for c in colors if c != facts[k]])}.",
                      f" Item {k} is is is is"])
    pairs.append({"prompt": f"\n\nHuman: What color is item {k}?\n\nAssistant:", "chosen": f" Item {k} is {facts[k]}.",
                  "rejected": bad})
(out / "sft.json").write_text(json.dumps(sft * 4, indent=1))
(out / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
prompts = [{"prompt": f"\n\nHuman: What color is item {k}?\n\nAssistant:"} for k in range(1, 40)]
(out / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
ptx = [{"text": f"Item {k} is {c}."} for k, c in facts.items()]
(out / "ptx.jsonl").write_text("".join(json.dumps(p) + "\n" for p in ptx))
texts = [json.dumps(r) for r in sft] + [p["prompt"] + p["chosen"] + p["rejected"] for p in pairs]
tokenizer = train_tokenizer(texts, out / "base", vocab_size=512)
make_tiny_model("llama", tokenizer, out / "base", hidden=128, layers=4, heads=4)
PY

rlhfkit data check "$out/pairs.jsonl" --kind preference --tokenizer "$out/base"
rlhfkit sft --model "$out/base" --data "$out/sft.json" --output "$out/sft" --max-steps 100 --batch-size 16 \
    --lr 1e-3 --eval-every 50 --save-every 50
rlhfkit rm --model "$out/sft/final" --data "$out/pairs.jsonl" --output "$out/rm" --max-steps 60 --batch-size 16 \
    --lr 3e-4 --eval-split 0.1 --eval-every 25 --save-every 50
rlhfkit eval-rm --model "$out/rm/final" --data "$out/pairs.jsonl" --show 8
rlhfkit ppo --actor "$out/sft/final" --reward "$out/rm/final" --prompts "$out/prompts.jsonl" \
    --ptx-data "$out/ptx.jsonl" --output "$out/ppo" --max-steps 20 --batch-size 16 --max-new-tokens 16 \
    --lr 2e-5 --critic-lr 1e-4 --save-every 10 --sample-every 10 --num-samples 4
