"""What a run read: a cheap fingerprint of its model and data files, for ``--resume``.

A block checkpoint holds weights computed from one model and one calibration set; continuing it
with another model at the same path (or another calibration file) would mix the two silently. The
checkpoint therefore records :func:`input_fingerprints` when it is made, and ``--resume`` refuses
when :func:`changes` finds any difference, naming the file and what changed.

Per file: its size, its modification time (ns) and a SHA-256 of its content; files above
:data:`FULL_HASH_BYTES`, and every file once :data:`FULL_HASH_BUDGET` bytes of one input have been
hashed whole, are hashed on three 1 MiB samples (head, middle, tail) instead, so a 15 GB model or a
folder of many data shards costs milliseconds, not minutes. A path that does not exist locally (a hub id) is recorded as such.
A folder is every file under it, hidden ones and hidden folders (``.cache``, ``.git``) excepted.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

FULL_HASH_BYTES = 64 * 2**20
FULL_HASH_BUDGET = 256 * 2**20
SAMPLE_BYTES = 2**20
MAX_FILES = 10_000


def input_fingerprints(config: Any) -> dict[str, Any]:
    """``{"model.path": ..., "calib.path": ..., "eval.0.path": ...}`` for the config's local inputs."""
    paths: dict[str, str] = {}
    for key in ("path", "tokenizer_path"):
        value = getattr(config.model, key, None)
        if isinstance(value, str) and value:
            paths[f"model.{key}"] = value
    if config.calib is not None and getattr(config.calib, "path", None):
        paths["calib.path"] = config.calib.path
    for i, (_, options) in enumerate(config.evals):
        if getattr(options, "path", None):
            paths[f"eval.{i}.path"] = options.path
    return {key: describe(path) for key, path in paths.items()}


def describe(path: str | Path) -> dict[str, Any]:
    """``{"kind": "file" | "folder" | "absent", "files": {relative name: [size, mtime_ns, sha256]}}``."""
    path = Path(path).expanduser()
    budget = [FULL_HASH_BUDGET]  # bytes this input may still hash whole
    if path.is_file():
        return {"kind": "file", "files": {path.name: _file(path, budget)}}
    if not path.is_dir():
        return {"kind": "absent", "files": {}}
    files: dict[str, Any] = {}
    for root, dirs, names in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if not name.startswith(".") and len(files) < MAX_FILES:
                full = Path(root) / name
                files[str(full.relative_to(path))] = _file(full, budget)
    return {"kind": "folder", "files": files}


def changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between two :func:`input_fingerprints`, one short phrase each."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a is None or b is None:
            out.append(f"{key} {'was not' if a is None else 'is no longer'} an input")
            continue
        if a.get("kind") != b.get("kind"):
            out.append(f"{key} was a {a.get('kind')}, is a {b.get('kind')} now")
            continue
        fa, fb = a.get("files", {}), b.get("files", {})
        for name in sorted(set(fa) | set(fb)):
            if name not in fb:
                out.append(f"{key}: {name} is gone")
            elif name not in fa:
                out.append(f"{key}: {name} is new")
            elif list(fa[name]) != list(fb[name]):
                what = "size" if fa[name][0] != fb[name][0] else "content" if fa[name][2] != fb[name][2] else "modification time"
                out.append(f"{key}: {name} changed ({what})")
    return out


def _file(path: Path, budget: list[int]) -> list[Any]:
    st = path.stat()
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        if st.st_size <= min(FULL_HASH_BYTES, budget[0]):
            budget[0] -= st.st_size
            for chunk in iter(lambda: fh.read(SAMPLE_BYTES), b""):
                h.update(chunk)
        else:
            for offset in (0, st.st_size // 2, st.st_size - SAMPLE_BYTES):
                fh.seek(offset)
                h.update(fh.read(SAMPLE_BYTES))
    return [st.st_size, st.st_mtime_ns, h.hexdigest()]
