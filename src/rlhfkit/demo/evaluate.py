"""The demo's gold evaluation, as tasks the scheduler can run in workers while other stages still train: each model's
answers to the held-out prompts scored by the reward model and the gold judge, with its KL to SFT and corpus loss
(`judge`); the RL runs' snapshots on the first held-out prompts (`judge_snapshots`, Gao et al.'s over-optimisation
picture); the reward model on the held-out pairs (`check_reward_model`). `summarize` turns their results into
summary.json's numbers. Each model's answers depend only on its own task (sampling is seeded per model), so the
numbers are the same whichever worker runs which task, as long as each runs on the same number of threads."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from rlhfkit.data.encode import EncodeStats, encode_conversation
from rlhfkit.data.loading import load_examples
from rlhfkit.demo.task import Facts, gold_score
from rlhfkit.models import default_device, load_causal_lm, load_tokenizer
from rlhfkit.training.lm_loss import evaluate

RL_BRANCHES = ("ppo", "grpo", "grpo_gold")  # those with snapshots along training


@dataclass(frozen=True)
class Judging:
    """One model's part of the evaluation. `model`: its folder (for `judge_snapshots`, the run folder whose snapshots
    are judged); `first`: judge on the first `first` prompts only (0: all); `samples`: answers per prompt; `sft`: also
    its KL to this model; `corpus`: also its loss on this file."""
    name: str
    model: str
    prompts: str
    reward_model: str
    seed: int
    max_new_tokens: int
    samples: int = 1
    first: int = 0
    sft: str = ""
    corpus: str = ""


@dataclass(frozen=True)
class RewardCheck:
    """The reward model's accuracy on held-out pairs, with `rlhfkit eval-rm`'s table written to `table`."""
    reward_model: str
    pairs: str
    table: str


def tasks(out: Path, files: dict[str, Path], seed: int, max_new_tokens: int, branches: list[str], samples: int,
          trajectory_prompts: int) -> dict[str, tuple]:
    """name -> (function, its record, the stages it waits for). Every model is judged on every held-out prompt
    (`samples` draws each); SFT, the RL runs' snapshots and DPO's final model also on the first `trajectory_prompts`
    (one draw)."""
    sft, rm = str(out / "sft" / "final"), str(out / "rm" / "final")
    common = dict(prompts=str(files["eval_prompts"]), reward_model=rm, seed=seed, max_new_tokens=max_new_tokens)
    found = {"check-rm": (check_reward_model, RewardCheck(rm, str(files["eval_pairs"]),
                                                          str(out / "eval" / "eval_rm.json")), ("rm",))}
    found["judge-base"] = (judge, Judging("base", str(out / "pretrain" / "final"), samples=samples, **common),
                           ("pretrain", "rm"))
    found["judge-sft"] = (judge, Judging("sft", sft, samples=samples, corpus=str(files["corpus"]), **common),
                          ("sft", "rm"))
    for name in branches:
        found[f"judge-{name}"] = (judge, Judging(name, str(out / name / "final"), samples=samples, sft=sft,
                                                 corpus=str(files["corpus"]), **common), (name, "sft", "rm"))
    found["line-sft"] = (judge, Judging("sft", sft, first=trajectory_prompts, **common), ("sft", "rm"))
    for name in branches:
        snapshots = name in RL_BRANCHES  # DPO, trained offline, is one point: its final model
        record = Judging(name, str(out / name) if snapshots else str(out / name / "final"), first=trajectory_prompts,
                         sft=sft, **common)
        found[f"line-{name}"] = (judge_snapshots if snapshots else judge, record, (name, "sft", "rm"))
    return found


def check_reward_model(task: RewardCheck) -> float:
    from rlhfkit.rm.evaluate import EvalRMConfig, run_eval_rm

    Path(task.table).parent.mkdir(parents=True, exist_ok=True)
    metrics = run_eval_rm(EvalRMConfig(model=task.reward_model, data=[task.pairs], max_len=96, batch_size=64, show=5,
                                       dtype="float32", output=task.table))
    return metrics["accuracy"]


def judge(task: Judging) -> dict:
    """The model's answers (each with its reward-model and gold scores), its KL to SFT and corpus loss when asked."""
    prompts = load_examples([task.prompts], "prompt").examples
    drawn = (prompts[:task.first] if task.first else prompts) * task.samples  # draw j of prompt i at j * n + i
    rows = sample_and_judge({task.name: Path(task.model)}, drawn, task.seed, task.max_new_tokens,
                            Path(task.reward_model))
    answers = [row["responses"][task.name] for row in rows]
    return {"answers": answers,
            "kl": kl_to_sft(Path(task.model), Path(task.sft), drawn, answers) if task.sft else None,
            "corpus_loss": corpus_loss(Path(task.model), Path(task.corpus)) if task.corpus else None}


