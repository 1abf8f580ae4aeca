"""The demo report: a self-contained page built from a synthetic demo folder, and the acceptance criteria."""

from __future__ import annotations

import base64
import copy
import json
import re
from pathlib import Path

import pytest

from rlhfkit.demo.report import THRESHOLDS, acceptance, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLOTS = {"ppo_actor_loss.png", "ppo_critic_loss.png", "ppo_reward.png", "ppo_gold_proxy_kl.png", "sft_loss.png",
         "rm_loss.png", "rm_accuracy.png", "timings.png", "overoptimisation.png"}
NASTY = '<script>alert(1)</script> & "q"'

# Passes every criterion, each with a small margin, so that one change below makes exactly one criterion fail.
PASSING = {
    "seed": 7,
    "gold": {"base": {"mean": -4.0, "ci95": 0.25}, "sft": {"mean": -2.25, "ci95": 0.2},
             "ppo": {"mean": -1.5, "ci95": 0.125}},
    "win_rate": {"sft_vs_base": 0.7, "ppo_vs_sft": 0.66, "grpo_vs_sft": 0.66, "dpo_vs_sft": 0.61},
    "rm_accuracy": 0.86,
    "corpus_loss": {"sft": 2.0, "ppo": 2.18, "grpo": 2.1},  # 1.09x, 1.05x
    "kl_to_sft": {"ppo": 1.25},
    "rm_score": {"base": -3.0, "sft": -1.0, "ppo": 0.5},
    "response_tokens": {"base": 48.0, "sft": 5.0, "ppo": 4.0},
    "eos_rate": {"base": 0.0, "sft": 1.0, "ppo": 1.0},
    "eval_prompts": 24,
    "trajectories": {"ppo": [{"iteration": 0, "kl": 0.0, "sqrt_kl": 0.0, "gold": -2.0, "rm_score": -1.0},
                             {"iteration": 5, "kl": 1.0, "sqrt_kl": 1.0, "gold": -1.5, "rm_score": 0.5}],
                     "dpo": [{"iteration": -1, "kl": 0.25, "sqrt_kl": 0.5, "gold": -1.8, "rm_score": 0.0}]},
    "timings_s": {"data": 1.5, "pretrain": 60.0, "sft": 50.0, "rm": 80.0, "ppo": 110.0, "evaluate": 15.0},
    "examples": [],
}


def changed(**paths) -> dict:
    """PASSING with values replaced at dotted paths, e.g. changed(**{"gold.ppo.mean": 1.0})."""
    summary = copy.deepcopy(PASSING)
    for path, value in paths.items():
        *parents, last = path.split(".")
        node = summary
        for key in parents:
            node = node[key]
        node[last] = value
    return summary


def all_pass_but(key: str | None) -> dict[str, bool]:
    return {k: k != key for k in ("rm_accuracy", "win_sft_vs_base", "win_ppo_vs_sft", "win_grpo_vs_sft",
                                  "win_dpo_vs_sft", "gold_ppo_over_sft", "corpus_loss")}


def passed(summary: dict) -> dict[str, bool]:
    return {k: ok for k, (ok, _) in acceptance(summary).items()}


def test_acceptance_passing_summary():
    assert passed(PASSING) == all_pass_but(None)
    # The boundaries are inclusive where the brief says ">=" / "within".
    assert passed(changed(rm_accuracy=THRESHOLDS["rm_accuracy"])) == all_pass_but(None)
    assert passed(changed(**{"win_rate.ppo_vs_sft": 0.65})) == all_pass_but(None)
    assert passed(changed(**{"win_rate.dpo_vs_sft": 0.60})) == all_pass_but(None)
    # The measured side, as the page shows it: the worst PTX run's corpus-loss ratio.
    assert acceptance(PASSING)["corpus_loss"] == (True, "1.090 x")
    assert acceptance(PASSING)["gold_ppo_over_sft"] == (True, "0.750 vs 0.200")


