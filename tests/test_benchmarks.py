"""The benchmarks cannot rot: a tiny run of the PPO benchmark's rlhfkit side and of the sampler benchmark end to end,
and the PPO benchmark's FLOP count checked by hand."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "ppo_vs_trl.py"


def load_bench():
    return load_script(BENCH)


def load_script(path: Path):
    if str(BENCH.parent) not in sys.path:  # the benchmarks import their neighbours (train_throughput.py, ppo_vs_trl.py)
        sys.path.insert(0, str(BENCH.parent))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(path: Path, argv: list[str], monkeypatch, capsys, threads: int | None = None) -> str:
    """`python path argv` with this process as the script's: a new process spends ~7 s of CPU importing torch and
    transformers, the largest cost of these smoke runs. The sides a benchmark times still run in fresh processes.
    Returns what it printed."""
    module = load_script(path)
    monkeypatch.setattr(sys, "argv", [str(path), *argv])
    monkeypatch.setenv("PYTHONWARNINGS", "ignore")
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        module.main()
    finally:
        torch.set_num_threads(before)  # the scripts set the thread count they time with
    return capsys.readouterr().out


def test_phase_flops_by_hand():
    """hidden 2, 1 layer, FFN 4, vocab 3, one sequence of 1 prompt + 1 response token (T = 2): a block has
    4*2*2 + 3*2*4 = 40 weights, attention 2*1*2*2*2 = 16 FLOPs; a forward is 2*40*2 + 16 = 176 FLOPs plus its head,
    2*2*width per token it is read at (vocab 3 at both positions: 24; at the response only: 12; value head: 8)."""
    bench = load_bench()
    cfg = dict(hidden=2, layers=1, ffn=4, prompts=1, epochs=1)
    ours = bench.phase_flops(cfg, vocab=3, prompt_len=1, response_len=1, side="rlhfkit")
    trl = bench.phase_flops(cfg, vocab=3, prompt_len=1, response_len=1, side="trl")
    assert ours == {"generate": 200, "forward": 188 + 2 * 184, "train": 3 * (188 + 184)}
    assert trl == {"generate": 200, "forward": 200 + 2 * 184, "train": 3 * (200 + 184)}


def test_benchmark_smoke_run(tmp_path, monkeypatch, capsys):
    out = tmp_path / "bench"
    printed = run_script(BENCH, ["--config", "tiny", "--iterations", "2", "--repeats", "1", "--matmul-size", "64",
                                 "--threads", "1", "--out", str(out)], monkeypatch, capsys)
    assert "| rlhfkit |" in printed and "| rlhfkit | train |" in printed
    summary = json.loads((out / "tiny-float32" / "summary.json").read_text())
    m = summary["summary"]["rlhfkit"]
    assert m["n"] == 1 and m["time_iteration"] > 0 and m["peak_rss_mb"] > 0
    assert 0 < m["response_tokens"] <= 4 * 4  # 4 prompts x at most 4 new tokens
    assert summary["matmul_gflops"]["float32"] > 0


def test_sampler_benchmark_smoke_run(tmp_path, monkeypatch, capsys):
    bench = BENCH.parent / "sampler_vs_generate.py"
    printed = run_script(bench, ["--config", "tiny", "--batches", "1,3", "--lengths", "4", "--repeats", "1",
                                 "--matmul-size", "64", "--threads", "1", "--out", str(tmp_path)], monkeypatch, capsys)
    rows = [line for line in printed.splitlines() if line.startswith(("| full", "| early"))]
    assert len(rows) == 4 and all("| True |" in row for row in rows)  # the sampler gave generate's tokens
    results = json.loads((tmp_path / "tiny" / "sampler-float32.json").read_text())["results"]
    assert [(r["regime"], r["batch"]) for r in results] == [("full", 1), ("full", 3), ("early", 1), ("early", 3)]
    assert all(r["sampler_s"] > 0 and r["generate_s"] > 0 for r in results)
    # G samples per prompt: 2 prompts x 2 samples per call, still generate's tokens.
    # ... and with the vocabulary widened (the added tokens are drawn over, never sampled).
    printed = run_script(bench, ["--config", "tiny", "--batches", "4", "--lengths", "4", "--group", "2", "--repeats",
                                 "1", "--matmul-size", "64", "--threads", "1", "--vocab", "1000", "--out",
                                 str(tmp_path)], monkeypatch, capsys)
    assert "vocab 1000;" in printed
    rows = [line for line in printed.splitlines() if line.startswith(("| full", "| early"))]
    assert len(rows) == 2 and all("| True |" in row for row in rows)



GRPO_BENCH = BENCH.parent / "grpo_vs_trl.py"


def load_grpo_bench():
    return load_script(GRPO_BENCH)


def test_grpo_phase_flops_by_hand():
    """As the PPO count, for rows = 1 prompt x 2 samples: a forward over T = 2 tokens is 176 FLOPs plus the head,
    2*2*3 = 12 per token read (both tokens when sampling, the response token otherwise)."""
    bench = load_grpo_bench()
    cfg = dict(hidden=2, layers=1, ffn=4, prompts=1, generations=2)
    assert bench.phase_flops(cfg, vocab=3, prompt_len=1, response_len=1) == {
        "generate": 2 * 200, "forward": 2 * 188, "train": 3 * 2 * 188}


def test_grpo_cross_check_against_trls_formulas_by_hand():
    """What TRL's trainer would hand over for 2 prompts x 2 samples: rewards (1, 0 | 2, 2), so grpo's advantages are
    +-(0.5 / (std 0.7071 + 1e-4)) and 0; the policy's log-probs equal the reference's (KL 0). TRL's losses: grpo =
    mean over sequences of the token means of -A = 0; dapo (token-mean) weights by length: (-A_0 * 2 - A_1 * 1) / 7
    tokens;
    dr_grpo = the sum of -A over tokens / (4 rows x max length 2)."""
    bench = load_grpo_bench()
    a = 0.5 / (2 ** 0.5 / 2 + 1e-4)
    mask = [[1, 1], [1, 0], [1, 1], [1, 1]]
    common = dict(rewards=[1.0, 0.0, 2.0, 2.0], mask=mask, logps=[[-1.0, -2.0]] * 4, ref_logps=[[-1.0, -2.0]] * 4,
                  beta=0.04, max_completion_length=2, generations=2)
    found = {"grpo": dict(common, advantages=[a, -a, 0.0, 0.0], loss=0.0),
             "dapo": dict(common, advantages=[a, -a, 0.0, 0.0], loss=(-a * 2 + a * 1) / 7),
             "dr_grpo": dict(common, advantages=[0.5, -0.5, 0.0, 0.0], loss=(-0.5 * 2 + 0.5 * 1) / (4 * 2))}
    for loss_type, d in bench.cross_check(found).items():
        assert d["advantage_max_abs_diff"] < 1e-6 and abs(d["loss_rlhfkit"] - d["loss_trl"]) < 1e-6, (loss_type, d)


def test_grpo_benchmark_smoke_run(tmp_path, monkeypatch, capsys):
    out = tmp_path / "bench"
    printed = run_script(GRPO_BENCH, ["--config", "tiny", "--iterations", "2", "--repeats", "1", "--matmul-size",
                                      "64", "--threads", "1", "--out", str(out)], monkeypatch, capsys)
    assert "| rlhfkit |" in printed and "| rlhfkit | train |" in printed
    m = json.loads((out / "tiny-float32" / "summary.json").read_text())["summary"]["rlhfkit"]
    assert m["n"] == 1 and m["time_iteration"] > 0 and 0 < m["response_tokens"] <= 2 * 2 * 4


def test_dpo_benchmark_smoke_run_reads_the_pairs_in_rlhfkits_order(tmp_path, monkeypatch, capsys):
    out = tmp_path / "bench"
    printed = run_script(BENCH.parent / "dpo_vs_trl.py", ["--config", "tiny", "--steps", "2", "--repeats", "1",
                                                          "--matmul-size", "64", "--threads", "1", "--out", str(out)],
                         monkeypatch, capsys)
    assert "| rlhfkit |" in printed
    work = out / "tiny-float32"
    assert json.loads((work / "summary.json").read_text())["summary"]["rlhfkit"]["n"] == 1
    # What TRL reads, in order, is what rlhfkit's two steps of 8 take.
    from rlhfkit.data.batching import step_indices

    pairs = (work / "pairs.jsonl").read_text().splitlines()
    ordered = (work / "ordered.jsonl").read_text().splitlines()
    assert ordered == [pairs[i] for step in (0, 1) for i in step_indices(len(pairs), 8, 0, step)]


def test_gpu_check_runs_tiny_on_a_cpu(tmp_path, monkeypatch, capsys):
    """The GPU script's --tiny mode: every stage, its table row, and FLOP shares that are numbers."""
    printed = run_script(BENCH.parent / "gpu_check.py", ["--tiny", "--out", str(tmp_path)], monkeypatch, capsys,
                         threads=1)
    for stage in ("sft", "rm", "ppo", "grpo", "dpo"):
        assert f"| {stage} |" in printed, stage
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [s["stage"] for s in result["stages"]] == ["sft", "rm", "ppo", "grpo", "dpo"] and result["rate"] > 0
    for stage in result["stages"]:
        assert stage["tokens_per_s"] > 0 and all(v > 0 for v in stage["phases"].values()), stage
    assert set(result["stages"][3]["phases"]) == {"generate", "score", "experience", "train"}


