"""SFT and reward-model training on 2 CPU ranks (gloo) with DDP and FSDP2: the same optimisation as one process on
the same global batch, DCP checkpoints that survive SIGKILL and reshard from 2 ranks to 1, a dead rank ends the job.

Each run is a real `rlhfkit ... --nproc 2` (torchrun) subprocess. Run these alone with `pytest -m distributed`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import color_preference_rows, color_sft_rows, write_jsonl
from safetensors.torch import load_file

from rlhfkit.training.distributed import World, gather_share, rank_share, strided_share

pytestmark = pytest.mark.distributed

STEPS = 10
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}  # two ranks on two cores: one thread each


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dist-data")
    return {"sft": write_jsonl(root / "sft.jsonl", color_sft_rows(64)),
            "sft_eval": write_jsonl(root / "sft_eval.jsonl", color_sft_rows(9, seed=1)),  # odd: ranks get 5 and 4
            "rm": write_jsonl(root / "rm.jsonl", color_preference_rows(64)),
            "rm_eval": write_jsonl(root / "rm_eval.jsonl", color_preference_rows(9, seed=1))}


def stage_args(stage: str, model: Path, data, out: Path, **extra) -> list[str]:
    """Arguments of `rlhfkit STAGE`: 10 steps of a global batch of 8, evaluated at steps 5 and 10."""
    values = dict(model=str(model), data=str(data[stage]), eval_data=str(data[f"{stage}_eval"]), output=str(out),
                  batch_size=8, micro_batch_size=2, lr=5e-3, max_steps=STEPS, eval_every=5, save_every=0) | extra
    return [stage] + [f"--{k.replace('_', '-')}={v}" for k, v in values.items()]


def rlhfkit(args: list[str], **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "rlhfkit", *args], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **popen)


def finish(process: subprocess.Popen, timeout: float = 120) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-3000:]
    return output


def losses(out: Path, split: str = "train") -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["split"] == split]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def assert_close_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert sorted(a) == sorted(b)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= atol, f"weights differ by up to {worst:.3g}"


@pytest.fixture(scope="module")
def runs(tiny_models, data, tmp_path_factory) -> dict[str, Path]:
    """{name: output}: one process and 2-rank DDP and FSDP runs of both stages, started together (they are
    independent) and awaited. The FSDP SFT run also checkpoints at step 5, for the 2 -> 1 resume."""
    root = tmp_path_factory.mktemp("dist-runs")
    plans = {}
    for stage in ("sft", "rm"):
        plans[f"{stage}-single"] = stage_args(stage, tiny_models["llama"], data, root / f"{stage}-single")
        for strategy in ("ddp", "fsdp"):
            extra = dict(save_every=5) if (stage, strategy) == ("sft", "fsdp") else {}
            plans[f"{stage}-{strategy}"] = stage_args(stage, tiny_models["llama"], data, root / f"{stage}-{strategy}",
                                                      strategy=strategy, nproc=2, keep_last=5, **extra)
    outputs = {}
    for group in (["sft-single", "rm-single"], ["sft-ddp", "rm-ddp"], ["sft-fsdp"], ["rm-fsdp"]):  # <= 4 processes
        started = {name: rlhfkit(plans[name]) for name in group}
        for name, process in started.items():
            outputs[name] = finish(process)
    return {name: root / name for name in plans} | {"log:" + k: v for k, v in outputs.items()}


@pytest.mark.parametrize("stage", ["sft", "rm"])
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_match_one_process_on_the_same_global_batch(runs, stage, strategy):
    single, two = runs[f"{stage}-single"], runs[f"{stage}-{strategy}"]
    assert len(losses(two)) == STEPS
    torch.testing.assert_close(torch.tensor(losses(two)), torch.tensor(losses(single)), rtol=1e-4, atol=0)
    # Evaluation: each rank scores a share of the 9 held-out rows; the reduced metrics are the whole set's.
    torch.testing.assert_close(torch.tensor(losses(two, "eval")), torch.tensor(losses(single, "eval")), rtol=1e-4,
                               atol=0)
    assert_close_weights(weights(two / "final"), weights(single / "final"), atol=1e-5)
    if stage == "rm":
        stats = [json.loads((run / "final" / "reward_stats.json").read_text()) for run in (single, two)]
        assert stats[0]["count"] == stats[1]["count"] == 18
        assert stats[0]["mean"] == pytest.approx(stats[1]["mean"], abs=1e-5)
    assert not (two / "checkpoints").exists() or strategy == "fsdp"


def test_only_rank_zero_logs(runs):
    log = runs["log:sft-ddp"]
    assert log.count("final model:") == 1
    assert len(losses(runs["sft-ddp"])) == STEPS  # one metrics record per step, not one per rank


def test_fsdp_checkpoint_from_two_ranks_resumes_on_one_process(runs, tiny_models, data, tmp_path):
    """The 2-rank FSDP run's step-5 checkpoint, resharded by DCP into one plain process, ends where the 2-rank run
    ended."""
    two = runs["sft-fsdp"]
    checkpoint = two / "checkpoints" / "step-00000005"
    assert json.loads((checkpoint / "state.json").read_text())["ranks"] == 2
    assert sorted(p.name for p in (checkpoint / "model").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    out = tmp_path / "one"
    finish(rlhfkit(stage_args("sft", tiny_models["llama"], data, out, resume=str(checkpoint))))
    torch.testing.assert_close(torch.tensor(losses(out)), torch.tensor(losses(two)[5:]), rtol=1e-4, atol=0)
    assert_close_weights(weights(out / "final"), weights(two / "final"), atol=1e-5)


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, f"the run ended before {path} appeared: {process.communicate()[0][-2000:]}"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.01)


@pytest.mark.parametrize("nproc", [1, 2])
def test_sigkill_after_a_checkpoint_then_resume_reaches_the_uninterrupted_weights(nproc, runs, tiny_models, data,
                                                                                   tmp_path):
    extra = dict(strategy="fsdp", nproc=2) if nproc == 2 else {}
    reference = runs["sft-fsdp" if nproc == 2 else "sft-single"]
    out = tmp_path / "killed"
    args = stage_args("sft", tiny_models["llama"], data, out, save_every=2, keep_last=10, **extra)
    process = rlhfkit(args, start_new_session=True)  # its own process group: the kill reaches every rank
    wait_for(out / "checkpoints" / "step-00000002", process)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (out / "final").exists(), "the run finished before the kill: nothing was tested"
    finish(rlhfkit(args + ["--resume=latest"]))
    assert_close_weights(weights(out / "final"), weights(reference / "final"), atol=1e-6 if nproc == 1 else 1e-5)
    assert len(losses(out)) == STEPS


def test_a_dead_rank_takes_the_job_down(tiny_models, data, tmp_path):
    out = tmp_path / "dead"
    args = stage_args("sft", tiny_models["llama"], data, out, strategy="ddp", nproc=2, dist_timeout_s=60)
    args = [a if not a.startswith("--max-steps") else "--max-steps=100000" for a in args]
    process = rlhfkit(args)
    wait_for(out / "metrics.jsonl", process)
    workers = [int(p) for p in subprocess.run(["pgrep", "-f", "--", f"--output={out}"], capture_output=True,
                                              text=True).stdout.split() if int(p) != process.pid]
    ranks = [pid for pid in workers if "LOCAL_RANK=1" in Path(f"/proc/{pid}/environ").read_bytes().decode(
        errors="replace").replace("\0", "\n").splitlines()]
    assert len(ranks) == 1, workers
    os.kill(ranks[0], signal.SIGKILL)
    output, _ = process.communicate(timeout=60)  # no hang: torchrun stops rank 0 and fails
    assert process.returncode != 0
    assert "exitcode  : -9" in output or "Signal 9" in output, output[-2000:]


# ------------------------------------------------------------------------------------ shares, in one process
def test_rank_share_splits_a_global_batch_into_contiguous_equal_parts():
    items = list(range(8))
    assert [rank_share(items, World(rank=r, size=2)) for r in range(2)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(ValueError, match="does not split evenly"):
        rank_share(list(range(7)), World(rank=0, size=2))


def test_strided_share_pads_to_equal_counts_and_gather_restores_the_order():
    items = list(range(7))
    shares = [strided_share(items, World(rank=r, size=3)) for r in range(3)]
    assert shares == [([0, 3, 6], 3), ([1, 4, 4], 2), ([2, 5, 5], 2)]
    # gather_share's reordering, without a process group: stack what the ranks would send.
    values = torch.tensor([s for share, _ in shares for s in share], dtype=torch.float32)  # rank-major, as all_gather
    per = 3
    restored = values.reshape(3, per).transpose(0, 1).reshape(-1)[:7]
    assert restored.tolist() == items
    assert gather_share(torch.tensor([5.0, 6.0, 7.0]), 2, World()).tolist() == [5.0, 6.0]