def test_acceptance_of_a_subset_of_algorithms():
    """`--algorithms dpo`: no PPO or GRPO criteria, and no PTX run to check."""
    summary = changed(**{"win_rate": {"sft_vs_base": 0.7, "dpo_vs_sft": 0.61}, "corpus_loss": {"sft": 2.0, "dpo": 3.0}})
    del summary["gold"]["ppo"]
    assert passed(summary) == {"rm_accuracy": True, "win_sft_vs_base": True, "win_dpo_vs_sft": True}


@pytest.mark.parametrize("paths, failing", [
    ({"rm_accuracy": 0.849}, "rm_accuracy"),
    ({"win_rate.sft_vs_base": 0.64}, "win_sft_vs_base"),
    ({"win_rate.ppo_vs_sft": 0.5}, "win_ppo_vs_sft"),
    ({"win_rate.grpo_vs_sft": 0.64}, "win_grpo_vs_sft"),
    ({"win_rate.dpo_vs_sft": 0.59}, "win_dpo_vs_sft"),
    # Gain 0.15: above PPO's CI (0.125) but not SFT's (0.2), so not significant.
    ({"gold.ppo.mean": -2.1}, "gold_ppo_over_sft"),
    # Gain 0.75: above SFT's CI (0.2) but not PPO's, made wider (0.8).
    ({"gold.ppo.ci95": 0.8}, "gold_ppo_over_sft"),
    ({"gold.ppo.mean": -3.0}, "gold_ppo_over_sft"),  # PPO worse than SFT
    ({"corpus_loss.ppo": 2.22}, "corpus_loss"),  # 1.11x
    ({"corpus_loss.grpo": 2.21}, "corpus_loss"),  # GRPO has PTX too
])
def test_acceptance_fails_each_criterion(paths, failing):
    assert passed(changed(**paths)) == all_pass_but(failing)


