"""The demo: its gold judge on hand-written answers of each failure mode, its data generator, and `demo --quick`."""

from __future__ import annotations

import json
import math
import random
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from rlhfkit.data.loading import load_examples
from rlhfkit.data.readers import DataError
from rlhfkit.demo.evaluate import mean_ci, per_prompt, win_rate
from rlhfkit.demo.task import (MIN_GAP, SFT_MIX, Facts, fact_sentences, fact_table, gold_reward, gold_score,
                               make_task, response, subject_of)

OTTER = Facts(color="brown", place="river", size="small")
Q = "Tell me about the otter."


@pytest.mark.parametrize("text, expected", [
    # 3 facts + clean end
    ("Sure! The otter is brown. It is found in the river. It is small.", 3 + 0.5),
    # 2 facts
    ("The otter is brown. It is small.", 2 + 0.5),
    # evasion: no facts, -1, clean end
    ("I'm not sure.", -1 + 0.5),
    # the wrong subject (the falcon's facts here are all wrong values for the otter): -3 wrong values, -1 subject
    ("The falcon is gray. It is found in the mountains. It is huge.", -3 - 1 + 0.5),
    # wrong facts about the right subject
    ("The otter is white. It is found in the desert. It is tiny.", -3 + 0.5),
    # a loop: 1 fact, 4 repeats of one sentence -> -1.5
    ("The otter is brown. The otter is brown. The otter is brown. The otter is brown.", 1 - 1.5 + 0.5),
    # rambling without an end: 1 fact (brown), 30 words -> -0.05 * 5, no full stop -> -0.5
    ("the otter and then the otter is brown and so the otter well you know it also then and the otter really very "
     "maybe the otter and and then so", 1 - 0.05 * 5 - 0.5),
])
def test_gold_score_by_failure_mode(text, expected):
    assert gold_score(Q, text, OTTER) == pytest.approx(expected, abs=1e-9)


def test_gold_orders_the_kinds_of_response():
    """On average good > partial > every failure mode, which is what RLHF has to discover from noisy labels."""
    table = fact_table(0)
    rng = random.Random(0)
    mean = {kind: sum(gold_score(f"Describe the {s}.", response(kind, s, table, rng), table[s])
                      for s in table for _ in range(3)) / (3 * len(table)) for kind in SFT_MIX}
    failures = [mean[k] for k in SFT_MIX if k not in ("good", "partial")]
    assert mean["good"] == 3.5 and mean["good"] > mean["partial"] > max(failures)
    assert max(failures) < 0


def test_subject_of_and_gold_reward():
    assert subject_of("Hi! What do you know about the walrus?") == "walrus"
    assert subject_of("What is a spoon?") is None
    with pytest.raises(ValueError, match="names no subject"):
        gold_score("What is a spoon?", "A spoon.", OTTER)
    assert gold_reward([Q, Q], ["The otter is brown.", "I don't know."], ["brown"] * 2, ["river"] * 2,
                       ["small"] * 2) == [1.5, -0.5]


def test_make_task_is_deterministic_and_readable(tmp_path):
    a = make_task(tmp_path / "a", seed=3, n_sft=50, n_pairs=50, n_eval=60, corpus_paragraphs=40)
    b = make_task(tmp_path / "b", seed=3, n_sft=50, n_pairs=50, n_eval=60, corpus_paragraphs=40)
    c = make_task(tmp_path / "c", seed=4, n_sft=50, n_pairs=50, n_eval=60, corpus_paragraphs=40)
    for name in a:
        assert a[name].read_bytes() == b[name].read_bytes(), name
    assert a["facts"].read_bytes() != c["facts"].read_bytes()
    for name, kind in (("corpus", "text"), ("sft", "sft"), ("pairs", "preference"), ("eval_pairs", "preference"),
                       ("prompts", "prompt"), ("eval_prompts", "prompt")):
        loaded = load_examples([str(a[name])], kind)
        assert not loaded.problems and loaded.examples, name
    eval_questions = {json.loads(line)["prompt"][0]["content"] for line in a["eval_prompts"].read_text().splitlines()}
    train_questions = {json.loads(line)["prompt"][0]["content"] for line in a["prompts"].read_text().splitlines()}
    assert len(eval_questions) == 60 and not eval_questions & train_questions  # held out means never trained on
    table = json.loads(a["facts"].read_text())
    for line in a["prompts"].read_text().splitlines():  # every prompt carries its subject's facts for the judge
        row = json.loads(line)
        assert table[subject_of(row["prompt"][0]["content"])] == {k: row[k] for k in ("color", "place", "size")}

    def gold_gaps(path):
        """chosen - rejected gold score of each pair, and its question."""
        for line in path.read_text().splitlines():
            row = json.loads(line)
            q = row["prompt"][0]["content"]
            facts = Facts(**table[subject_of(q)])
            yield q, gold_score(q, row["chosen"], facts) - gold_score(q, row["rejected"], facts)

    # Training labels follow the gold score except for the label noise; no pair is closer than MIN_GAP.
    gaps = [gap for _, gap in gold_gaps(a["pairs"])]
    assert all(abs(gap) >= MIN_GAP for gap in gaps)
    assert 0.75 <= sum(gap > 0 for gap in gaps) / 50 < 1.0
    # The held-out pairs are on held-out questions, labelled without noise: the reward model's test of the truth.
    eval_pairs = list(gold_gaps(a["eval_pairs"]))
    assert len(eval_pairs) == 60 and all(gap >= MIN_GAP and q in eval_questions for q, gap in eval_pairs)