def test_bf16_width_benchmark_runs(monkeypatch, capsys):
    """The measurement behind `--dtype auto`'s width rule runs (hidden 32, one step; the bf16 side is emulated where
    the CPU lacks bf16 instructions, so it is only run, not timed, here)."""
    printed = run_script(BENCH.parent / "bf16_width.py", ["--hidden", "32", "--repeats", "1", "--steps", "1", "--batch",
                                                          "2", "--length", "8"], monkeypatch, capsys)
    lines = printed.strip().splitlines()
    assert lines[0].startswith("hidden |") and lines[1].startswith("32 | ") and lines[1].endswith("x")


def test_pair_rows_benchmark_runs(tmp_path, monkeypatch, capsys):
    args = ["--data", "demo", "--steps", "3", "--threads", "1", "--demo-pairs", "400", "--out", str(tmp_path)]
    printed = run_script(BENCH.parent / "pair_rows.py", args, monkeypatch, capsys)
    assert "| rm |" in printed and "| dpo |" in printed
    share = float(printed.split("padded tokens of the rows / apart: ")[1].split()[0])
    assert 0.5 < share < 0.8  # the demo's prompts are about a third of a pair's tokens


def test_demo_table_copies_a_row_for_a_partial_rerun(tmp_path):
    """--copy-from: the copy's configs point at the copy (so `rlhfkit demo --resume` finds them unchanged), also when
    the source row is itself a copy whose configs name the folder it first ran in; the stages to rerun and the summary
    are gone, the source is untouched."""
    table = load_script(BENCH.parent / "demo_robustness.py")
    source, folder = tmp_path / "old" / "s0-t2-bfloat16", tmp_path / "new" / "s0-t2-bfloat16"
    ran_in = tmp_path / "first" / "unpin-s0-t2-bfloat16"
    for stage in ("pretrain", "rm", "ppo", "grpo"):
        (source / stage / "final").mkdir(parents=True)
        (source / stage / "config.yaml").write_text(f"output: {ran_in / stage}\nmodel: {ran_in / 'sft' / 'final'}\n")
    (source / "timings.json").write_text(json.dumps({"timings_s": {"rm": 1.0}, "path": str(ran_in)}))
    (source / "summary.json").write_text("{}")
    table.copy_row(source, folder, ["ppo", "grpo"])
    assert sorted(p.name for p in folder.iterdir()) == ["pretrain", "rm", "timings.json"]
    assert (folder / "rm" / "config.yaml").read_text() == (f"output: {folder / 'rm'}\n"
                                                           f"model: {folder / 'sft' / 'final'}\n")
    assert json.loads((folder / "timings.json").read_text())["path"] == str(folder)
    assert (source / "ppo" / "final").is_dir() and (source / "summary.json").exists()