def judge_snapshots(task: Judging) -> list[tuple[int, dict]]:
    """`judge` on each snapshot of the run in `task.model` (RUN/snapshots/step-N), as (N, result) in step order."""
    found = []
    for folder in sorted((Path(task.model) / "snapshots").glob("step-*")):
        step = int(folder.name.removeprefix("step-"))
        found.append((step, judge(replace(task, name=f"{task.name}@{step}", model=str(folder)))))
    return found


def summarize(results: dict, out: Path, files: dict[str, Path], branches: list[str], samples: int) -> dict:
    """summary.json's evaluation numbers from the tasks' results; writes eval/compare.json (`rlhfkit compare`'s table
    with gold scores; row j * n + i is draw j of prompt i, n prompts)."""
    from rlhfkit.tools.compare import prompt_text

    prompts = load_examples([str(files["eval_prompts"])], "prompt").examples
    names = ["base", "sft", *branches]
    judged = {name: results[f"judge-{name}"] for name in names}
    models = {"base": out / "pretrain" / "final", "sft": out / "sft" / "final",
              **{name: out / name / "final" for name in branches}}
    rows = [{"prompt": prompt_text(p), "responses": {name: judged[name]["answers"][i] for name in names}}
            for i, p in enumerate(prompts * samples)]
    (out / "eval").mkdir(exist_ok=True)
    (out / "eval" / "compare.json").write_text(json.dumps({"models": {k: str(v) for k, v in models.items()},
                                                           "rows": rows}, indent=1, ensure_ascii=False))
    gold = {name: [a["gold"] for a in judged[name]["answers"]] for name in names}
    return {
        "gold": {name: mean_ci(per_prompt(values, len(prompts))) for name, values in gold.items()},
        "rm_score": {name: mean([a["score"] for a in judged[name]["answers"]]) for name in names},
        "win_rate": {"sft_vs_base": win_rate(gold["sft"], gold["base"]),
                     **{f"{name}_vs_sft": win_rate(gold[name], gold["sft"]) for name in branches}},
        "kl_to_sft": {name: judged[name]["kl"] for name in branches},
        "response_tokens": {name: mean([a["n_tokens"] for a in judged[name]["answers"]]) for name in names},
        "eos_rate": {name: mean([float(a["stopped"]) for a in judged[name]["answers"]]) for name in names},
        "rm_accuracy": results["check-rm"],
        "corpus_loss": {name: judged[name]["corpus_loss"] for name in ["sft", *branches]},
        "eval_prompts": len(prompts),
        "eval_samples": samples,
        "trajectories": trajectories(results, branches),
    }


def trajectories(results: dict, branches: list[str]) -> dict[str, list[dict]]:
    """Gao et al.'s over-optimisation picture: for each RL run, the gold and reward-model scores of its snapshots
    against their KL to SFT, on the same held-out prompts (with the same sampling seed, so the points differ by the
    policy, not by the draw); SFT is every line's first point, at KL 0. DPO, trained offline, is one point: its final
    model."""
    def point(iteration: int, result: dict) -> dict:
        kl = result["kl"] or 0.0
        return {"iteration": iteration, "kl": kl, "sqrt_kl": math.sqrt(max(kl, 0.0)),
                "gold": mean([a["gold"] for a in result["answers"]]),
                "rm_score": mean([a["score"] for a in result["answers"]])}

    lines = {}
    for name in branches:
        if name in RL_BRANCHES:
            lines[name] = [point(0, results["line-sft"]), *(point(step, r) for step, r in results[f"line-{name}"])]
        else:
            lines[name] = [point(DPO_POINT, results[f"line-{name}"])]
    return lines


