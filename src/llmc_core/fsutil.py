"""Atomic writes, the one way llmc puts a file or a folder in place.

Both helpers build the new content under a temporary sibling name, fsync it, move it into place
with one rename and fsync the parent directory, so after a crash or a power loss the target is
either the old content or the new one, never a mix, and never missing. The files written get the
umask's mode whatever their writer chose, and a full disk is one error line:

- :func:`atomic_file` for a single file (``results.json``, a checkpoint file, ``scales.pth``);
- :func:`atomic_folder` for a folder (a saved model). Replacing an existing folder swaps the two
  with ``renameat2(RENAME_EXCHANGE)`` on Linux; where that call is missing (other systems, some
  network file systems) the old folder is first renamed to ``.<name>.old-<pid>``, and an orphan of
  that kind left by a killed process is renamed back the next time llmc writes that target.

An existing target is an error unless ``overwrite`` is true, checked twice: when the write
starts, and by the final move itself (``renameat2(RENAME_NOREPLACE)`` for a folder, ``link`` for a
file), so a target that appeared while the content was being written is never replaced.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import functools
import glob
import logging
import os
import re
import secrets
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from llmc_core.errors import LlmcError

log = logging.getLogger("llmc")

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_RENAME_NOREPLACE = 1


def _ordinary_writes(write: Callable[..., contextlib.AbstractContextManager[Path]]) -> Callable[..., contextlib.AbstractContextManager[Path]]:
    """What every atomic write does around its writer: the files written get the umask's mode
    (safetensors writes 0600), and a full disk is one error line (:func:`_refuse_write_error`),
    after ``write`` has removed its temporary copy."""

    @functools.wraps(write)
    @contextlib.contextmanager
    def wrapper(target: str | Path, *args: Any, **kwargs: Any) -> Iterator[Path]:
        try:
            with write(target, *args, **kwargs) as tmp:
                yield tmp
                _ordinary_modes(tmp)
        except Exception as exc:
            _refuse_write_error(exc, Path(target))
            raise

    return wrapper


@_ordinary_writes
@contextlib.contextmanager
def atomic_file(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; write the file there. On success it replaces
    ``path`` atomically; on any exception it is removed and ``path`` is left as it was."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise LlmcError(f"{path} already exists; llmc never overwrites a file silently. Remove it, choose another path, or set save.overwrite: true.")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}-{secrets.token_hex(3)}")
    try:
        yield tmp
        tmp.chmod(0o666 & ~_umask())  # an ordinary file, whatever the writer chose (safetensors: 0600)
        _fsync_path(tmp)
        if overwrite:
            os.replace(tmp, path)
        else:
            _link_no_replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@_ordinary_writes
@contextlib.contextmanager
def atomic_folder(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``target`` atomically.

    An existing ``target`` is an error unless ``overwrite``; on any exception the temporary folder
    is removed and ``target`` is left as it was.
    """
    target = Path(target)
    recover_orphans(target)
    if target.exists() and not overwrite:
        raise LlmcError(f"{target} already exists; llmc never overwrites a folder silently. Remove it, choose another save.save_path, or set save.overwrite: true.")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.partial-{os.getpid()}-{secrets.token_hex(3)}")
    tmp.mkdir()  # an ordinary folder (umask applies): the saved model is not private
    try:
        yield tmp
        _fsync_tree(tmp)
        _move_into_place(tmp, target, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _refuse_write_error(exc: BaseException, target: Path) -> None:
    """A full disk, a quota or a read-only file system while writing ``target`` is the user's to
    fix: raise it as one error line (the partial copy is gone, the old content kept). Writers
    report it as an ``OSError``, or in their own words (safetensors: ``I/O error: ... (os error
    28)``; torch.save: no errno at all, so a disk with under 1 MiB free after a failed write
    counts too). Anything else is left to the caller to re-raise."""
    if not isinstance(exc, Exception) or isinstance(exc, LlmcError):
        return
    found = re.search(r"os error (\d+)", str(exc))
    code = exc.errno if isinstance(exc, OSError) else int(found.group(1)) if found else None
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS):
        why = os.strerror(code)
    elif _free_bytes(target.parent) < 1 << 20:
        why = "the disk is full"
    else:
        return
    raise LlmcError(f"could not write {target}: {why}. Nothing half-written was left and any earlier {target.name} is unchanged; free some space (or choose another save.save_path) and run again.") from exc


def _free_bytes(folder: Path) -> int:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return 1 << 62  # unknown: not a reason to call it full


