"""`rlhfkit demo`: the whole pipeline offline on a CPU, on a task whose true preference is known.

The demo is a configuration, not a second implementation: each stage is the same `run_sft` / `run_rm` / `run_ppo` /
`run_grpo` / `run_dpo` a user's command runs, with the config written beside its results. Steps: 0 data and
tokenizer, 1 pretrain a small Llama on the corpus (standing in for the model a user brings), 2 SFT, 3 reward model,
4 PPO with PTX, 5 GRPO with PTX from the SFT model twice: on the reward model, and on the gold judge itself as a
verifiable reward function, 6 DPO from the SFT model on the reward model's preference pairs, 7 gold evaluation of
base, SFT and every branch on held-out prompts, and of the RL runs' snapshots along training (the over-optimisation
picture), summary.json and the report.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from rlhfkit.config import make_config, option, require, require_seed, to_dict
from rlhfkit.demo.evaluate import summarize
from rlhfkit.demo.evaluate import tasks as eval_tasks
from rlhfkit.demo.report import comparison, write_report
from rlhfkit.demo.schedule import run_stages
from rlhfkit.demo.task import make_task
from rlhfkit.dpo.train import DPOConfig, run_dpo
from rlhfkit.grpo.config import GRPOConfig
from rlhfkit.grpo.train import run_grpo
from rlhfkit.models import DTYPES, default_device, resolve_dtype
from rlhfkit.ppo.config import PPOConfig
from rlhfkit.ppo.train import run_ppo
from rlhfkit.rm.train import RMConfig, run_rm
from rlhfkit.sft.train import SFTConfig, run_sft
from rlhfkit.tiny import make_tiny_model, train_tokenizer
from rlhfkit.training.common import log, setup_logging


BRANCHES = ("ppo", "grpo", "grpo_gold", "dpo")  # the models tuned from the SFT model
SERIAL = ("pretrain", "sft")  # each needs the one before; the stages after them run `jobs` at a time
# The order in which waiting stages take a free worker: the reward model first (PPO and GRPO wait on it), then the
# longest. On 2 cores: rm ‖ dpo, then ppo ‖ grpo_gold, then grpo.
PRIORITY = ("rm", "dpo", "ppo", "grpo", "grpo_gold")
# What each stage's result depends on besides its own config: under --resume a stage is kept only if these were too.
DEPENDS = {"pretrain": ("data",), "sft": ("pretrain",), "rm": ("sft",), "ppo": ("sft", "rm"), "grpo": ("sft", "rm"),
           "grpo_gold": ("sft",), "dpo": ("sft",)}


@dataclass
class DemoConfig:
    output: str = option("runs/demo", "folder for the data, every stage's run and the report")
    seed: int = option(0, "seed of the task (facts, data) and of every stage")
    quick: bool = option(False, "a much smaller run (the test suite's): same stages, far fewer steps")
    algorithms: list[str] = option(list(BRANCHES), "the models tuned from SFT and compared: ppo, grpo (the reward "
                                                   "model as reward), grpo_gold (the gold judge as a verifiable "
                                                   "reward function), dpo; e.g. --algorithms ppo,dpo")
    dtype: str = option("auto", "compute dtype of every stage (the evaluation is float32): auto picks bfloat16 where "
                                "the CPU or GPU multiplies bf16 natively and the model is wide enough to gain",
                        choices=DTYPES)
    threads: int = option(0, "CPU threads torch uses (0 = its default, one per core); a seed's numbers repeat "
                             "exactly for the same threads, jobs and dtype on one machine")
    jobs: int = option(0, "stages trained at once after SFT, each in a worker process on threads / jobs threads (0 = "
                          "2 in bfloat16 on a CPU with 2 or more threads, else 1; 1 = one after another in this "
                          "process): in bf16 the demo's small stages keep one core busy, not two")
    resume: bool = option(False, "keep each stage of an earlier run in --output that finished with the same config "
                                 "on the same data and inputs (after a crash, or after changing a later stage's "
                                 "settings); the others and the evaluation rerun")

    def check(self) -> None:
        require_seed(self.seed)
        unknown = [name for name in self.algorithms if name not in BRANCHES]
        require(not unknown, f"algorithms: unknown {', '.join(unknown)}; choose from {', '.join(BRANCHES)}")
        require(bool(self.algorithms), f"algorithms: give one or more of {', '.join(BRANCHES)}")
        require(len(set(self.algorithms)) == len(self.algorithms), "algorithms: each name once")
        require(self.threads >= 0, f"threads: must be >= 0, got {self.threads}")
        require(self.jobs >= 0, f"jobs: must be >= 0, got {self.jobs}")
        require(not self.threads or self.jobs <= self.threads,
                f"jobs: {self.jobs} workers need at least as many threads, got threads {self.threads}")
        require(not Path(self.output).exists() or Path(self.output).is_dir(),
                f"output: {self.output} is a file, not a folder")


# Stage settings. Full: about the 10-minute budget on 2 CPU cores; quick: well under a minute of training.
MODEL = {"full": dict(hidden=128, layers=4, heads=4, ffn=512), "quick": dict(hidden=32, layers=2, heads=4, ffn=64)}
# snapshots: the RL runs write their policy this many times along training, for the over-optimisation picture;
# trajectory_prompts: the held-out prompts those snapshots are evaluated on (the first ones, the same for all);
# eval_samples: answers each model samples per held-out prompt. With one, a win rate on 240 prompts has a standard
# error of about 0.03: GRPO (RM) on seed 1 (2 threads, bf16) won 0.646 / 0.690 / 0.688 / 0.698 with sampling seeds
# 1-4, failing the 0.65 bar on one draw; four answers per prompt cut that error (by up to half: the draws of one
# prompt are correlated).
STEPS = {"full": dict(pretrain=400, sft=300, rm=600, ppo=70, grpo=50, dpo=250, eval_prompts=240, eval_samples=4,
                      snapshots=5, trajectory_prompts=96),
         "quick": dict(pretrain=20, sft=10, rm=10, ppo=3, grpo=2, dpo=3, eval_prompts=24, eval_samples=2,
                       snapshots=2, trajectory_prompts=8)}


def stage_configs(data: dict[str, Path], out: Path, seed: int, size: str, dtype: str = "float32") -> dict[str, dict]:
    steps = STEPS[size]
    # A demo run rebuilds everything from its seed, so running it again into the same folder replaces the last one.
    common = dict(seed=seed, save_every=0, log_every=1, overwrite=True, dtype=dtype)
    stages = {
        "pretrain": dict(common, model=str(out / "init"), data=[str(data["corpus"])], output=str(out / "pretrain"),
                         loss_on="all", max_steps=steps["pretrain"], batch_size=32, lr=3e-3, warmup_steps=20,
                         max_len=96, eval_split=0.02, eval_every=100),
        "sft": dict(common, model=str(out / "pretrain" / "final"), data=[str(data["sft"])], output=str(out / "sft"),
                    max_steps=steps["sft"], batch_size=32, lr=1e-3, warmup_steps=10, max_len=96, eval_split=0.05,
                    eval_every=100),
        # lr 1e-3 on 4,000 pairs reached 0.846 / 0.842 held-out accuracy on seeds 0 / 2 (0.913 on seed 0 in bf16:
        # a knife edge); lr 3e-4 reached 0.883 / 0.933, and with 8,000 pairs (each seen 1.6 times instead of 3.2, so
        # fewer repeats of the flipped labels) 0.950 / 0.863 on seeds 0 / 1. lr 5e-4 after 10 warm-up steps reached
        # 0.871-0.983 on 19 of 20 rows (seeds 0-4, 1 and 2 threads, float32 and bf16) but stalled near chance on
        # seed 1, 1 thread, bf16 (0.604; loss ~0.65 for 370 steps). 40 warm-up steps: 0.887 there, 0.925 on seed 4, 1
        # thread, bf16, where 3e-4 after 40 steps (which fixed seed 1: 0.887) reached only 0.829, a constant 3e-4
        # 0.842, and 3e-4 over 600 steps 0.913 (0.921 on seed 1, for 50% more time). 600 steps, not 400: at 0.887
        # seed 1 (1 thread, bf16) failed PPO and GRPO (RM), 0.644 / 0.642 over SFT; 600 steps reached 0.917 there and
        # lifted them to 0.743 / 0.717 (seed 4, same setting: 0.938, 0.721 / 0.699 against 0.726 / 0.667).
        "rm": dict(common, model=str(out / "sft" / "final"), data=[str(data["pairs"])], output=str(out / "rm"),
                   eval_data=[str(data["eval_pairs"])], max_steps=steps["rm"], batch_size=32, lr=5e-4,
                   warmup_steps=40, max_len=96, eval_every=50),
        "ppo": dict(common, actor=str(out / "sft" / "final"), reward=str(out / "rm" / "final"),
                    prompts=[str(data["prompts"])], ptx_data=[str(data["corpus"])],
                    monitor_fn="rlhfkit.demo.task:gold_reward", output=str(out / "ppo"), max_steps=steps["ppo"],
                    batch_size=32, mini_batch_size=16, ppo_epochs=2, max_new_tokens=48, lr=1e-4, critic_lr=1e-4,
                    kl_coef=0.2, ptx_coef=0.5, max_len=96, lr_schedule="constant", sample_every=10, num_samples=4,
                    snapshot_every=max(1, steps["ppo"] // steps["snapshots"])),
        # 8 prompts x 8 samples per iteration, two optimizer steps each (one step per iteration won 0.650-0.654
        # over SFT on seeds 0 and 1, two won 0.69-0.72). 50 iterations: 40 won 0.719 / 0.679 / 0.735 / 0.731 / 0.617
        # on seeds 0-4, 50 won 0.692 / 0.671 / 0.708 / 0.704 / 0.671, and lr 1.5e-4 (40) 0.669 / 0.658 / 0.746 /
        # 0.700 / 0.608. At lr 2e-4 (or with Dr.GRPO's unscaled advantages) the reward
        # model was exploited within 40 iterations on seed 0: responses of 3-5 tokens that it scores high and the gold
        # judge low. KL weight 0.15, not 0.1: on seed 1 (bf16; 2 threads, stages 2 at a time) GRPO (RM) drifted to KL
        # 2.9 while its gold score stayed flat from iteration 20 (over-optimisation) and won 0.648; 0.15 won 0.670
        # (KL 1.35), 0.2 0.670. On seed 0 (same setting) 0.1 / 0.15 / 0.2 won 0.719 / 0.695 / 0.677, and on seed 1,
        # 1 thread, 0.1 / 0.2 won 0.660 / 0.688. Two passes over each batch at lr 7e-5 (4 optimizer steps per
        # iteration, 30 s more of one thread's work): with pair rows in the reward model (other float rounding), one
        # pass at 1e-4 won 0.641 / 0.670 / 0.690 / 0.681 / 0.686 on seeds 0-4 (2 threads, bf16) and two passes at 7e-5
        # 0.706 / 0.669 / 0.712 / 0.685 / 0.654 (seed 0 in float32: 0.716, 0.713). On seeds 0 / 1, neither a cosine
        # decay (0.668 / 0.640), 16 prompts x 4 (0.657 / 0.628), std_eps 0.5 (0.651 / 0.644), two passes at 1e-4
        # (0.651 / 0.689) nor REINFORCE++-baseline's batch-whitened advantages (0.664 / 0.666) did better.
        "grpo": dict(common, actor=str(out / "sft" / "final"), reward=str(out / "rm" / "final"),
                     prompts=[str(data["prompts"])], ptx_data=[str(data["corpus"])],
                     monitor_fn="rlhfkit.demo.task:gold_reward", output=str(out / "grpo"), max_steps=steps["grpo"],
                     batch_size=8, num_generations=8, mini_batch_size=32, ppo_epochs=2, max_new_tokens=48, lr=7e-5,
                     kl_coef=0.15, ptx_coef=0.5, max_len=96, lr_schedule="constant", sample_every=10, num_samples=4,
                     snapshot_every=max(1, steps["grpo"] // steps["snapshots"])),
    }
    stages["grpo_gold"] = dict(stages["grpo"], reward="", reward_fn=["rlhfkit.demo.task:gold_reward"], monitor_fn="",
                               output=str(out / "grpo_gold"))
    # One epoch of the reward model's 8,000 pairs at beta 1.0. Tuned on SFT models of seeds 0 and 1 at lr 1e-4: on 4,000
    # pairs, beta 0.1 / 0.3 / 1.0 / 2.0 won 0.575 / 0.613 / 0.635 / 0.577 over SFT on one (beta 2 barely moved: KL
    # 0.19); lr 3e-5 and 2e-4 won less (0.60, 0.55), a second epoch added nothing (0.633), and neither label
    # smoothing 0.1 (cDPO 0.579, robust 0.585), IPO (0.538) nor RPO's NLL term (0.590) helped. On the hardest row
    # (seed 1, bf16) beta 0.5 on 4,000 pairs won 0.554, beta 1.0 on 4,000 0.565, beta 0.5 on 8,000 0.579, beta 1.0 on
    # 8,000 0.631; on three other rows beta 1.0 on 8,000 lifted 0.619-0.667 to 0.646-0.683.
    stages["dpo"] = dict(common, model=str(out / "sft" / "final"), data=[str(data["pairs"])],
                         eval_data=[str(data["eval_pairs"])], output=str(out / "dpo"), max_steps=steps["dpo"],
                         batch_size=32, lr=1e-4, beta=1.0, warmup_steps=10, lr_schedule="constant", max_len=96,
                         eval_every=50)
    return stages


def run_demo(config: DemoConfig) -> dict:
    """Run every stage and the evaluation; returns the summary also written to OUTPUT/summary.json."""
    setup_logging()
    if config.threads:
        torch.set_num_threads(config.threads)
    out = Path(config.output)
    size = "quick" if config.quick else "full"
    branches = [name for name in BRANCHES if name in config.algorithms]
    dtype = resolve_dtype(config.dtype, default_device(), MODEL[size]["hidden"])
    threads = torch.get_num_threads()
    # Two 1-thread stages at once pay in bf16, where the demo's small stages are bound by per-operator overhead, not
    # in float32, where they are bound by the multiply rate: on 2 cores (Intel Xeon with AMX) the stages after SFT
    # took 290 s of wall in bf16 this way against 440 s one after another on 2 threads, but in float32 the reward
    # model's 400 steps (the recipe then) took 289 s beside DPO against 127 s alone on 2 threads.
    jobs = config.jobs or (2 if threads >= 2 and default_device().type == "cpu" and dtype == "bfloat16" else 1)
    require(jobs <= threads, f"jobs: {jobs} workers need at least as many threads; torch has {threads} (--threads)")
    log.info(f"demo: seed {config.seed}, {threads} threads, {dtype}, tuned from SFT: {', '.join(branches)}"
             + (f"; after SFT {jobs} stages at a time, on {threads // jobs} of them each" if jobs > 1 else ""))
    timings: dict[str, float] = {}
    begun = time.perf_counter()
    earlier = _earlier_run(out) if config.resume else {"threads": {}, "timings_s": {}}
    inputs = _fingerprint(out) if config.resume else None

    def timed(name: str, fn, *args):
        log.info(f"--- demo stage: {name}")
        start = time.perf_counter()
        result = fn(*args)
        timings[name] = round(time.perf_counter() - start, 1)
        return result

    def make_data():
        files = make_task(out / "data", config.seed, **(dict(n_pairs=8000) if not config.quick else dict(
            n_sft=200, n_pairs=200, n_eval=STEPS["quick"]["eval_prompts"], corpus_paragraphs=300)))
        texts = [json.loads(line).get("text", line) for f in ("corpus", "sft", "pairs")
                 for line in files[f].read_text().splitlines()]
        tokenizer = train_tokenizer(texts, out / "init", vocab_size=600 if not config.quick else 400)
        make_tiny_model("llama", tokenizer, out / "init", seed=config.seed, **MODEL[size])
        return files

    files = timed("data", make_data)
    # Under --resume the data and the initial model are made again (a few seconds, byte for byte the same when the
    # seed and the code are); if they differ from what the earlier run trained on, nothing is kept, nor is a stage
    # that ran on another number of threads (other float rounding).
    same = inputs is not None and _fingerprint(out) == inputs
    rerun = set() if same else {"data"}
    if config.resume and not same:
        why = ("its data or initial model differ from this run's" if earlier["timings_s"] else
               "no record of an earlier run in the output folder (timings.json or summary.json)")
        log.warning(f"resume: nothing kept: {why}")
    stages = stage_configs(files, out, config.seed, size, dtype)
    runners = {"pretrain": (SFTConfig, run_sft), "sft": (SFTConfig, run_sft), "rm": (RMConfig, run_rm),
               "ppo": (PPOConfig, run_ppo), "grpo": (GRPOConfig, run_grpo), "grpo_gold": (GRPOConfig, run_grpo),
               "dpo": (DPOConfig, run_dpo)}
    names = ("pretrain", "sft", "rm", *branches)
    stage_threads = {name: threads if jobs == 1 or name in SERIAL else threads // jobs for name in names}
    # A stage's config is made when it starts: checking it needs the models of the stages before it.
    def build(name: str):
        return make_config(runners[name][0], stages[name])

    kept, todo = [], []
    for name in names:
        if (config.resume and not rerun & set(DEPENDS[name]) and earlier["threads"].get(name) == stage_threads[name]
                and _finished(out / name, build(name))):
            log.info(f"--- demo stage: {name}: kept from the earlier run (same config, inputs and threads)")
            timings[name] = earlier["timings_s"].get(name, 0.0)
            kept.append(name)
        else:
            rerun.add(name)
            todo.append(name)
    ran = {name: stage_threads[name] for name in kept}
    # The evaluation's tasks (a model's answers, judged) start as soon as their models exist, in the same workers.
    evaluation = eval_tasks(out, files, config.seed, stages["ppo"]["max_new_tokens"], branches,
                            STEPS[size]["eval_samples"], STEPS[size]["trajectory_prompts"])
    results: dict[str, object] = {}

    def finished(name: str, seconds: float, result=None) -> None:
        if name in evaluation:
            results[name] = result
            timings["evaluate"] = round(timings.get("evaluate", 0.0) + seconds, 1)
            return
        timings[name] = seconds
        ran[name] = stage_threads[name]
        (out / "timings.json").write_text(json.dumps({"threads": threads, "stage_threads": ran, "timings_s": timings}))

    for name in [n for n in todo if jobs == 1 or n in SERIAL]:
        timed(name, runners[name][1], build(name))
        finished(name, timings[name])
    if jobs == 1:
        log.info("--- demo stage: evaluate")
        for name, (judge, record, _) in evaluation.items():
            start = time.perf_counter()
            result = judge(record)
            finished(name, time.perf_counter() - start, result)
    else:
        at_once = sorted((n for n in todo if n not in SERIAL), key=PRIORITY.index)
        work = ", ".join([*at_once, f"the evaluation's {len(evaluation)} tasks (each once its models exist)"])
        log.info(f"--- demo stages, {jobs} at a time: {work}")
        run_stages({**{name: runners[name][1] for name in at_once}, **{k: v[0] for k, v in evaluation.items()}},
                   lambda name: evaluation[name][1] if name in evaluation else build(name),
                   {**DEPENDS, **{k: v[2] for k, v in evaluation.items()}}, set(ran), jobs, threads // jobs,
                   out / "logs", finished)
    start = time.perf_counter()
    summary = summarize(results, out, files, branches, STEPS[size]["eval_samples"])
    timings["evaluate"] = round(timings["evaluate"] + time.perf_counter() - start, 1)
    summary = {"seed": config.seed, "dtype": dtype, "threads": threads, "jobs": jobs, "stage_threads": ran, **summary,
               "timings_s": {name: timings[name] for name in ("data", *names, "evaluate")}, "kept": kept,
               # from start to end: this run's seconds, plus those of the stages it kept (as if one after another)
               "wall_s": round(time.perf_counter() - begun + sum(timings[name] for name in kept), 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    report = write_report(out)
    _print_summary(summary, out, report)
    return summary


def _fingerprint(out: Path) -> str:
    """A digest of the demo's data files and initial model (tokenizer and weights)."""
    digest = hashlib.sha256()
    for folder in (out / "data", out / "init"):
        for path in sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []:
            digest.update(str(path.relative_to(out)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _finished(folder: Path, config) -> bool:
    """Whether `folder` holds a finished run (its final model) of exactly this config."""
    try:
        written = yaml.safe_load((folder / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return False
    return (folder / "final" / "config.json").is_file() and written == to_dict(config)


def _earlier_run(out: Path) -> dict:
    """The stage seconds and threads of the run in `out`: timings.json (written after each stage), else its summary.
    (A run before `jobs` ran every stage on its one thread count.)"""
    for path in (out / "timings.json", out / "summary.json"):
        try:
            data = json.loads(path.read_text())
            threads = data.get("stage_threads") or {name: data["threads"] for name in data["timings_s"]}
            return {"threads": threads, "timings_s": data["timings_s"]}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
    return {"threads": {}, "timings_s": {}}


def _print_summary(summary: dict, out: Path, report: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    header, rows = comparison(summary)
    table = Table(title=f"rlhfkit demo: {summary['eval_prompts']} held-out prompts x {summary.get('eval_samples', 1)} "
                        f"answers, seed {summary['seed']}, "
                        f"{summary['dtype']}, {summary['threads']} threads")
    for column in header:
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    console = Console(markup=False, width=None if sys.stdout.isatty() else 120)  # a log file gets the whole table
    console.print(f"summary: {out / 'summary.json'}")
    console.print(f"report: {report}")
    console.print(f"reward model accuracy on held-out pairs {summary['rm_accuracy']:.3f}; stage seconds "
                  f"{summary['timings_s']}; wall {summary['wall_s'] / 60:.1f} min")
    console.print(table)
