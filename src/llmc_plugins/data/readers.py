"""Reading text rows from the files users have: raw WikiText, JSON lines (plain or zstd), text,
and folders written by ``datasets.save_to_disk``."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

from llmc_core.errors import LlmcError


def wikitext_raw_rows(path: Path) -> list[str]:
    """Rows of a ``wiki.*.raw`` file exactly as the Hugging Face dataset has them: each line keeps
    its newline, and whitespace-only lines become ``""``."""
    with open(path, encoding="utf-8", newline="") as fh:
        return ["" if not line.strip() else line for line in fh]


def _open_text(path: Path) -> io.TextIOBase:
    if path.name.endswith(".zst"):
        import zstandard

        raw = open(path, "rb")  # noqa: SIM115 - closed with the wrapper
        return io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(raw), encoding="utf-8")
    return open(path, encoding="utf-8")  # noqa: SIM115


def jsonl_texts(path: Path, field: str = "text") -> Iterator[str]:
    """The ``text`` field of each JSON line; a malformed line is an error naming file and line."""
    with _open_text(path) as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)[field]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise LlmcError(f"{path}:{n}: expected a JSON object with a '{field}' field ({type(exc).__name__}). Is this a JSON-lines file?") from exc


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / n).exists() for n in ("dataset_dict.json", "dataset_info.json", "state.json"))


def saved_dataset_rows(path: Path, split: str, field: str = "text") -> list[str]:
    """Rows of a folder written by ``datasets.save_to_disk`` (a Dataset or a DatasetDict)."""
    try:
        from datasets import DatasetDict, load_from_disk
    except ImportError as exc:
        raise LlmcError(f"{path} is a 'datasets' folder; reading it needs: pip install datasets") from exc
    ds = load_from_disk(str(path))
    if isinstance(ds, DatasetDict):
        if split not in ds:
            raise LlmcError(f"{path}: no '{split}' split (has {', '.join(ds)}).")
        ds = ds[split]
    return list(ds[field])


def hub_rows(args: tuple, kwargs: dict, field: str = "text") -> list[str]:
    """Rows from ``datasets.load_dataset`` (``download: true``, or ``auto`` without a local copy;
    needs a network or a warm ``datasets`` cache)."""
    try:
        from datasets import load_dataset
    except ImportError as exc:
        raise LlmcError("fetching a dataset from the hub needs the 'datasets' package: pip install datasets (or use local data: docs/data.md)") from exc
    try:
        return list(load_dataset(*args, **kwargs)[field])
    except Exception as exc:  # datasets raises many types for "no network" / "no such dataset"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise LlmcError(f"could not fetch {args[0]} from the hub ({first}). Without a network, point path at a local copy: docs/data.md says where to get one.") from exc
