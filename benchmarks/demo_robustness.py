"""The demo's acceptance across seeds, thread counts and dtypes: runs `rlhfkit demo` for each combination (skipping
those whose summary.json exists) and prints one markdown row per run with every acceptance number and the wall time.

    python benchmarks/demo_robustness.py --seeds 0,1,2,3,4 --threads 2 --dtypes float32 --out runs/robust
    python benchmarks/demo_robustness.py --seeds 0,1,2,3,4 --threads 1 --dtypes float32 --parallel 2 --out runs/robust
    python benchmarks/demo_robustness.py --out runs/robust --table-only
    python benchmarks/demo_robustness.py --seeds 0,1,2,3,4 --threads 2 --dtypes bfloat16 --out runs/robust --resume
    python benchmarks/demo_robustness.py --out runs/new --copy-from runs/robust --rerun ppo,grpo,grpo_gold ...

`--parallel 2` runs two one-thread demos at once (one per core; their wall times are then not the demo's).
`--resume` reruns rows that have a summary too, with `rlhfkit demo --resume`: after a change to one stage, each row
keeps the stages it did not touch (their timings too, so the wall column stays the whole demo's).
`--copy-from DIR` starts each row that --out lacks from a copy of DIR's row, less the stages named by `--rerun`, and
resumes it: after a code change that leaves those stages' configs as they were (a default that now resolves to
another value), which `--resume` alone cannot see.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rlhfkit.demo.report import acceptance


def run_one(out: Path, seed: int, threads: int, dtype: str, resume: bool = False, again: bool = False) -> Path:
    """The row's demo, unless it has a summary (and not `again`); `resume`: with `rlhfkit demo --resume`."""
    folder = out / f"s{seed}-t{threads}-{dtype}"
    if again or not (folder / "summary.json").exists():
        with open(folder.with_suffix(".log"), "w") as log:
            subprocess.run([sys.executable, "-m", "rlhfkit", "demo", "--seed", str(seed), "--threads", str(threads),
                            "--dtype", dtype, "--output", str(folder), *(["--resume"] if resume else [])],
                           stdout=log, stderr=subprocess.STDOUT, check=True)
    return folder


def copy_row(source: Path, folder: Path, rerun: list[str]) -> None:
    """`source`'s finished row as `folder`, with the paths in its configs pointed at the copy (also when `source` is
    itself a copy whose configs name the folder it was first run in), and without the stages
    in `rerun` or its summary (so `rlhfkit demo --resume` reruns those stages, the ones after them and the
    evaluation)."""
    import yaml

    shutil.copytree(source, folder)
    # where the row's configs say it ran: `source` itself, or the folder `source` was copied from
    ran_in = str(Path(yaml.safe_load((source / "pretrain" / "config.yaml").read_text())["output"]).parent)
    for path in [*folder.glob("*/config.yaml"), folder / "timings.json"]:
        if path.exists():
            path.write_text(path.read_text().replace(ran_in, str(folder)))
    for stage in rerun:
        shutil.rmtree(folder / stage, ignore_errors=True)
    (folder / "summary.json").unlink(missing_ok=True)


def rm_steps(folder: Path) -> str:
    """The reward model's steps in a finished demo run (its config), which tell the recipes of the table apart."""
    import yaml

    config = folder / "rm" / "config.yaml"
    return str(yaml.safe_load(config.read_text())["max_steps"]) if config.exists() else "?"


def row(summary: dict, folder: Path) -> str:
    checks = acceptance(summary)
    wins, kl = summary["win_rate"], summary.get("kl_to_sft", {})
    cells = [summary["seed"], summary.get("threads", "?"), summary.get("jobs", 1), summary.get("dtype", "?"),
             rm_steps(folder), summary.get("eval_samples", 1),
             f"{summary['rm_accuracy']:.3f}", f"{wins['sft_vs_base']:.3f}"]
    cells += [f"{wins[k]:.3f}" if k in wins else "" for k in ("ppo_vs_sft", "grpo_vs_sft", "grpo_gold_vs_sft",
                                                              "dpo_vs_sft")]
    cells += [checks["corpus_loss"][1] if "corpus_loss" in checks else "",
              " / ".join(f"{kl[k]:.2f}" for k in kl),
              "all pass" if all(ok for ok, _ in checks.values()) else
              "FAIL: " + ", ".join(k for k, (ok, _) in checks.items() if not ok),
              f"{summary.get('wall_s', sum(summary['timings_s'].values())) / 60:.1f} min"]
    return "| " + " | ".join(str(c) for c in cells) + " |"


HEADER = ("| seed | threads | stages at once | dtype | RM steps | answers per prompt | RM accuracy | SFT over base "
          "| PPO over SFT | GRPO (RM) over SFT | GRPO (gold) over SFT | DPO over SFT | worst PTX corpus loss / SFT's "
          "| KL to SFT | acceptance | wall |\n"
          "|" + "---|" * 16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--threads", default="2", help="comma-separated thread counts")
    parser.add_argument("--dtypes", default="float32", help="comma-separated: float32, bfloat16")
    parser.add_argument("--parallel", type=int, default=1, help="demos at once (use with --threads 1 only)")
    parser.add_argument("--out", default="runs/robust")
    parser.add_argument("--table-only", action="store_true", help="print the table of the runs already in --out")
    parser.add_argument("--resume", action="store_true", help="rerun finished rows too, keeping their unchanged "
                                                              "stages (rlhfkit demo --resume)")
    parser.add_argument("--copy-from", default="", help="start each row --out lacks from this folder's row "
                                                        "(implies --resume)")
    parser.add_argument("--rerun", default="", help="with --copy-from: stages dropped from each copy, so they run "
                                                    "again (comma-separated, e.g. ppo,grpo,grpo_gold)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.rerun and not args.copy_from:
        parser.error("--rerun needs --copy-from")
    if not args.table_only:
        jobs = [(int(s), int(t), d) for d in args.dtypes.split(",") for t in args.threads.split(",")
                for s in args.seeds.split(",")]
        if args.copy_from:
            for seed, threads, dtype in jobs:
                name = f"s{seed}-t{threads}-{dtype}"
                if not (out / name).exists():
                    if not (Path(args.copy_from) / name / "summary.json").is_file():
                        parser.error(f"--copy-from: {Path(args.copy_from) / name} holds no finished demo run")
                    copy_row(Path(args.copy_from) / name, out / name, [x for x in args.rerun.split(",") if x])
        with ThreadPoolExecutor(args.parallel) as pool:
            resume = args.resume or bool(args.copy_from)
            for folder in pool.map(lambda job: run_one(out, *job, resume, args.resume), jobs):
                print(f"done: {folder}", flush=True)
    print(HEADER)
    for path in sorted(out.glob("*/summary.json")):
        print(row(json.loads(path.read_text()), path.parent))


if __name__ == "__main__":
    main()
