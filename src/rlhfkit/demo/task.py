"""The demo's task, an encyclopedia assistant whose true preference is known.

A fact table (drawn from the seed) gives each of a few dozen subjects a color, a place and a size. Users ask about one
subject; a good answer states its three facts, briefly, and ends cleanly. The other kinds of answer are the failure
modes the seed documents show in real SFT and RLHF models: evasion ("I'm not sure"), repetition loops, facts about
the wrong subject, and rambling that never ends. `gold_score` judges any response from the prompt and the
text alone, as Gao et al.'s gold reward model does, so every stage can be measured against the truth while the
reward model only sees noisy preference labels.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

SUBJECTS = ("otter", "falcon", "maple", "comet", "glacier", "violin", "lantern", "tiger", "cactus", "harbor", "beetle",
            "canyon", "dolphin", "volcano", "orchid", "compass", "badger", "meadow", "piano", "walrus", "tulip",
            "castle", "heron", "lizard", "kettle", "island", "panda", "rocket", "coral", "wolf", "bridge", "lemur")
COLORS = ("red", "blue", "green", "yellow", "purple", "orange", "white", "black", "gray", "brown")
PLACES = ("forest", "desert", "river", "mountains", "city", "ocean", "valley", "jungle")
SIZES = ("tiny", "small", "large", "huge")
FACT_KINDS = {"color": COLORS, "place": PLACES, "size": SIZES}

QUESTIONS = ("Tell me about the {s}.", "What do you know about the {s}?", "Describe the {s}.",
             "What is the {s} like?", "Can you tell me about the {s}?", "I want to learn about the {s}.",
             "Give me the facts about the {s}.", "What should I know about the {s}?")
OPENERS = ("", "Please, ", "Hi! ", "Quick question: ")
POLITE = ("Sure! ", "Of course. ", "Happy to help. ", "")
EVASIONS = ("I'm not sure.", "I don't know about that.", "Sorry, I'm not sure what you mean.",
            "I don't know. Maybe ask someone else.")
FILLER = ("and", "also", "then", "so", "the", "it", "very", "really", "maybe", "well", "and then", "you know")

# What the SFT demonstrations hold: a mixture, as real demonstrations are, so SFT alone learns the mixture.
SFT_MIX = {"good": 0.35, "partial": 0.25, "evasive": 0.10, "wrong_subject": 0.10, "repetition": 0.10,
           "rambling": 0.10}
# What the preference pairs compare: each side's kind drawn from this. Good against partial answers is the distinction
# PPO has to learn beyond SFT; wrong-subject answers must be common enough that the reward model learns to check the
# subject (with few of them it rates them as good ones, and PPO could exploit that).
PAIR_MIX = {"good": 0.3, "partial": 0.2, "evasive": 0.1, "wrong_subject": 0.2, "repetition": 0.1, "rambling": 0.1}
LABEL_NOISE = 0.1  # share of preference pairs whose label is flipped
MIN_GAP = 0.5  # pairs closer than this in gold score are not labelled: an annotator could not tell them apart


@dataclass(frozen=True)
class Facts:
    color: str
    place: str
    size: str


def fact_table(seed: int) -> dict[str, Facts]:
    rng = random.Random(f"facts-{seed}")
    return {s: Facts(rng.choice(COLORS), rng.choice(PLACES), rng.choice(SIZES)) for s in SUBJECTS}


def fact_sentences(subject: str, facts: Facts) -> list[str]:
    return [f"The {subject} is {facts.color}.", f"It is found in the {facts.place}.", f"It is {facts.size}."]


# ---------------------------------------------------------------------------------------------------- responses
def response(kind: str, subject: str, table: dict[str, Facts], rng: random.Random) -> str:
    """A response of one quality `kind` (a key of SFT_MIX) to a question about `subject`."""
    facts = table[subject]
    sentences = fact_sentences(subject, facts)
    if kind == "good":
        return rng.choice(POLITE) + " ".join(sentences)
    if kind == "partial":
        return rng.choice(POLITE) + " ".join(rng.sample(sentences, rng.choice((1, 2))))
    if kind == "evasive":
        return rng.choice(EVASIONS)
    if kind == "wrong_subject":
        other = rng.choice([s for s in SUBJECTS if s != subject])
        return rng.choice(POLITE) + " ".join(fact_sentences(other, table[other]))
    if kind == "repetition":
        return " ".join([sentences[0]] * rng.randint(4, 7))
    if kind == "rambling":  # long, and stops mid-sentence: the kind of answer that never reaches EOS
        words = [f"the {subject}"] + [rng.choice(FILLER + (f"the {subject}", facts.color)) for _ in range(30)]
        return " ".join(words)
    raise ValueError(f"unknown response kind {kind!r}")


# ---------------------------------------------------------------------------------------------------- the judge
_WORD = re.compile(r"[a-z']+")


def subject_of(prompt: str) -> str | None:
    """The subject a prompt asks about (the last one named, as the question comes last)."""
    named = [(m.start(), s) for s in SUBJECTS for m in re.finditer(rf"\b{s}\b", prompt.lower())]
    return max(named)[1] if named else None


def gold_score(prompt: str, text: str, facts: Facts) -> float:
    """How good `text` is as an answer to `prompt` about a subject with these `facts`, from the texts alone.
    About -6 (worst) to 4 (best).

    +1 for each of the subject's three facts stated, -1 for each wrong value of a fact kind (capped at -3 in all);
    -1 for each other subject named (at most -2); -1 for evasion; -0.5 for each repeated sentence (at most -2);
    -0.05 for each word beyond 25 (at most -2); +0.5 for ending on a full stop (or ! or ?), -0.5 otherwise.
    """
    subject = subject_of(prompt)
    if subject is None:
        raise ValueError(f"the prompt names no subject of the demo's table: {prompt!r}")
    lowered = text.lower()
    words = _WORD.findall(lowered)
    present = set(words)
    score = 0.0
    wrong = 0
    for kind, values in FACT_KINDS.items():
        right = getattr(facts, kind)
        score += right in present
        wrong += sum(1 for v in values if v != right and v in present)
    score -= min(wrong, 3)
    score -= min(sum(1 for s in SUBJECTS if s != subject and s in present), 2)
    score -= any(phrase in lowered for phrase in ("not sure", "don't know"))
    sentences = [s.strip() for s in re.split(r"[.!?]", lowered) if s.strip()]
    score -= min(0.5 * (len(sentences) - len(set(sentences))), 2.0)
    score -= min(0.05 * max(len(words) - 25, 0), 2.0)
    score += 0.5 if text.rstrip().endswith((".", "!", "?")) else -0.5
    return score


# ------------------------------------------------------------------------------------------------------ the data
def all_questions() -> list[str]:
    """Every question the task asks: opener x phrasing x subject."""
    def join(opener: str, q: str) -> str:
        return opener + (q[0].lower() + q[1:] if opener.endswith(", ") else q)

    return [join(o, q.format(s=s)) for s in SUBJECTS for q in QUESTIONS for o in OPENERS]


def make_task(out: str | Path, seed: int, *, n_sft: int = 2000, n_pairs: int = 2000, n_eval: int = 240,
              corpus_paragraphs: int = 3000) -> dict[str, Path]:
    """Write the demo's data as jsonl files in the formats every stage reads; returns {name: path}.

    corpus.jsonl (text: the pretraining corpus, also PTX data), sft.jsonl (messages), pairs.jsonl (prompt messages +
    chosen/rejected, labelled by the gold score with LABEL_NOISE), prompts.jsonl (PPO), eval_prompts.jsonl (held-out
    questions, never seen by any stage), eval_pairs.jsonl (pairs on the held-out questions, labelled by the gold
    score without noise: the reward model's test of the true preference), facts.json (the table).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = fact_table(seed)
    rng = random.Random(f"task-{seed}")
    questions = all_questions()
    rng.shuffle(questions)
    held_out, train_questions = questions[:n_eval], questions[n_eval:]

    corpus = []
    for _ in range(corpus_paragraphs):  # encyclopedia text: titled articles, and some subjects side by side
        subjects = rng.sample(SUBJECTS, rng.choice((1, 1, 2)))
        sentences = [x for s in subjects for x in rng.sample(fact_sentences(s, table[s]), rng.choice((2, 3)))]
        title = f"{subjects[0].capitalize()}\n" if len(subjects) == 1 else ""
        corpus.append({"text": title + " ".join(sentences)})

    kinds, weights = list(SFT_MIX), list(SFT_MIX.values())
    sft = []
    for _ in range(n_sft):
        q = rng.choice(train_questions)
        kind = rng.choices(kinds, weights)[0]
        sft.append({"messages": [{"role": "user", "content": q},
                                 {"role": "assistant", "content": response(kind, subject_of(q), table, rng)}]})

    files = {
        "corpus": _write(out / "corpus.jsonl", corpus),
        "sft": _write(out / "sft.jsonl", sft),
        "pairs": _write(out / "pairs.jsonl", preference_pairs(train_questions, n_pairs, table, rng, LABEL_NOISE)),
        "eval_pairs": _write(out / "eval_pairs.jsonl", preference_pairs(held_out, n_eval, table, rng, 0.0)),
        "prompts": _write(out / "prompts.jsonl", [_prompt_row(q, table) for q in train_questions]),
        "eval_prompts": _write(out / "eval_prompts.jsonl", [_prompt_row(q, table) for q in held_out]),
    }
    files["facts"] = out / "facts.json"
    files["facts"].write_text(json.dumps({s: vars(f) for s, f in table.items()}, indent=1))
    return files


def preference_pairs(questions: list[str], n: int, table: dict[str, Facts], rng: random.Random, noise: float
                     ) -> list[dict]:
    """`n` pairs of responses whose gold scores differ by MIN_GAP or more, the better one chosen; a share `noise` of
    labels flipped; the two kinds are drawn from PAIR_MIX."""
    kinds, weights, pairs = list(PAIR_MIX), list(PAIR_MIX.values()), []
    while len(pairs) < n:
        q = rng.choice(questions)
        a, b = (response(k, subject_of(q), table, rng) for k in rng.choices(kinds, weights, k=2))
        score_a, score_b = (gold_score(q, x, table[subject_of(q)]) for x in (a, b))
        if abs(score_a - score_b) < MIN_GAP:
            continue
        chosen, rejected = (a, b) if score_a > score_b else (b, a)
        if rng.random() < noise:
            chosen, rejected = rejected, chosen
        pairs.append({"prompt": [{"role": "user", "content": q}], "chosen": chosen, "rejected": rejected})
    return pairs


def _prompt_row(q: str, table: dict[str, Facts]) -> dict:
    """A prompt with its subject's facts as extra columns: what `gold_reward` (and any reward function) receives."""
    return {"prompt": [{"role": "user", "content": q}], **vars(table[subject_of(q)])}


def gold_reward(prompts: list[str], responses: list[str], color: list[str], place: list[str], size: list[str]
                ) -> list[float]:
    """gold_score in the shape of a reward function (`--reward-fn` / `--monitor-fn`), facts from the prompt file."""
    return [gold_score(p, r, Facts(c, pl, sz)) for p, r, c, pl, sz in zip(prompts, responses, color, place, size)]


def load_fact_table(path: str | Path) -> dict[str, Facts]:
    return {s: Facts(**f) for s, f in json.loads(Path(path).read_text()).items()}


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path