def recover_orphans(target: Path) -> None:
    """Undo what a process killed between the two renames of the fallback left: ``target``
    missing and the old content at ``.<name>.old-<pid>`` is renamed back; an old copy beside a
    complete new ``target`` is removed. Orphans of a live process are left alone (it is busy)."""
    orphans = []
    for p in target.parent.glob(f".{glob.escape(target.name)}.old-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if not (pid.isdigit() and _alive(int(pid))):
            orphans.append(p)
    orphans.sort(key=lambda p: p.stat().st_mtime)
    if orphans and not target.exists():
        back = orphans.pop()
        back.rename(target)
        fsync_dir(target.parent)
        log.warning("restored %s from %s, left by a run that was killed while replacing it", target, back.name)
    for p in orphans:
        log.info("removing %s, the old copy of %s left by a killed run (the new one is complete)", p, target.name)
        _remove(p)


def fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (the directory entry itself is data)."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _appeared(target: Path) -> LlmcError:
    return LlmcError(f"{target} appeared while this run was writing it (another process?); llmc never replaces an output silently, so it was left as it is and this run's copy was removed. Set save.overwrite: true to replace it.")


def _link_no_replace(tmp: Path, path: Path) -> None:
    """Put ``tmp`` at ``path`` only if nothing is there (``link`` fails on an existing name)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise _appeared(path) from None
    except OSError:  # a file system without hard links: the check and the move are two steps
        if path.exists():
            raise _appeared(path) from None
        os.replace(tmp, path)
        return
    tmp.unlink()


def _move_into_place(tmp: Path, target: Path, overwrite: bool = True) -> None:
    if not overwrite:
        if not _rename_no_replace(tmp, target):
            if target.exists():
                raise _appeared(target)
            tmp.rename(target)  # where renameat2 is missing: the check and the move are two steps
    elif not target.exists():
        tmp.rename(target)
    elif _exchange(tmp, target):  # one atomic step: tmp now holds the old content
        fsync_dir(target.parent)
        _remove(tmp)
    else:
        trash = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(trash)
        try:
            tmp.rename(target)
        except BaseException:  # interrupted between the two renames: put the old one back
            if not target.exists():
                trash.rename(target)
            raise
        fsync_dir(target.parent)
        _remove(trash)
    fsync_dir(target.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Swap ``a`` and ``b`` atomically with Linux's ``renameat2``; False where it is unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):  # no libc, or a glibc older than 2.28
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: this file system cannot exchange
        return False
    raise OSError(err, os.strerror(err), str(b))


def _rename_no_replace(a: Path, b: Path) -> bool:
    """Rename ``a`` to ``b`` unless ``b`` exists (even an empty folder, which a plain rename
    replaces); False where ``renameat2`` is unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_NOREPLACE) == 0:
        return True
    err = ctypes.get_errno()
    if err == 17:  # EEXIST
        raise _appeared(b)
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP
        return False
    raise OSError(err, os.strerror(err), str(b))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own orphan can only be from an earlier, failed attempt
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def _fsync_path(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _ordinary_modes(root: Path) -> None:
    """Give every file under ``root`` the umask's mode, whatever its writer chose (safetensors
    writes 0600): a saved model is for others to read, as ``cp`` would leave it."""
    mode = 0o666 & ~_umask()
    if not root.is_dir():
        root.chmod(mode)
    for dirpath, _, files in os.walk(root):
        for name in files:
            os.chmod(Path(dirpath) / name, mode)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            _fsync_path(Path(dirpath) / name)
        fsync_dir(Path(dirpath))


def output_folder_problem(where: str, folder: str | Path | None, run_config: Any, what: str) -> str | None:
    """The one rule for a plugin's own output folder (``opencompass.output_path``,
    ``lm_eval.output_path``): a file there, or an existing non-empty folder without
    ``save.overwrite: true`` (or ``llmc run --resume``), is a problem line naming ``where``."""
    if folder is None:
        return None
    out = Path(folder).expanduser()
    if out.exists() and not out.is_dir():
        return f"{where}: {out} is a file. Give a folder for {what}."
    may_overwrite = bool(getattr(run_config.save, "overwrite", False)) or bool(getattr(run_config, "resume", False))
    if out.is_dir() and any(out.iterdir()) and not may_overwrite:
        return f"{where}: {out} already exists and is not empty. Choose a new path, or set save.overwrite: true to write this run's {what} there too."
    return None
