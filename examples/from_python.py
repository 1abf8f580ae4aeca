"""The quickstart's task from Python, as in a notebook: data built in memory, a reward function defined here, each
stage a function call whose result feeds the next. About 20 seconds on 2 CPU cores, offline.

    python examples/from_python.py [OUTPUT]        # default runs/from_python
"""

import random
import sys
from pathlib import Path

import rlhfkit
from rlhfkit.tiny import make_tiny_model, train_tokenizer

out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/from_python")
rng = random.Random(0)
colors = ["red", "blue", "green", "yellow", "purple", "orange"]
facts = {k: colors[k % 6] for k in range(1, 40)}

# 1. The task, in memory: demonstrations, preference pairs, prompts with the answer as a column for the reward function.
demos = [{"instruction": f"What color is item {k}?", "input": "", "output": f"Item {k} is {c}."}
         for k, c in facts.items()]
pairs = []
for _ in range(400):
    k = rng.randint(1, 39)
    bad = rng.choice([" I'm not sure.", f" Item {k} is {rng.choice([c for c in colors if c != facts[k]])}.",
                      f" Item {k} is is is is"])
    pairs.append({"prompt": f"\n\nHuman: What color is item {k}?\n\nAssistant:", "chosen": f" Item {k} is {facts[k]}.",
                  "rejected": bad})
prompts = [{"prompt": [{"role": "user", "content": f"What color is item {k}?"}], "answer": c}
           for k, c in facts.items()]

# 2. A small base model and tokenizer made here (the stand-ins for the model you would bring).
texts = [d["instruction"] + " " + d["output"] for d in demos]
texts += [p["prompt"] + p["chosen"] + p["rejected"] for p in pairs]
tokenizer = train_tokenizer(texts, out / "base", vocab_size=512)
make_tiny_model("llama", tokenizer, out / "base", hidden=128, layers=4, heads=4)


# 3. A verifiable reward: does the answer name the item's color? (`answer` is a column of the prompt rows.)
def exact(prompts, responses, answer):
    return [float(a in r) for r, a in zip(responses, answer)]


# 4. The stages. Every keyword argument is the command's flag (help(rlhfkit.grpo) lists them); a Run stands for its
#    final model where the next stage takes one.
sft = rlhfkit.sft(model=out / "base", data=demos * 4, output=str(out / "sft"), max_steps=100, batch_size=16, lr=1e-3,
                  save_every=0, overwrite=True)
rm = rlhfkit.rm(model=sft, data=pairs, output=str(out / "rm"), max_steps=60, batch_size=16, lr=3e-4, eval_split=0.1,
                save_every=0, overwrite=True)
print("reward model accuracy on held-out pairs:", rlhfkit.eval_rm(model=rm, data=pairs[:100]).result["accuracy"])
grpo = rlhfkit.grpo(actor=sft, reward_fn=[exact], prompts=prompts, output=str(out / "grpo"), max_steps=20,
                    batch_size=8, num_generations=8, max_new_tokens=12, lr=1e-4, save_every=0, overwrite=True)
first, last = grpo.metrics[0]["reward"], grpo.metrics[-1]["reward"]
print(f"GRPO reward (share of answers with the right color): {first:.2f} at iteration 1, {last:.2f} at "
      f"{len(grpo.metrics)}; final model: {grpo.final}")
