"""Shared fixtures: a tokenizer trained here in a second and tiny Llama, GPT-2 and OPT models (no hub)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from rlhfkit.tiny import make_tiny_model, train_tokenizer

SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
COLORS = ["red", "blue", "green", "yellow", "purple", "orange"]


def corpus() -> list[str]:
    """Text that covers the templates and the synthetic tasks, so the tokenizer splits them into few tokens."""
    rng = random.Random(0)
    lines = []
    for _ in range(300):
        c, n = rng.choice(COLORS), rng.randint(1, 9)
        lines.append(f"\n\nHuman: What color is item {n}?\n\nAssistant: Item {n} is {c}.")
        lines.append(f"### Instruction:\nName the color of item {n}.\n\n### Response:\nIt is {c}.")
        lines.append(f"<|im_start|>user\nsay {c}<|im_end|>\n<|im_start|>assistant\n{c} is nice<|im_end|>\n")
    return lines


@pytest.fixture(autouse=True)
def float32_by_default(monkeypatch):
    """`--dtype auto` picks bfloat16 on CPUs with bf16 instructions and float32 on the others; tests compare numbers
    (fixtures, bitwise resume, 2 ranks vs 1) the same way on both kinds of machine, so in this process auto means
    float32 unless a test says otherwise. Tests of auto itself patch `cpu_bf16_instructions` again."""
    import rlhfkit.models

    monkeypatch.setattr(rlhfkit.models, "cpu_bf16_instructions", lambda: ())


def pytest_collection_modifyitems(config, items):
    """Tests marked `cpu` check what only the CPU gives: bitwise resume, numbers recorded here, tolerances of float32
    on the CPU where auto is bf16 on a GPU, or models they build on the CPU themselves. On a machine with a GPU the
    rest of the suite runs there and these are skipped; `CUDA_VISIBLE_DEVICES= pytest` runs the whole suite on the
    CPU. (Hiding the GPU from single tests instead leaves the process half on each device for the tests after them.)"""
    import torch

    if torch.cuda.is_available():
        skip = pytest.mark.skip(reason="checks what holds on the CPU only (CUDA_VISIBLE_DEVICES= pytest runs it)")
        for item in items:
            if item.get_closest_marker("cpu"):
                item.add_marker(skip)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(corpus(), out, vocab_size=400)
    return out


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from rlhfkit.models import load_tokenizer

    return load_tokenizer(str(tokenizer_dir))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    """{"llama": dir, "gpt2": dir, "opt": dir}: tiny random models saved with the tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    root = tmp_path_factory.mktemp("models")
    return {arch: make_tiny_model(arch, tok, root / arch, hidden=32, layers=2, heads=4) for arch in
            ("llama", "gpt2", "opt")}


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest, and steadiest on a busy machine, on one CPU thread (modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    if not SHARED_DATASETS.is_dir():
        pytest.skip("../shared/datasets is not present beside the checkout")
    return SHARED_DATASETS


class Crash(RuntimeError):
    """A simulated crash in the middle of a run (resume tests)."""


def crash_at_call(monkeypatch, owner, name: str, call: int) -> list[int]:
    """Make `owner.name` raise Crash at its `call`-th call (1-based; 0 = never) and count its calls; returns the
    counter."""
    calls = [0]
    real = getattr(owner, name)

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            raise Crash(f"simulated crash in call {call} of {name}")
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)
    return calls


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def color_sft_rows(n: int = 64, seed: int = 0) -> list[dict]:
    """A memorisable instruction task: each item number has one fixed color."""
    rng = random.Random(seed)
    return [{"instruction": f"What color is item {k}?", "input": "", "output": f"Item {k} is {COLORS[k % 6]}."}
            for k in (rng.randint(1, 9) for _ in range(n))]


def color_preference_rows(n: int = 96, seed: int = 0) -> list[dict]:
    """An easy preference task: the chosen reply names a color, the rejected one is a curt refusal."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        c, k = rng.choice(COLORS), rng.randint(1, 9)
        rows.append({"prompt": f"\n\nHuman: What color is item {k}?\n\nAssistant:",
                     "chosen": f" Item {k} is {c}.", "rejected": " No."})
    return rows


def with_eos_bias(model, eos_id: int, bias: float):
    """`model` with a biased output head that favours EOS by `bias` logits (the head's other weights kept), so that
    sampled responses end at different steps."""
    import torch

    head = model.get_output_embeddings()
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.zero_()
        biased.bias[eos_id] = bias
    model.set_output_embeddings(biased)
    return model


def encoded(prompt: list[int], response: list[int], loss_from: int | None = None):
    from rlhfkit.data.encode import Encoded

    ids = prompt + response
    start = len(prompt) if loss_from is None else loss_from
    return Encoded(ids, [i >= start for i in range(len(ids))], start)


def pair_cases(tokenizer) -> list:
    """Encoded pairs (chosen, rejected, margin 0) with prompts and responses of several lengths; the last shares no
    first token."""
    import torch

    g = torch.Generator().manual_seed(0)

    def ids(n: int) -> list[int]:
        return torch.randint(3, len(tokenizer) - 1, (n,), generator=g).tolist()

    pairs = []
    for p, c, r in ((4, 3, 5), (7, 2, 2), (2, 6, 1), (1, 1, 4)):
        prompt = ids(p)
        pairs.append((encoded(prompt, ids(c)), encoded(prompt, ids(r)), 0.0))
    first = ids(2)
    pairs.append((encoded([first[0]], ids(3)), encoded([first[1]], ids(2)), 0.0))  # no token shared
    return pairs
