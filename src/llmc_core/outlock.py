"""One llmc process at a time in a ``save_path``, and what killed ones left there.

:func:`hold` takes ``save_path/.llmc.lock`` for the whole of a run (or an ``llmc export``): an
exclusive ``flock`` on the file, which also holds the process id, host and start time. A second
llmc process that wants the same folder is refused with one line naming the holder. The kernel
drops the lock when its process ends in any way, SIGKILL included; the file a killed process
leaves behind is a stale lock, taken over (and said so) by the next run.

Holding the folder also makes it safe to clean up after killed runs (:func:`sweep`): the
temporary names of :mod:`llmc_core.fsutil` (``.<name>.partial-<pid>-<hex>``, ``.<name>.old-<pid>``)
whose process is gone are removed, or renamed back for an old folder whose replacement never
arrived, with one log line. :func:`leftovers` names the same entries without touching them, so that
config validation does not call a folder "not empty" because of them.

:class:`OutputFolder` remembers what the folder held when the run took it, so that a run with
``save.overwrite: true`` can say which earlier outputs it kept (:meth:`OutputFolder.kept`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from llmc_core.errors import LlmcError
from llmc_core.fsutil import recover_orphans

log = logging.getLogger("llmc")

LOCK_NAME = ".llmc.lock"
_PARTIAL = re.compile(r"^\.(?P<name>.+)\.partial-(?P<pid>\d+)-[0-9a-f]{6}$")
_OLD = re.compile(r"^\.(?P<name>.+)\.old-(?P<pid>\d+)$")


class OutputFolder:
    """A ``save_path`` this process holds; see :func:`hold`."""

    def __init__(self, folder: Path, created: bool):
        self.folder = folder
        self.created = created  # removed again on release if the run left it empty
        self.before = _snapshot(folder)

    def kept(self) -> list[str]:
        """Entries that were there when the run took the folder and that it did not replace
        (same inode, same modification time), i.e. the outputs of an earlier run it kept."""
        now = _snapshot(self.folder)
        return sorted(name for name, sig in self.before.items() if now.get(name) == sig)


@contextlib.contextmanager
def hold(folder: str | Path, what: str = "save.save_path") -> Iterator[OutputFolder]:
    """Hold ``folder`` (created if missing) for the duration of the block; refuse with one
    :class:`LlmcError` line when another llmc process holds it. ``what`` names the folder in it."""
    import fcntl

    folder = Path(folder).expanduser()
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LlmcError(f"{what}: cannot create {folder} ({exc.strerror or exc}).") from exc
    path = folder / LOCK_NAME
    if path.is_symlink():
        raise LlmcError(f"{what}: {path} is a symbolic link, not llmc's lock file. Remove it.")
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as exc:
            raise LlmcError(f"{what}: cannot write the lock file {path} ({exc.strerror or exc}).") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise LlmcError(f"{what}: {folder} is in use by {_describe(path)}. Wait for it to finish, or choose another {what}.") from exc
            raise LlmcError(f"{what}: cannot lock {path} ({exc.strerror or exc}); llmc needs a file system with flock to guard its output folder.") from exc
        # the previous holder may have removed the file (and a third process made a new one) between
        # our open and our flock: only a lock on the file that is at the path now counts
        try:
            same = os.fstat(fd).st_ino == os.stat(path, follow_symlinks=False).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        stale = os.read(fd, 4096).decode("utf-8", "replace").strip()
        if stale:
            log.warning("%s: taking over the lock left by %s, which is gone (killed?)", folder, _holder_text(stale))
        os.lseek(fd, 0, os.SEEK_SET)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        held = OutputFolder(folder, created)
        sweep(folder)
        yield held
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # while still locked: a waiter then finds no file, or a new one
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if empty: a run that stopped before writing anything


def in_use(folder: str | Path) -> str | None:
    """Who holds ``folder`` (``"llmc process 123 on host, since ..."``), or None. For validation
    only: it reads the lock file's process id without locking (the run's :func:`hold` decides)."""
    path = Path(folder).expanduser() / LOCK_NAME
    try:
        text = path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return None
    info = _parse(text)
    if info is None or not _alive(info):
        return None
    return _holder_text(text)


def leftovers(folder: str | Path) -> list[Path]:
    """The entries of ``folder`` that are llmc's own and belong to no live process: a stale lock
    file and the partial files and folders of killed writes (not an ``.old-`` copy: that one is
    an earlier output, renamed back by :func:`sweep`)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        if p.name == LOCK_NAME:
            info = _parse(_read(p))
            if info is None or not _alive(info):
                found.append(p)
        elif (m := _PARTIAL.match(p.name)) and not _pid_alive(int(m["pid"])):
            found.append(p)
    return found


def sweep(folder: Path) -> list[str]:
    """Remove or restore what killed llmc processes left in ``folder`` and its checkpoint folder
    (the caller holds ``folder``); log and return the names."""
    from llmc_core.fsutil import _remove

    done = []
    for where in (folder, folder / ".checkpoints"):
        if not where.is_dir() or where.is_symlink():
            continue
        for p in sorted(where.iterdir()):
            if (m := _PARTIAL.match(p.name)) and not _pid_alive(int(m["pid"])):
                _remove(p)
                done.append(str(p.relative_to(folder)))
        targets = {m["name"] for p in where.iterdir() if (m := _OLD.match(p.name)) and not _pid_alive(int(m["pid"]))}
        for name in sorted(targets):
            recover_orphans(where / name)  # logs what it restored or removed
            done.append(f".{name}.old-*")
    if done:
        log.warning("%s: cleaned up after killed llmc runs: %s", folder, ", ".join(done))
    return done


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    out = {}
    with contextlib.suppress(OSError):
        for p in folder.iterdir():
            if not p.name.startswith("."):
                st = p.stat(follow_symlinks=False)
                out[p.name] = (st.st_ino, st.st_mtime_ns)
    return out


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return ""


def _parse(text: str) -> dict | None:
    try:
        info = json.loads(text)
    except ValueError:
        return None
    return info if isinstance(info, dict) and isinstance(info.get("pid"), int) and not isinstance(info.get("pid"), bool) else None


def _alive(info: dict) -> bool:
    if info.get("host") not in (None, socket.gethostname()):
        return True  # another machine's process: it cannot be checked from here, so it is live
    return info["pid"] == os.getpid() or _pid_alive(info["pid"])


def _pid_alive(pid: int) -> bool:
    from llmc_core.fsutil import _alive as alive_other

    return alive_other(pid)


def _holder_text(text: str) -> str:
    info = _parse(text)
    if info is None:
        return "another llmc process"
    return f"llmc process {info['pid']} on {info.get('host', '?')}, since {info.get('started', '?')}"


def _describe(path: Path) -> str:
    return _holder_text(_read(path))
