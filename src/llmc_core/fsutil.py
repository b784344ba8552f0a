"""Atomic folder writes: build in a temporary sibling, fsync, then rename into place."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from llmc_core.errors import LlmcError


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(Path(dirpath) / name, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_folder(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``target`` atomically.

    An existing ``target`` is an error unless ``overwrite``; on any exception the temporary folder
    is removed and ``target`` is left as it was.
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise LlmcError(f"{target} already exists; llmc never overwrites a folder silently. Remove it, choose another save.save_path, or set save.overwrite: true.")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the saved model is an ordinary folder
    trash = target.with_name(f".{target.name}.old-{os.getpid()}")
    try:
        yield tmp
        _fsync_tree(tmp)
        if target.exists():
            target.rename(trash)
            tmp.rename(target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(target)
    except BaseException:
        if trash.exists() and not target.exists():  # interrupted between the two renames: put it back
            trash.rename(target)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
