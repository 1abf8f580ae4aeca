"""OUTPUT/report/index.html: one self-contained page (images inlined as base64, no network) for a finished demo.

It reads only what the demo wrote in OUTPUT: summary.json (required), each stage's metrics.jsonl and config.yaml,
eval/eval_rm.json and eval/compare.json (optional: a missing file leaves a one-line note instead of its section).
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

# The demo's pass marks, shared by the page and the tests. gold_ci_multiple: PPO's gold mean must exceed SFT's by more
# than this many times the larger of the two 95% CI half-widths, so that the gain is not noise of either estimate.
THRESHOLDS = {
    "rm_accuracy": 0.85,
    "win_sft_vs_base": 0.65,
    "win_ppo_vs_sft": 0.65,
    "win_grpo_vs_sft": 0.65,
    "win_dpo_vs_sft": 0.60,
    "gold_ci_multiple": 1.0,
    "corpus_loss_ratio": 1.1,
}

STAGES = ("pretrain", "sft", "rm", "ppo", "grpo", "grpo_gold", "dpo")
TABLE_ROWS = 12


PTX_BRANCHES = ("ppo", "grpo", "grpo_gold")  # the runs with a PTX term, whose corpus loss must hold


def acceptance(summary: dict) -> dict[str, tuple[bool, str]]:
    """Each acceptance criterion that applies to the algorithms this run trained (keys as in `criteria_text`):
    (passed, the measured side as text, so a near miss reads as one)."""
    t, gold, wins, loss = THRESHOLDS, summary["gold"], summary["win_rate"], summary["corpus_loss"]
    checks = {"rm_accuracy": (summary["rm_accuracy"] >= t["rm_accuracy"], f"{summary['rm_accuracy']:.3f}")}
    for name in ("sft_vs_base", "ppo_vs_sft", "grpo_vs_sft", "dpo_vs_sft"):
        if name in wins:
            checks[f"win_{name}"] = (wins[name] >= t[f"win_{name}"], f"{wins[name]:.3f}")
    if "ppo" in gold:
        gain, noise = gold["ppo"]["mean"] - gold["sft"]["mean"], max(gold["sft"]["ci95"], gold["ppo"]["ci95"])
        checks["gold_ppo_over_sft"] = (gain > t["gold_ci_multiple"] * noise, f"{gain:.3f} vs {noise:.3f}")
    ptx = [name for name in PTX_BRANCHES if name in loss]
    if ptx:
        worst = max(loss[name] / loss["sft"] for name in ptx)
        checks["corpus_loss"] = (worst <= t["corpus_loss_ratio"], f"{worst:.3f} x")
    return checks


def criteria_text() -> dict[str, str]:
    t = THRESHOLDS
    return {
        "rm_accuracy": f"reward model accuracy >= {t['rm_accuracy']}",
        "win_sft_vs_base": f"win rate SFT over base >= {t['win_sft_vs_base']}",
        "win_ppo_vs_sft": f"win rate PPO over SFT >= {t['win_ppo_vs_sft']}",
        "win_grpo_vs_sft": f"win rate GRPO (reward model) over SFT >= {t['win_grpo_vs_sft']}",
        "win_dpo_vs_sft": f"win rate DPO over SFT >= {t['win_dpo_vs_sft']}",
        "gold_ppo_over_sft": f"PPO gold mean - SFT gold mean > {t['gold_ci_multiple']:g} x max(ci95 SFT, ci95 PPO)",
        "corpus_loss": f"corpus loss of every run with PTX (PPO, GRPO) <= {t['corpus_loss_ratio']} x SFT's",
    }


COMPARISON_NOTE = ("<p>gold: the task's true score of one answer per held-out prompt (sampled at temperature 1), mean "
                   "± 95% CI; win rate: paired per prompt, a tie counting half; KL to SFT: nats per answer, on the "
                   "model's own answers; tokens: answer length; train s: the stage's wall time.</p>")
OVEROPTIMISATION_PLOT = "overoptimisation.png"
RL_LINES = {"ppo": "PPO", "grpo": "GRPO (reward model)", "grpo_gold": "GRPO (gold reward)"}
COMPARISON_HEADER = ["model", "gold (95% CI)", "win rate vs SFT", "KL to SFT", "RM score", "tokens", "EOS rate",
                     "corpus loss", "train s"]


def comparison(summary: dict) -> tuple[list[str], list[list[str]]]:
    """The demo's one table, a row per model: gold mean with its 95% CI, win rate over SFT (SFT's over base), KL to
    SFT (nats per answer), reward-model score, answer length in tokens, share of answers ending with EOS, corpus loss,
    seconds of training. Plain text cells, for the terminal and the page alike."""
    wins = {name.split("_vs_")[0]: (rate, name.split("_vs_")[1]) for name, rate in summary["win_rate"].items()}
    timings = summary.get("timings_s") or {}

    def cell(key: str, name: str, fmt: str) -> str:
        value = (summary.get(key) or {}).get(name)
        return format(value, fmt) if value is not None else ""

    rows = []
    for name, g in summary["gold"].items():
        win = "" if name not in wins else f"{wins[name][0]:.3f}" + ("" if wins[name][1] == "sft" else
                                                                    f" (vs {wins[name][1]})")
        seconds = timings.get("pretrain" if name == "base" else name)
        rows.append([name, f"{g['mean']:.2f} ± {g['ci95']:.2f}", win, cell("kl_to_sft", name, ".2f"),
                     cell("rm_score", name, ".2f"), cell("response_tokens", name, ".1f"), cell("eos_rate", name, ".2f"),
                     cell("corpus_loss", name, ".3f"), f"{seconds:.0f}" if seconds is not None else ""])
    return COMPARISON_HEADER, rows


# ---------------------------------------------------------------------------------------------------- reading
def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def series(rows: list[dict], key: str, split: str = "train") -> tuple[list[float], list[float]]:
    """(steps, values) of `key` in the rows of `split`, skipping rows that lack it or hold null."""
    pairs = [(r["step"], r[key]) for r in rows if r.get("split", "train") == split and r.get(key) is not None]
    return [s for s, _ in pairs], [v for _, v in pairs]


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean, shorter at the start so the curve has one point per step."""
    return [sum(values[max(0, i - window + 1):i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(values))]


# ---------------------------------------------------------------------------------------------------- plots
def make_plots(out: Path, summary: dict) -> dict[str, object]:
    """The report's figures by file name; a figure whose data is absent is left out."""
    # Figure objects, not pyplot: no global figure registry to leak or close, no GUI backend, safe in any process.
    # matplotlib is imported here because only the report needs it.
    from matplotlib.figure import Figure

    def axes(title: str, xlabel: str, ylabel: str):
        fig = Figure(figsize=(6, 3.5), dpi=100, layout="tight")
        ax = fig.add_subplot()
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
        ax.grid(alpha=0.3)
        return fig, ax

    metrics = {stage: read_jsonl(out / stage / "metrics.jsonl") for stage in STAGES}
    ppo, rm = metrics["ppo"], metrics["rm"]
    figs = {}
    timings = summary.get("timings_s") or {}

    lines = summary.get("trajectories") or {}
    if lines:
        # Gao et al. 2022 (their figure 1): scores against sqrt(KL) from the starting policy. The reward model's score
        # rising while the gold score flattens or falls is over-optimisation of the proxy.
        fig = Figure(figsize=(11, 4), dpi=100, layout="tight")
        for i, (key, label) in enumerate((("gold", "gold score"), ("rm_score", "reward-model score"))):
            ax = fig.add_subplot(1, 2, i + 1)
            for name, points in lines.items():
                xs, ys = [p["sqrt_kl"] for p in points], [p[key] for p in points]
                if name in RL_LINES:
                    ax.plot(xs, ys, "o-", label=RL_LINES[name], markersize=3)
                else:
                    ax.plot(xs, ys, "*", markersize=12, label=f"{name.upper()} (final)")
            ax.set(title=f"{label} vs KL to SFT (held-out prompts)", xlabel="sqrt(KL to SFT, nats)", ylabel=label)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        figs[OVEROPTIMISATION_PLOT] = fig

    for name, key, title in (("ppo_actor_loss.png", "policy_loss", "PPO actor (policy) loss"),
                             ("ppo_critic_loss.png", "value_loss", "PPO critic (value) loss")):
        xs, ys = series(ppo, key)
        if xs:
            figs[name], ax = axes(title, "iteration", "loss")
            ax.plot(xs, ys)

    if any(series(ppo, k)[0] for k in ("reward", "score")):
        figs["ppo_reward.png"], ax = axes("PPO reward", "iteration", "per sequence")
        ax.plot(*series(ppo, "reward"), label="reward (score - KL penalty)")
        ax.plot(*series(ppo, "score"), label="reward-model score")
        ax.legend(fontsize=8)

    if any(series(ppo, k)[0] for k in ("score", "monitor", "kl")):
        # Proxy rising while gold stalls or falls, as KL grows, is reward over-optimisation (Gao et al. 2022).
        figs["ppo_gold_proxy_kl.png"], ax = axes("Proxy vs gold reward, and KL", "iteration", "score")
        ax.plot(*series(ppo, "score"), label="proxy (RM score)", color="tab:blue")
        ax.plot(*series(ppo, "monitor"), label="gold", color="tab:green")
        right = ax.twinx()
        right.plot(*series(ppo, "kl"), label="KL", color="tab:red", linestyle="--")
        right.set_ylabel("KL to reference")
        lines = ax.get_lines() + right.get_lines()
        ax.legend(lines, [line.get_label() for line in lines], fontsize=8)

    lm_stages = [s for s in ("pretrain", "sft") if series(metrics[s], "loss")[0]]
    if lm_stages:
        fig = Figure(figsize=(6 * len(lm_stages), 3.5), dpi=100, layout="tight")
        for i, stage in enumerate(lm_stages):
            ax = fig.add_subplot(1, len(lm_stages), i + 1)
            ax.plot(*series(metrics[stage], "loss"), label="train")
            ax.plot(*series(metrics[stage], "loss", "eval"), "o", label="eval")
            ax.set(title=f"{stage} loss", xlabel="step", ylabel="loss")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        figs["sft_loss.png"] = fig

    if series(rm, "loss")[0]:
        figs["rm_loss.png"], ax = axes("Reward model loss", "step", "loss")
        ax.plot(*series(rm, "loss"), label="train")
        ax.plot(*series(rm, "loss", "eval"), "o", label="eval")
        ax.legend(fontsize=8)

    xs, ys = series(rm, "accuracy")
    if xs:
        # A batch's accuracy is noisy (32 pairs), so the train curve is smoothed.
        window = max(1, min(10, len(ys) // 5))
        figs["rm_accuracy.png"], ax = axes("Reward model accuracy", "step", "accuracy")
        ax.plot(xs, moving_average(ys, window), label=f"train (moving average of {window})")
        ax.plot(*series(rm, "accuracy", "eval"), "o", label="eval")
        ax.legend(fontsize=8)

    dpo = metrics["dpo"]
    if series(dpo, "rewards/margins")[0]:
        figs["dpo_rewards.png"], ax = axes("DPO implicit reward on the preference pairs", "step", "")
        ax.plot(*series(dpo, "rewards/margins"), label="margin chosen - rejected (train)")
        ax.plot(*series(dpo, "rewards/margins", "eval"), "o", label="margin (held-out pairs)")
        ax.plot(*series(dpo, "rewards/accuracies", "eval"), "s", label="accuracy (held-out pairs)")
        ax.legend(fontsize=8)

    if timings:
        figs["timings.png"], ax = axes("Wall time per stage", "seconds", "")
        ax.barh(list(timings), list(timings.values()))
        ax.invert_yaxis()  # first stage on top
    return figs


def png_bytes(fig) -> bytes:
    buffer = io.BytesIO()
    # No Software tag: it carries a URL and a version that would differ between otherwise equal runs.
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------------- html
def esc(value) -> str:
    return html.escape(str(value), quote=True)


def num(x, digits: int = 3) -> str:
    return f"{x:.{digits}f}" if isinstance(x, (int, float)) and not isinstance(x, bool) else esc(x)


def table(header: list[str], rows: list[list[str]]) -> str:
    """An html table; cells are html already (callers escape text)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def overview(summary: dict) -> str:
    """What the comparison table does not show: the run's settings, the reward model's accuracy, PTX's effect and the
    wall time."""
    loss = summary["corpus_loss"]
    rows = [["seed, dtype, threads, stages at a time", esc(f"{summary.get('seed', '?')}, {summary.get('dtype', '?')}, "
                                                           f"{summary.get('threads', '?')}, {summary.get('jobs', 1)}")],
            ["reward model accuracy (held-out pairs)", num(summary["rm_accuracy"])]]
    for name in PTX_BRANCHES:
        if name in loss:
            change = 100 * (loss[name] - loss["sft"]) / loss["sft"]
            rows.append([f"corpus loss SFT → {esc(name)}", f"{num(loss['sft'])} → {num(loss[name])} ({change:+.1f}%)"])
    if "eval_prompts" in summary:
        rows.append(["held-out prompts x answers per model", esc(f"{summary['eval_prompts']} x "
                                                                   f"{summary.get('eval_samples', 1)}")])
    total = summary.get("wall_s", sum((summary.get("timings_s") or {}).values()))
    if total:
        rows.append(["total wall time", f"{total:.1f} s ({int(total // 60)} min {total % 60:.0f} s)"])
    # Keys added to summary.json later still show up, as long as they are plain numbers.
    known = {"seed", "threads", "jobs", "wall_s", "rm_accuracy", "eval_prompts", "eval_samples"}
    rows += [[esc(k), num(v)] for k, v in summary.items()
             if k not in known and isinstance(v, (int, float)) and not isinstance(v, bool)]
    return table(["measure", "value"], rows)


def acceptance_table(summary: dict) -> str:
    text = criteria_text()
    rows = [[esc(text[k]), esc(measured), '<span class="pass">pass</span>' if ok else '<span class="fail">FAIL</span>']
            for k, (ok, measured) in acceptance(summary).items()]
    return table(["criterion", "measured", "result"], rows)


def comparison_table(summary: dict) -> str:
    header, rows = comparison(summary)
    return table(header, [[esc(c) for c in row] for row in rows]) + COMPARISON_NOTE


def rm_eval_section(data: dict | None) -> str:
    if data is None:
        return note("No eval/eval_rm.json in this run: reward-model evaluation not shown.")
    metrics = table(["metric", "value"], [[esc(k), num(v)] for k, v in data.get("metrics", {}).items()])
    rows = [[f'<div class="text">{esc(p["prompt"])}</div>', f'<div class="text">{esc(p["chosen"])}</div>',
             num(p["chosen_score"], 2), f'<div class="text">{esc(p["rejected"])}</div>', num(p["rejected_score"], 2),
             "yes" if p["chosen_score"] > p["rejected_score"] else '<span class="fail">no</span>']
            for p in data.get("pairs", [])[:TABLE_ROWS]]
    pairs = table(["prompt", "chosen", "score", "rejected", "score", "chosen > rejected"], rows)
    return metrics + f"<p>First {len(rows)} pairs:</p>" + pairs


def response_cell(response: dict) -> str:
    scores = [f"{label} {response[key]:.2f}" for label, key in (("rm", "score"), ("gold", "gold"))
              if response.get(key) is not None]
    return f'<div class="text">{esc(response.get("text", ""))}</div><div class="score">{" · ".join(scores)}</div>'


def compare_section(data: dict | None) -> str:
    if data is None:
        return note("No eval/compare.json in this run: model comparison not shown.")
    rows = data.get("rows", [])[:TABLE_ROWS]
    names = list(data.get("models") or (rows[0]["responses"] if rows else []))
    body = [[f'<div class="text">{esc(row["prompt"])}</div>'] + [response_cell(row["responses"].get(n, {}))
                                                                   for n in names] for row in rows]
    return f"<p>First {len(body)} prompts; rm = reward-model score, gold = the task's true score.</p>" + table(
        ["prompt"] + names, body)


def timings_section(summary: dict) -> str:
    timings = summary.get("timings_s") or {}
    if not timings:
        return note("No stage timings in summary.json.")
    total = sum(timings.values())
    rows = [[esc(k), num(v, 1), f"{100 * v / total:.0f}%" if total else ""] for k, v in timings.items()]
    text = table(["stage", "seconds", "share"], rows + [["total", num(total, 1), ""]])
    if summary.get("jobs", 1) > 1:
        text += note(f"The stages after SFT ran {summary['jobs']} at a time, so the stage seconds add up to more than "
                     f"the wall time ({summary.get('wall_s', 0):.0f} s).")
    return text


def configs_section(out: Path) -> str:
    parts = [f"<details><summary>{esc(stage)}/config.yaml</summary><pre>{esc(path.read_text())}</pre></details>"
             for stage in STAGES if (path := out / stage / "config.yaml").exists()]
    return "".join(parts) or note("No stage configs found.")


def image(name: str, data: bytes) -> str:
    return (f'<figure><img alt="{esc(name)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'
            f"<figcaption>{esc(name)}</figcaption></figure>")


CSS = """body{font-family:sans-serif;max-width:1300px;margin:auto;padding:1em;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top;
text-align:left}th{background:#f0f0f0}.text{white-space:pre-wrap;max-width:28em;font-size:90%}
.score{color:#666;font-size:85%}.pass{color:#070}.fail{color:#b00;font-weight:bold}.note{color:#666;font-style:italic}
figure{display:inline-block;margin:.5em}figcaption{font-size:80%;color:#666}pre{background:#f6f6f6;padding:.5em}"""


def write_report(out: Path) -> Path:
    """Write OUTPUT/report/index.html and its PNGs from the files the demo wrote in `out`; returns the html path."""
    out = Path(out)
    summary = read_json(out / "summary.json")
    if summary is None:
        raise FileNotFoundError(f"{out / 'summary.json'} not found: is {out} a finished demo run?")
    report = out / "report"
    report.mkdir(parents=True, exist_ok=True)
    images = {}
    for name, fig in make_plots(out, summary).items():
        data = png_bytes(fig)
        (report / name).write_bytes(data)
        images[name] = image(name, data)
    lead = images.pop(OVEROPTIMISATION_PLOT, note("No trajectories in summary.json: over-optimisation plot not shown."))
    sections = [
        ("Comparison on held-out prompts", comparison_table(summary) + lead + overview(summary)),
        ("Acceptance", acceptance_table(summary)),
        ("Training curves", "".join(images.values()) or note("No metrics found.")),
        ("Reward model on held-out pairs", rm_eval_section(read_json(out / "eval" / "eval_rm.json"))),
        ("Base vs SFT vs the tuned models on held-out prompts", compare_section(read_json(out / "eval" / "compare.json"))),
        ("Stage timings", timings_section(summary)),
        ("Stage configs", configs_section(out)),
    ]
    body = "".join(f"<h2>{esc(title)}</h2>{content}" for title, content in sections)
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>rlhfkit demo report</title>'
            f"<style>{CSS}</style></head><body><h1>rlhfkit demo report</h1>{body}</body></html>")
    path = report / "index.html"
    path.write_text(page, encoding="utf-8")
    return path