def sample_and_judge(models: dict[str, Path], prompts: list, seed: int, max_new_tokens: int, rm_dir: Path
                     ) -> list[dict]:
    """`rlhfkit compare`'s rows (one answer per prompt and model, sampled at temperature 1, with its reward-model
    score), each answer also scored by the gold judge."""
    from rlhfkit.tools.compare import compare_models

    # 120 rows per generate call, not 48: the demo's evaluate stage (4 answers per prompt) took 64.9 s instead of 76.5
    rows = compare_models({name: str(path) for name, path in models.items()}, prompts, temperature=1.0, seed=seed,
                          max_new_tokens=max_new_tokens, batch_size=120, reward_model=str(rm_dir))
    for p, row in zip(prompts, rows):
        facts = Facts(**{k: p.extra[k] for k in ("color", "place", "size")})
        for response in row["responses"].values():
            response["gold"] = gold_score(p.prompt[-1].content, response["text"], facts)
    return rows



DPO_POINT = -1  # the "iteration" of DPO's one point: it has no iterations


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def per_prompt(values: list[float], n: int) -> list[float]:
    """Each of n prompts' mean over its draws (values: draw j of prompt i at j * n + i): the units of the CI, as the
    draws of one prompt are not independent of each other."""
    return [mean(values[i::n]) for i in range(n)]


def mean_ci(values: list[float]) -> dict[str, float]:
    """Mean and the half-width of its normal 95% confidence interval."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "ci95": 1.96 * std / math.sqrt(n)}


def win_rate(a: list[float], b: list[float]) -> float:
    """Share of pairs where a's response beats b's (paired by prompt and draw; a tie counts half)."""
    return sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b)) / len(a)


@torch.no_grad()
def kl_to_sft(model_dir: Path, sft_dir: Path, prompts: list, responses: list[dict]) -> float:
    """KL(model || SFT) per response, estimated on the model's own held-out responses: the mean over prompts of
    sum_t log pi(y_t) - log pi_sft(y_t) (sampled at temperature 1 from the model, so this is unbiased). y: the sampled
    tokens (`ids`), not the text tokenised again, which gives other tokens for 1-3% of the demo's answers."""
    from rlhfkit.data.encode import encode_prompt
    from rlhfkit.data.templates import resolve_template
    from rlhfkit.rl.rollout import left_pad, response_logprobs

    tokenizer = load_tokenizer(str(model_dir))
    template = resolve_template("auto", tokenizer)
    prompt_ids = [encode_prompt(p, tokenizer, template, 512, EncodeStats()) for p in prompts]
    response_ids = [r["ids"] for r in responses]
    total = 0.0
    device = default_device()
    models = [load_causal_lm(str(path), tokenizer).to(device).eval() for path in (model_dir, sft_dir)]
    for start in range(0, len(prompts), 48):
        part = range(start, min(start + 48, len(prompts)))
        ids, attn = left_pad([prompt_ids[i] for i in part], tokenizer.pad_token_id)
        width = max(1, max(len(response_ids[i]) for i in part))
        resp = torch.full((len(part), width), tokenizer.pad_token_id)
        mask = torch.zeros((len(part), width), dtype=torch.long)
        for row, i in enumerate(part):
            resp[row, :len(response_ids[i])] = torch.tensor(response_ids[i], dtype=torch.long)
            mask[row, :len(response_ids[i])] = 1
        ids, attn, resp, mask = (t.to(device) for t in (ids, attn, resp, mask))
        full, full_attn = torch.cat([ids, resp], 1), torch.cat([attn, mask], 1)
        policy, sft = (response_logprobs(m, full, full_attn, ids.shape[1], 1.0)[0] for m in models)
        total += ((policy - sft) * mask).sum().item()
    return total / len(prompts)


@torch.no_grad()
def corpus_loss(model_dir: Path, corpus: Path) -> float:
    tokenizer = load_tokenizer(str(model_dir))
    rows = load_examples([str(corpus)], "text").examples[:500]
    encoded = [e for e in (encode_conversation(c, tokenizer, "human-assistant", 96, EncodeStats()) for c in rows) if e]
    model = load_causal_lm(str(model_dir), tokenizer).to(default_device())
    return evaluate(model, encoded, tokenizer.pad_token_id, 32, "float32")["loss"]


