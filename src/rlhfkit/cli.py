"""The `rlhfkit` command: one subcommand per stage and tool.

Every stage flag is a config field (see rlhfkit.config). User mistakes (bad flags, values, files, data rows) print one
line and exit with code 2, before any model is loaded; a training run that cannot go on exits with code 1.
"""

from __future__ import annotations

import argparse
import sys

from rlhfkit.config import ConfigError, parse_config
from rlhfkit.data.readers import DataError

USAGE = """usage: rlhfkit <command> [options]

stages:
  demo       the whole pipeline offline on a CPU (pretrain, SFT, RM, PPO, GRPO, DPO) with a gold evaluation
  sft        supervised fine-tuning of a causal LM on demonstrations
  rm         train a reward model on preference pairs
  ppo        PPO with a reward model or functions, KL penalty, GAE and PTX
  grpo       critic-free RL: GRPO, Dr.GRPO, RLOO, REINFORCE++ on groups of samples per prompt
  dpo        train the policy on preference pairs directly: DPO, IPO, SimPO (no reward model, no sampling)
tools:
  eval-rm    a reward model's accuracy and example scores on preference pairs
  compare    several models' responses to the same prompts side by side, with reward-model scores
  chat       talk with a model in the terminal, several turns
  data check what a data file holds and every problem in it

`rlhfkit <command> --help` lists every option with its default and meaning."""


DESCRIPTIONS = {
    "sft": "Supervised fine-tuning (stage 1).",
    "rm": "Reward-model training on preference pairs (stage 2).",
    "ppo": "PPO with the actor, reference, critic and reward (stage 3).",
    "grpo": "Critic-free RL (GRPO, Dr.GRPO, RLOO, REINFORCE++) with a reward model or functions.",
    "dpo": "Offline preference optimisation (DPO, cDPO, robust DPO, IPO, SimPO) on preference pairs.",
    "eval-rm": "Evaluate a reward model on preference pairs.",
    "compare": "Compare models' responses to the same prompts.",
    "demo": "The whole pipeline offline on a CPU, with a report.",
}


def _stage(command: str, argv: list[str]) -> int:
    """Parse the flags into the command's config and run it through the same `execute` as the Python functions
    (rlhfkit.api): here, or with --nproc N (outside torchrun) on N local ranks given these flags."""
    from rlhfkit.api import config_class, execute

    config = parse_config(config_class(command), argv, f"rlhfkit {command}", DESCRIPTIONS[command])
    execute(command, config, argv=argv)
    return 0


def _chat(argv: list[str]) -> int:
    from rlhfkit.tools.chat import ChatConfig, run_chat

    config = parse_config(ChatConfig, argv, "rlhfkit chat", "Talk with a model in the terminal.")
    try:
        run_chat(config)
    except KeyboardInterrupt:  # Ctrl-C is a way to leave a chat, not an interrupted run to resume
        print()
    return 0


def _data(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="rlhfkit data", description="Data tools.")
    sub = parser.add_subparsers(dest="action", required=True)
    check = sub.add_parser("check", help="report formats, counts, lengths and every problem in data files")
    check.add_argument("paths", nargs="+", help="files or folders")
    check.add_argument("--kind", required=True, choices=("sft", "preference", "prompt", "text"))
    check.add_argument("--tokenizer", default="", help="tokenizer (model folder) for token lengths; words otherwise")
    check.add_argument("--template", default="auto", help="chat template, as in training")
    check.add_argument("--max-len", type=int, default=512, help="count the rows this max_len would cut or drop")
    args = parser.parse_args(argv)
    return data_check(args.paths, args.kind, args.tokenizer, args.template, args.max_len)


def data_check(paths: list[str], kind: str, tokenizer_path: str, template: str, max_len: int) -> int:
    """Print each file's report; exit code 2 when part of a file cannot be read at all, else 1 when any row (or an
    empty file) has a problem."""
    from rich.console import Console
    from rich.table import Table

    from rlhfkit.data.check import check_file, percentiles
    from rlhfkit.data.templates import resolve_template

    tokenizer = None
    if tokenizer_path:
        from rlhfkit.models import load_tokenizer
        from rlhfkit.training.common import setup_logging

        setup_logging()
        tokenizer = load_tokenizer(tokenizer_path)
        template = resolve_template(template, tokenizer)
    elif template == "auto":
        template = "human-assistant"
    console = Console(width=max(Console().width, 120))
    problems = unreadable = 0
    for path in paths:
        report = check_file(path, kind, tokenizer=tokenizer, template=template, max_len=max_len)
        formats = ", ".join(f"{name} ({count})" for name, count in report.formats.most_common()) or "none"
        print(f"{report.path} as {kind}: {report.rows} rows, {report.examples} examples, "
              f"{len(report.problems)} with problems; format: {formats}")
        table = Table(title=f"lengths in {report.unit}")
        table.add_column("part")
        for point in ("p50", "p90", "p99", "max"):
            table.add_column(point, justify="right")
        for part, values in report.lengths.items():
            if any(values):
                stats = percentiles(values)
                table.add_row(part, *(str(stats[p]) for p in ("p50", "p90", "p99", "max")))
        console.print(table)
        if report.encode is not None:
            print(f"at max_len {max_len}: {report.encode.truncated} would be truncated from the prompt side, "
                  f"{report.encode.dropped} dropped")
        for problem in report.problems:  # plain print: user text must not be read as markup or wrapped
            print(f"  problem {problem}")
        for damage in report.unreadable:
            print(f"rlhfkit data: error: {damage}", file=sys.stderr)
        problems += len(report.problems)
        unreadable += len(report.unreadable)
    return 2 if unreadable else 1 if problems else 0


COMMANDS = {**{command: (lambda argv, command=command: _stage(command, argv)) for command in DESCRIPTIONS},
            "chat": _chat, "data": _data}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(command, list(COMMANDS), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        print(f"rlhfkit: error: unknown command {command!r}{hint}\n\n{USAGE}", file=sys.stderr)
        return 2
    try:
        return COMMANDS[command](rest)
    except (ConfigError, DataError) as exc:
        print(f"rlhfkit {command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"rlhfkit {command}: interrupted; --resume continues from the last checkpoint", file=sys.stderr)
        return 130
    except Exception as exc:
        from rlhfkit.training.guards import TrainingError, is_disk_full

        if isinstance(exc, TrainingError):
            print(f"rlhfkit {command}: error: {exc}", file=sys.stderr)
            return 1
        if is_disk_full(exc):  # wherever it struck (logs, TensorBoard, a report), a full disk is not a bug to trace
            where = getattr(exc, "filename", None)
            print(f"rlhfkit {command}: error: no space left on device{f' writing {where}' if where else ''}; "
                  "checkpoints written before are intact", file=sys.stderr)
            return 1
        import os

        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # say which rank brought the job down; torchrun stops the rest
            print(f"rlhfkit {command}: rank {os.environ.get('RANK')} failed: {type(exc).__name__}: {exc}",
                  file=sys.stderr)
        raise


def exit_with(code: int) -> None:
    """End the process with `code`. A rank of a torchrun job leaves without the interpreter's teardown: its output is
    written and its process group closed by then, and in that teardown torch's threads sometimes abort the process
    ("terminate called without an active exception", exit -6) after a run that succeeded, failing the whole job
    (now and then in the 2-rank tests)."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import logging

        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    exit_with(main())