def test_corpus_articles_are_titled(tmp_path):
    """The base model learns from titles to tie a named subject to its facts, as it would from an encyclopedia."""
    table = fact_table(5)
    files = make_task(tmp_path, seed=5, n_sft=1, n_pairs=1, n_eval=1, corpus_paragraphs=200)
    texts = [json.loads(line)["text"] for line in files["corpus"].read_text().splitlines()]
    titled = [t.split("\n") for t in texts if "\n" in t]
    assert 0.5 < len(titled) / len(texts) < 0.85  # two in three articles are about one subject and carry its title
    for title, body in titled:
        sentences = [x.strip() for x in re.findall(r"[^.]+\.", body)]
        assert 2 <= len(sentences) <= 3 and set(sentences) <= set(fact_sentences(title.lower(), table[title.lower()]))


def test_mean_ci_and_win_rate_by_hand():
    ci = mean_ci([1.0, 2.0, 3.0, 4.0])
    assert ci["mean"] == 2.5 and ci["ci95"] == pytest.approx(1.96 * math.sqrt(5 / 3) / 2, abs=1e-12)
    assert win_rate([1, 2, 3, 0], [0, 2, 4, -1]) == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    # two prompts, three draws each: draw j of prompt i at j * 2 + i
    assert per_prompt([1.0, 10.0, 2.0, 20.0, 6.0, 60.0], 2) == [3.0, 30.0]


def test_kl_to_sft_reads_the_sampled_tokens_not_the_text_again(tiny_models, tmp_path):
    """The log-ratio is summed over the tokens the model sampled: tokenising the decoded text again gives other
    tokens for 1-3% of the demo's answers. Here the text is unrelated to the ids, so reading it would not match."""
    from conftest import write_jsonl

    from rlhfkit.data.encode import EncodeStats, encode_prompt
    from rlhfkit.data.templates import resolve_template
    from rlhfkit.demo.evaluate import kl_to_sft
    from rlhfkit.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(str(tiny_models["llama"]))
    sft = load_causal_lm(str(tiny_models["llama"]), tokenizer)
    model = load_causal_lm(str(tiny_models["llama"]), tokenizer)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    prompts = load_examples([str(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "What color is item 3?"},
                                                                     {"prompt": "Name item 5."}]))], "prompt").examples
    answers = [{"text": "purple purple", "stopped": True, "ids": [40, 41, 42, tokenizer.eos_token_id]},
               {"text": "", "stopped": False, "ids": [7, 300, 12]}]
    by_hand = 0.0
    for p, answer in zip(prompts, answers):
        prompt = encode_prompt(p, tokenizer, resolve_template("auto", tokenizer), 512, EncodeStats())
        ids = torch.tensor([prompt + answer["ids"]])
        for m, sign in ((model, 1.0), (sft, -1.0)):
            logprobs = m(input_ids=ids).logits[0, :-1].float().log_softmax(-1)  # (T - 1, V): predicts token t + 1
            steps = range(len(prompt) - 1, ids.shape[1] - 1)
            by_hand += sign * sum(logprobs[t, ids[0, t + 1]].item() for t in steps)
    got = kl_to_sft(tmp_path / "model", tiny_models["llama"], prompts, answers)
    assert got == pytest.approx(by_hand / 2, abs=1e-4)
    assert abs(got) > 0.05  # the two models differ, so the check can fail