# ---------------------------------------------------------------------------------------------------- the page
def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_demo_output(out: Path) -> None:
    """A small demo folder with every file the report reads."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(PASSING))
    for stage in ("pretrain", "sft"):
        write_jsonl(out / stage / "metrics.jsonl",
                    [{"step": s, "split": "train", "loss": 5.0 / s, "lr": 1e-3, "grad_norm": 1.0} for s in range(1, 7)]
                    + [{"step": 6, "split": "eval", "loss": 1.2, "perplexity": 3.3}])
    write_jsonl(out / "rm" / "metrics.jsonl",
                [{"step": s, "split": "train", "loss": 0.7 - 0.05 * s, "accuracy": 0.5 + 0.05 * s,
                  "chosen_score": 0.1 * s, "rejected_score": 0.0, "margin": 0.1 * s} for s in range(1, 7)]
                + [{"step": 6, "split": "eval", "loss": 0.45, "accuracy": 0.8, "chosen_score": 0.5,
                    "rejected_score": 0.1, "margin": 0.4}])
    ppo = [{"step": s, "split": "train", "score": 0.1 * s, "reward": 0.1 * s - 0.01, "monitor": -2.0 + 0.2 * s,
            "kl": 0.05 * s, "policy_loss": -0.01, "value_loss": 0.3 / s, "ptx_loss": 1.5, "response_length": 20.0,
            "entropy": 1.3} for s in range(1, 6)]
    del ppo[2]["monitor"], ppo[3]["value_loss"]  # a row may lack a key
    write_jsonl(out / "ppo" / "metrics.jsonl", ppo)
    for stage in ("pretrain", "sft", "rm", "ppo"):
        (out / stage / "config.yaml").write_text(f"output: {out / stage}\nlr: 0.001\nnote: a < b & c\n")
    pairs = [{"prompt": f"prompt {i} <b>", "chosen": f"good {i}", "rejected": NASTY, "chosen_score": 0.5 - 0.2 * i,
              "rejected_score": 0.1} for i in range(15)]
    (out / "eval").mkdir()
    (out / "eval" / "eval_rm.json").write_text(json.dumps({"metrics": {
        "accuracy": 0.8125, "loss": 0.45, "pairs": 15, "chosen_score": 0.5, "rejected_score": 0.1, "margin": 0.4},
        "pairs": pairs}))
    rows = [{"prompt": f"What is item {i}?", "responses": {
        "base": {"text": NASTY, "stopped": False, "n_tokens": 48, "score": None, "gold": -3.25},
        "sft": {"text": f"It is red {i}.", "stopped": True, "n_tokens": 5, "score": 0.123, "gold": 1.0},
        "ppo": {"text": "It is red.", "stopped": True, "n_tokens": 4, "score": 0.9, "gold": 3.5}}} for i in range(14)]
    (out / "eval" / "compare.json").write_text(json.dumps(
        {"models": {"base": "b", "sft": "s", "ppo": "p"}, "rows": rows}))


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    make_demo_output(out)
    return write_report(out)


def test_page_is_self_contained_and_escaped(report):
    assert report == report.parent.parent / "report" / "index.html" and report.exists()
    page = report.read_text(encoding="utf-8")
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; &quot;q&quot;" in page
    assert "prompt 0 &lt;b&gt;" in page and "<b>" not in page
    assert "<pre>output: " in page and "note: a &lt; b &amp; c" in page  # configs verbatim, escaped


def test_every_plot_is_written_and_embedded(report):
    page = report.read_text(encoding="utf-8")
    written = {p.name for p in report.parent.glob("*.png")}
    assert written == PLOTS
    for name in PLOTS:
        assert (report.parent / name).read_bytes().startswith(PNG_MAGIC)
    assert page.count("data:image/png;base64,") == len(written)
    embedded = {base64.b64decode(b) for b in re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)}
    assert embedded == {(report.parent / name).read_bytes() for name in PLOTS}


def test_page_shows_numbers_tables_and_acceptance(report):
    page = report.read_text(encoding="utf-8")
    for text in ("7, ?, ?", "0.860", "2.000 → 2.180 (+9.0%)", "2.000 → 2.100 (+5.0%)", "316.5 s (5 min 16 s)"):
        assert text in page, text
    # The page leads with the comparison: a row per model, as `comparison` formats it.
    lead = page[page.index("<h2>Comparison on held-out prompts</h2>"):page.index("<h2>Acceptance</h2>")]
    for row in (["base", "-4.00 ± 0.25", "", "", "-3.00", "48.0", "0.00", "", "60"],
                ["sft", "-2.25 ± 0.20", "0.700 (vs base)", "", "-1.00", "5.0", "1.00", "2.000", "50"],
                ["ppo", "-1.50 ± 0.12", "0.660", "1.25", "0.50", "4.0", "1.00", "2.180", "110"]):
        assert "<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" in lead, row
    assert 'alt="overoptimisation.png"' in lead
    assert page.count('<span class="pass">pass</span>') == 7 and "FAIL" not in page
    # First 12 of 15 pairs / 14 prompts only.
    assert "prompt 11 &lt;b&gt;" in page and "prompt 12 &lt;b&gt;" not in page
    assert "What is item 11?" in page and "What is item 12?" not in page
    assert '<div class="score">rm 0.12 · gold 1.00</div>' in page
    assert '<div class="score">gold -3.25</div>' in page  # a null RM score is left out
    assert "0.8125" not in page and "0.812" in page  # RM eval metrics, formatted
    for section in ("Reward model on held-out pairs", "Base vs SFT vs the tuned models on held-out prompts",
                    "Stage timings"):
        assert f"<h2>{section}</h2>" in page


def test_missing_optional_files_leave_notes(tmp_path):
    make_demo_output(tmp_path)
    (tmp_path / "eval" / "eval_rm.json").unlink()
    (tmp_path / "ppo" / "metrics.jsonl").unlink()
    page = write_report(tmp_path).read_text(encoding="utf-8")
    assert "<h2>Reward model on held-out pairs</h2><p class=\"note\">No eval/eval_rm.json" in page
    assert "What is item 0?" in page  # the comparison is still there
    written = {p.name for p in (tmp_path / "report").glob("*.png")}
    assert written == {name for name in PLOTS if not name.startswith("ppo_")}
    assert page.count("data:image/png;base64,") == len(written)


def test_summary_is_required(tmp_path):
    with pytest.raises(FileNotFoundError, match="summary.json"):
        write_report(tmp_path)
