"""The corpora: each turns ``path``/``download`` into rows of text for calibration or evaluation."""

from __future__ import annotations

import json
from pathlib import Path

from llmc_core.api import Dataset
from llmc_core.errors import LlmcError
from llmc_plugins.data.readers import hub_rows, is_saved_dataset, jsonl_texts, saved_dataset_rows, wikitext_raw_rows


def _need_path(path: str | None, name: str) -> Path:
    if not path:
        raise LlmcError(f"{name}: no path given and nothing to fetch. Set path to the data (docs/data.md), or download: auto.")
    p = Path(path)
    if not p.exists():
        raise LlmcError(f"{name}: {p} does not exist.")
    return p


class WikiText2(Dataset):
    """WikiText-2 raw: a ``wiki.*.raw`` file, a folder holding them, a ``save_to_disk`` folder, or the hub.

    Evaluation reads the test split, calibration the train split (validation when only test and
    validation are present, as in the copy docs/data.md describes).
    """

    name = "wikitext2"

    def load_rows(self, path, download, purpose):
        split = "test" if purpose == "eval" else "train"
        if path and Path(path).exists():
            p = Path(path)
            if p.is_file():
                return wikitext_raw_rows(p)
            if is_saved_dataset(p):
                return saved_dataset_rows(p, split)
            names = ["wiki.test.raw"] if purpose == "eval" else ["wiki.train.raw", "wiki.valid.raw"]
            for n in names:
                if (p / n).is_file():
                    return wikitext_raw_rows(p / n)
            raise LlmcError(f"wikitext2: {p} holds none of {', '.join(names)} and is not a save_to_disk folder.")
        if download:
            return hub_rows(("wikitext", "wikitext-2-raw-v1"), {"split": split})
        _need_path(path, "wikitext2")
        return []


class _JsonLines(Dataset):
    """JSON lines with a ``text`` field (``.jsonl``, ``.json``, ``.jsonl.zst``), a folder of them,
    or a ``save_to_disk`` folder."""

    field = "text"  # the column read
    splits = {"calib": "train", "eval": "validation"}  # the split of a save_to_disk folder

    def load_rows(self, path, download, purpose):
        if path and Path(path).exists():
            p = Path(path)
            if is_saved_dataset(p):
                return self.to_rows(saved_dataset_rows(p, self.splits[purpose], self.field))
            files = sorted(f for f in p.iterdir() if f.name.endswith((".jsonl", ".json", ".jsonl.zst", ".json.zst"))) if p.is_dir() else [p]
            if not files:
                raise LlmcError(f"{self.name}: {p} holds no .jsonl / .jsonl.zst files.")
            return self.to_rows(t for f in files for t in jsonl_texts(f, self.field))
        if download:
            args, kwargs = self.hub_args(purpose)
            return self.to_rows(hub_rows(args, kwargs, self.field))
        _need_path(path, self.name)
        return []

    def to_rows(self, values) -> list[str]:
        """The field's values as rows of text."""
        return list(values)

    def hub_args(self, purpose: str) -> tuple[tuple, dict]:
        raise NotImplementedError


class C4(_JsonLines):
    """C4 (English): JSON lines with ``text``; the hub download uses the first train/validation shard."""

    name = "c4"

    def hub_args(self, purpose):
        split = "validation" if purpose == "eval" else "train"
        shard = f"en/c4-{split}.00000-of-{'00008' if split == 'validation' else '01024'}.json.gz"
        return ("allenai/c4",), {"data_files": {split: shard}, "split": split}


class PileVal(_JsonLines):
    """The Pile validation set as AWQ uses it: JSON lines with ``text``."""

    name = "pileval"

    def hub_args(self, purpose):
        return ("mit-han-lab/pile-val-backup",), {"split": "validation"}


class UltraChat(_JsonLines):
    """UltraChat 200k (HuggingFaceH4/ultrachat_200k), the conversations ``ultrachat_general``
    renders with the chat template: each row is one conversation's ``messages`` as JSON text.

    Reads JSON lines with ``messages`` or a ``save_to_disk`` folder (split ``train_sft`` for
    calibration, ``test_sft`` for evaluation); the hub download reads the same splits.
    """

    name = "ultrachat"
    field = "messages"
    splits = {"calib": "train_sft", "eval": "test_sft"}

    def hub_args(self, purpose):
        return ("HuggingFaceH4/ultrachat_200k",), {"split": self.splits[purpose]}

    def to_rows(self, values):
        return [json.dumps(v, ensure_ascii=False) for v in values]


class Custom(Dataset):
    """Your own text: a ``.txt`` file (one row per non-empty line) or JSON lines with ``text``."""

    name = "custom"

    def load_rows(self, path, download, purpose):
        if download:
            raise LlmcError("custom: your own data has no hub copy to fetch. Set download: false and path to your file.")
        p = _need_path(path, "custom")
        if p.suffix == ".txt":
            return [line for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
        return list(jsonl_texts(p))
