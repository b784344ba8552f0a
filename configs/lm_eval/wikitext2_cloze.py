"""Documents of the ``llmc_wikitext2_cloze`` task, built at load time from WikiText-2 (no copy kept).

Each document is one sentence of ``wikitext2/wiki.test.raw`` without its last word, and four
choices for that word: the true one and three last words of nearby sentences, in a fixed
pseudo-random order. lm-eval scores each choice's log-likelihood after the context (``acc``) and
per character (``acc_norm``).

The data root is ``$LLMC_DATA`` when set (as in llmc's configs), else ``../shared/data`` beside
the project checkout (this file is ``<checkout>/configs/lm_eval/``), so the task runs the same
under ``llmc run`` and under lm-eval's own CLI (``--include_path configs/lm_eval``), offline.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

RAW = Path("wikitext2") / "wiki.test.raw"
MIN_WORDS, MAX_WORDS = 12, 40
N_CHOICES = 4
NEAR = 8  # distractors come from the 8 sentences before and after


def data_root() -> Path:
    env = os.environ.get("LLMC_DATA")
    return Path(env).expanduser() if env else Path(__file__).resolve().parents[2].parent / "shared" / "data"


def sentences(text: str) -> list[tuple[str, str]]:
    """``(context, last word)`` pairs: sentences of MIN_WORDS..MAX_WORDS words whose last word
    is a lower-case alphabetic word of at least 4 letters (names and numbers are too hard to tell
    apart, short words too easy)."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("="):  # blank lines and section headings
            continue
        for sentence in line.split(" . "):
            words = sentence.removesuffix(" .").split()
            if MIN_WORDS <= len(words) <= MAX_WORDS and words[-1].isalpha() and words[-1].islower() and len(words[-1]) >= 4:
                out.append((" ".join(words[:-1]), words[-1]))
    return out


def build_docs(text: str) -> list[dict]:
    pairs = sentences(text)
    docs = []
    for i, (context, answer) in enumerate(pairs):
        rng = random.Random(f"llmc-cloze-{i}")  # per document: the same choices whatever the limit
        # distractors: last words of nearby sentences (same article, same topic), so the choice
        # takes the sentence's grammar and sense rather than the topic alone
        near = sorted({w for _, w in pairs[max(0, i - NEAR) : i + NEAR + 1]} - {answer})
        choices = [answer] + rng.sample(near, N_CHOICES - 1)
        rng.shuffle(choices)
        docs.append({"context": context, "choices": choices, "label": choices.index(answer)})
    return docs


def load_docs(**_: object) -> dict:
    """lm-eval's ``custom_dataset`` hook: ``{"test": Dataset}`` (it passes task metadata as keywords)."""
    import datasets

    path = data_root() / RAW
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: set LLMC_DATA to the folder holding wikitext2/wiki.test.raw")
    return {"test": datasets.Dataset.from_list(build_docs(path.read_text(encoding="utf-8")))}