@pytest.mark.cpu
def test_demo_quick_end_to_end(tmp_path):
    from rlhfkit.cli import main

    out = tmp_path / "demo"
    threads = torch.get_num_threads()
    assert main(["demo", "--quick", "--threads", "2", "--jobs", "2", "--output", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    # With --jobs 2 (the default in bf16) the stages after SFT run two at a time, one thread each, in workers.
    assert summary["jobs"] == 2 and summary["stage_threads"] == {"pretrain": 2, "sft": 2, "rm": 1, "ppo": 1, "grpo": 1,
                                                                 "grpo_gold": 1, "dpo": 1}
    assert 0 < summary["wall_s"] < sum(summary["timings_s"].values())
    assert "rm: 100%" in (out / "logs" / "rm.log").read_text()
    for name in ("base", "sft", "ppo", "grpo", "grpo_gold", "dpo"):
        g = summary["gold"][name]
        assert -7 <= g["mean"] <= 4 and 0 <= g["ci95"] < 5
    assert set(summary["win_rate"]) == {"sft_vs_base", "ppo_vs_sft", "grpo_vs_sft", "grpo_gold_vs_sft", "dpo_vs_sft"}
    assert all(0 <= v <= 1 for v in summary["win_rate"].values())
    assert set(summary["kl_to_sft"]) == {"ppo", "grpo", "grpo_gold", "dpo"}
    assert all(math.isfinite(v) and v > -1 for v in summary["kl_to_sft"].values())  # an estimate: can dip below 0
    assert 0 <= summary["rm_accuracy"] <= 1
    assert all(math.isfinite(v) and v > 0 for v in summary["corpus_loss"].values())
    assert set(summary["timings_s"]) == {"data", "pretrain", "sft", "rm", "ppo", "grpo", "grpo_gold", "dpo", "evaluate"}
    assert summary["dtype"] == "float32" and summary["threads"] == 2  # auto on a CPU without bf16 (conftest)
    names = ["base", "sft", "ppo", "grpo", "grpo_gold", "dpo"]
    assert list(summary["response_tokens"]) == list(summary["eos_rate"]) == list(summary["gold"]) == names
    # The over-optimisation picture: every RL run from SFT (KL 0) through its snapshots; DPO one point.
    lines = summary["trajectories"]
    assert {name: [p["iteration"] for p in points] for name, points in lines.items()} == {
        "ppo": [0, 1, 2, 3], "grpo": [0, 1, 2], "grpo_gold": [0, 1, 2], "dpo": [-1]}
    assert lines["ppo"][0] == lines["grpo"][0] == lines["grpo_gold"][0]  # the same SFT point on the same prompts
    assert lines["ppo"][0]["kl"] == 0.0
    for points in lines.values():
        for p in points:
            assert p["sqrt_kl"] == math.sqrt(max(p["kl"], 0.0)) and math.isfinite(p["gold"] + p["rm_score"])
    assert sorted(f.name for f in (out / "ppo" / "snapshots").iterdir()) == [f"step-0000000{i}" for i in (1, 2, 3)]
    for stage in ("pretrain", "sft", "rm", "ppo", "grpo", "grpo_gold", "dpo"):  # the same runs a user makes, configs beside the results
        assert (out / stage / "config.yaml").is_file() and (out / stage / "final" / "config.json").is_file()
    assert "monitor" in json.loads((out / "ppo" / "metrics.jsonl").read_text().splitlines()[-1])
    assert "monitor" in json.loads((out / "grpo" / "metrics.jsonl").read_text().splitlines()[-1])
    # The evaluation tables: eval-rm on the held-out pairs, compare on the held-out prompts with RM and gold scores.
    eval_rm = json.loads((out / "eval" / "eval_rm.json").read_text())
    assert eval_rm["metrics"]["accuracy"] == summary["rm_accuracy"]
    assert len(eval_rm["pairs"]) == len((out / "data" / "eval_pairs.jsonl").read_text().splitlines())
    compare = json.loads((out / "eval" / "compare.json").read_text())
    assert summary["eval_prompts"] == 24 and summary["eval_samples"] == 2 and len(compare["rows"]) == 48
    assert [row["prompt"] for row in compare["rows"][:24]] == [row["prompt"] for row in compare["rows"][24:]]
    gold = {name: [row["responses"][name]["gold"] for row in compare["rows"]] for name in summary["gold"]}
    for name in ("base", "sft", "ppo", "grpo", "grpo_gold", "dpo"):
        assert summary["gold"][name] == mean_ci([(gold[name][i] + gold[name][i + 24]) / 2 for i in range(24)])
        rm = [row["responses"][name]["score"] for row in compare["rows"]]
        assert summary["rm_score"][name] == pytest.approx(sum(rm) / len(rm), abs=1e-9)
    # KL of a model to itself is 0; the summary's KL is the mean log-ratio over the model's own responses.
    from rlhfkit.demo.evaluate import kl_to_sft

    assert summary["win_rate"]["dpo_vs_sft"] == win_rate(gold["dpo"], gold["sft"])  # over prompts and draws
    prompts = load_examples([str(out / "data" / "eval_prompts.jsonl")], "prompt").examples * 2
    grpo_rows = [row["responses"]["grpo"] for row in compare["rows"]]
    assert kl_to_sft(out / "sft" / "final", out / "sft" / "final", prompts, grpo_rows) == 0.0
    torch.set_num_threads(1)  # the evaluation ran in a worker on 1 thread
    try:
        kl = kl_to_sft(out / "grpo" / "final", out / "sft" / "final", prompts, grpo_rows)
    finally:
        torch.set_num_threads(threads)
    assert kl == summary["kl_to_sft"]["grpo"]
    page = (out / "report" / "index.html").read_text()
    assert page.count("data:image/png;base64,") == len(list((out / "report").glob("*.png"))) == 10
    ppo = summary["gold"]["ppo"]
    assert f"<td>ppo</td><td>{ppo['mean']:.2f} ± {ppo['ci95']:.2f}</td>" in page  # the comparison table leads

    # A stage in a worker is the stage a user runs on that many threads: the reward model again, here, on 1 thread.
    from safetensors.torch import load_file

    from rlhfkit.rm.train import RMConfig, run_rm
    from rlhfkit.config import make_config

    rm = yaml.safe_load((out / "rm" / "config.yaml").read_text())
    torch.set_num_threads(1)
    try:
        run_rm(make_config(RMConfig, {**rm, "output": str(tmp_path / "rm")}))
    finally:
        torch.set_num_threads(threads)
    here, there = (load_file(folder / "final" / "model.safetensors") for folder in (tmp_path / "rm", out / "rm"))
    assert here.keys() == there.keys() and all(torch.equal(here[k], there[k]) for k in here)

    # The same seed gives the same numbers: only the wall times differ.
    assert main(["demo", "--quick", "--threads", "2", "--jobs", "2", "--output", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "summary.json").read_text())
    timing = {"timings_s", "wall_s"}
    assert {k: v for k, v in again.items() if k not in timing} == {k: v for k, v in summary.items() if k not in timing}

    # --resume keeps every finished stage whose config and inputs are unchanged and reruns the rest: GRPO on the gold
    # judge, its final model gone, reruns alone; the numbers are those of the uninterrupted run.
    shutil.rmtree(tmp_path / "again" / "grpo_gold" / "final")
    (tmp_path / "again" / "summary.json").unlink()  # the stage seconds of kept stages come from timings.json
    assert main(["demo", "--quick", "--threads", "2", "--jobs", "2", "--resume", "--output",
                 str(tmp_path / "again")]) == 0
    resumed = json.loads((tmp_path / "again" / "summary.json").read_text())
    assert resumed["kept"] == ["pretrain", "sft", "rm", "ppo", "grpo", "dpo"] and summary["kept"] == []
    assert {k: resumed["timings_s"][k] for k in resumed["kept"]} == {k: again["timings_s"][k] for k in resumed["kept"]}
    assert (tmp_path / "again" / "grpo_gold" / "final" / "config.json").is_file()
    skip = {"timings_s", "kept", "wall_s"}
    assert {k: v for k, v in resumed.items() if k not in skip} == {k: v for k, v in summary.items() if k not in skip}
    torch.set_num_threads(threads)


def test_demo_runs_a_subset_of_algorithms(tmp_path):
    """`algorithms=["dpo"]` (from Python here): base, SFT and the reward model (the evaluation's judge of RM scores),
    then DPO only; in float32 (auto here, conftest) one stage after another in this process."""
    import rlhfkit

    out = tmp_path / "demo"
    run = rlhfkit.demo(quick=True, algorithms=["dpo"], output=str(out))  # float32 here: one at a time
    summary = json.loads((out / "summary.json").read_text())
    assert run.result == summary and run.output == out and run.config.dtype == "auto"
    assert summary["jobs"] == 1 and set(summary["stage_threads"].values()) == {summary["threads"]}  # all in-process
    assert not (out / "logs").exists()
    assert list(summary["gold"]) == ["base", "sft", "dpo"] and list(summary["win_rate"]) == ["sft_vs_base", "dpo_vs_sft"]
    assert set(summary["timings_s"]) == {"data", "pretrain", "sft", "rm", "dpo", "evaluate"}
    assert list(summary["trajectories"]) == ["dpo"] and not (out / "ppo").exists()
    page = (out / "report" / "index.html").read_text()
    assert page.count('<span class="pass">pass</span>') + page.count('<span class="fail">FAIL</span>') == 3


def test_demo_output_that_is_a_file_is_one_line(tmp_path, capsys):
    from rlhfkit.cli import main

    (tmp_path / "taken").write_text("x")
    assert main(["demo", "--quick", "--resume", "--output", str(tmp_path / "taken")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"rlhfkit demo: error: output: {tmp_path / 'taken'} is a file, not a folder")


def _write_stage(config) -> str:
    Path(config.output).mkdir(parents=True)
    (Path(config.output) / "done").write_text(str(torch.get_num_threads()))
    return str(torch.get_num_threads())


def _stage_after_a(config) -> str:
    assert (Path(config.output).parent / "a" / "done").is_file(), "b started before a finished"
    return _write_stage(config)


def _killed_stage(config) -> None:
    import os
    import signal

    os.kill(os.getpid(), signal.SIGKILL)


def _failing_stage(config) -> None:
    raise DataError(None, "prompt", f"{config.output}: no prompt")


def test_stages_in_workers_wait_for_their_inputs_and_fail_in_one_line(tmp_path):
    """run_stages: a stage starts once those it depends on finished, on the threads it was given, and its result comes
    back; the first stage that fails stops the others, its message (a DataError, whose class the parent cannot
    rebuild) named by stage; a worker that dies is named too."""
    from types import SimpleNamespace

    from rlhfkit.config import ConfigError
    from rlhfkit.demo.schedule import run_stages
    from rlhfkit.training.guards import TrainingError

    def build(name):
        return SimpleNamespace(output=str(tmp_path / name), max_steps=1)

    ended = []
    run_stages({"a": _write_stage, "b": _stage_after_a}, build, {"b": ("a",)}, set(), 2, 1, tmp_path / "logs",
               lambda name, seconds, result: ended.append((name, result)))
    assert ended == [("a", "1"), ("b", "1")] and (tmp_path / "b" / "done").read_text() == "1"
    with pytest.raises(ConfigError, match=r"^c: field 'prompt': .*c: no prompt$"):
        run_stages({"c": _failing_stage, "d": _write_stage}, build, {"d": ("c",)}, set(), 2, 1, tmp_path / "logs",
                   lambda name, seconds, result: ended.append(name))
    assert len(ended) == 2 and not (tmp_path / "d").exists()
    with pytest.raises(TrainingError, match=r"^e: its worker process died \(killed, or out of memory\)"):
        run_stages({"e": _killed_stage}, build, {}, set(), 1, 1, tmp_path / "logs", lambda *args: None)


def _sleeping_stage(config) -> None:
    import os
    import time

    Path(config.output).write_text(str(os.getpid()))
    time.sleep(120)


def test_workers_end_when_the_demo_is_killed(tmp_path):
    """A demo killed with SIGKILL cannot stop its workers: they notice and end within seconds, not train on."""
    import subprocess
    import sys
    import time

    script = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
              "from pathlib import Path\nfrom types import SimpleNamespace\n"
              "from rlhfkit.demo.schedule import run_stages\nfrom test_demo import _sleeping_stage\n"
              f"run_stages({{'a': _sleeping_stage}}, lambda name: SimpleNamespace(output={str(tmp_path / 'pid')!r}), "
              f"{{}}, set(), 1, 1, Path({str(tmp_path / 'logs')!r}), lambda *args: None)\n")
    demo = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 120
    while not (tmp_path / "pid").is_file() or not (tmp_path / "pid").read_text():
        assert time.monotonic() < deadline and demo.poll() is None, "the worker never started its stage"
        time.sleep(0.1)
    worker = Path(f"/proc/{(tmp_path / 'pid').read_text()}/stat")
    demo.kill()
    demo.wait()

    def gone() -> bool:  # or a zombie
        try:
            return worker.read_text().split(")")[-1].split()[0] == "Z"
        except OSError:
            return True

    deadline = time.monotonic() + 10
    while not gone():
        assert time.monotonic() < deadline, "the worker outlived the demo"
        time.sleep(0.1)
