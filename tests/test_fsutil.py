"""Atomic writes: nothing is lost when a process dies in the middle of replacing a file or folder."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from llmc_core import fsutil
from llmc_core.errors import LlmcError
from llmc_core.fsutil import atomic_file, atomic_folder


def _old_folder(tmp_path: Path) -> Path:
    target = tmp_path / "model"
    target.mkdir()
    (target / "weights").write_text("old")
    return target


def _record_fsyncs(monkeypatch) -> list[int]:
    """The inode of everything fsynced from now on."""
    inodes: list[int] = []
    real = os.fsync

    def fsync(fd):
        inodes.append(os.fstat(fd).st_ino)
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return inodes


def test_kill_between_the_two_renames_is_recovered_at_the_next_write(tmp_path):
    """The fallback path (no renameat2): SIGKILL-like death (os._exit, no cleanup runs) after the
    old folder was moved aside leaves no target; the next write of that target puts it back."""
    target = _old_folder(tmp_path)
    child = textwrap.dedent(
        f"""
        import os
        from pathlib import Path
        from llmc_core import fsutil
        fsutil._exchange = lambda a, b: False
        real = Path.rename
        def rename(self, dest):
            if ".partial-" in self.name:  # the second rename: die before it
                os._exit(9)
            return real(self, dest)
        Path.rename = rename
        with fsutil.atomic_folder(Path({str(target)!r}), overwrite=True) as tmp:
            (tmp / "weights").write_text("new")
        """
    )
    res = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120)
    assert res.returncode == 9, res.stderr
    assert not target.exists() and [p.name for p in tmp_path.iterdir() if ".old-" in p.name]  # the crash window is real

    with pytest.raises(LlmcError, match="already exists"), atomic_folder(target, overwrite=False):
        pass  # the old folder is back, so a non-overwriting write is refused
    assert (target / "weights").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".model.partial-")] == ["model"]


def test_an_old_copy_beside_a_complete_target_is_removed(tmp_path):
    target = _old_folder(tmp_path)
    orphan = tmp_path / f".model.old-{2**22 + 12345}"  # no such process
    orphan.mkdir()
    (orphan / "weights").write_text("older")
    with atomic_folder(target, overwrite=True) as tmp:
        (tmp / "weights").write_text("new")
    assert (target / "weights").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 is Linux-only")
def test_replacement_exchanges_in_one_step_on_linux(tmp_path, monkeypatch):
    """With renameat2 the old folder is never moved aside: there is no moment without a target."""
    target = _old_folder(tmp_path)
    probe_a, probe_b = tmp_path / "a", tmp_path / "b"
    probe_a.mkdir()
    probe_b.mkdir()
    if not fsutil._exchange(probe_a, probe_b):
        pytest.skip("this file system cannot exchange")
    renamed = []
    real = Path.rename
    monkeypatch.setattr(Path, "rename", lambda self, dest: renamed.append(self.name) or real(self, dest))
    with atomic_folder(target, overwrite=True) as tmp:
        (tmp / "weights").write_text("new")
    assert (target / "weights").read_text() == "new"
    assert renamed == []  # no rename of the target aside (the fallback's first step)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "model"]


@pytest.mark.parametrize("exchange", [True, False])
def test_folder_replacement_fsyncs_the_parent_directory(tmp_path, monkeypatch, exchange):
    target = _old_folder(tmp_path)
    if not exchange:
        monkeypatch.setattr(fsutil, "_exchange", lambda a, b: False)
    inodes = _record_fsyncs(monkeypatch)
    with atomic_folder(target, overwrite=True) as tmp:
        (tmp / "weights").write_text("new")
    assert tmp_path.stat().st_ino in inodes  # the rename itself is durable
    assert (target / "weights").stat().st_ino in inodes  # and the content before it


def test_file_write_fsyncs_file_and_parent_and_replaces_atomically(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    path.write_text("old")
    inodes = _record_fsyncs(monkeypatch)
    with atomic_file(path, overwrite=True) as tmp:
        tmp.write_text("new")
        assert path.read_text() == "old"  # nothing visible until the write is complete
    assert path.read_text() == "new"
    assert path.stat().st_ino in inodes and tmp_path.stat().st_ino in inodes
    umask = os.umask(0)
    os.umask(umask)
    with atomic_file(tmp_path / "private", overwrite=False) as tmp:
        tmp.touch(mode=0o600)  # as safetensors' writer does
    assert (tmp_path / "private").stat().st_mode & 0o777 == 0o666 & ~umask  # an ordinary file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["private", "results.json"]


def test_file_write_refuses_an_existing_file_and_cleans_up_on_error(tmp_path):
    path = tmp_path / "scales.pth"
    path.write_text("mine")
    with pytest.raises(LlmcError, match="already exists"), atomic_file(path):
        pass
    with pytest.raises(RuntimeError), atomic_file(path, overwrite=True) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash while writing")
    assert path.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["scales.pth"]


def test_no_hand_rolled_renames_left():
    """One atomic writer: the only renames in llmc's sources are in fsutil."""
    src = Path(__file__).resolve().parents[1] / "src"
    offenders = []
    for path in src.rglob("*.py"):
        if path.name == "fsutil.py" or "oc_side" in path.parts:  # oc_side runs inside OpenCompass
            continue
        text = path.read_text(encoding="utf-8")
        for needle in ("os.replace(", ".rename(", "tempfile.", ".replace(path)", "os.rename("):
            if needle in text:
                offenders.append(f"{path.relative_to(src)}: {needle}")
    assert offenders == []


def test_folder_files_get_the_umask_mode_whatever_the_writer_chose(tmp_path):
    """safetensors writes its files 0600; a saved model folder is for others to read (issue 32)."""
    umask = os.umask(0o022)
    try:
        with atomic_folder(tmp_path / "model") as tmp:
            (tmp / "model.safetensors").touch(mode=0o600)
            (tmp / "sub").mkdir()
            (tmp / "sub" / "scales.safetensors").touch(mode=0o600)
    finally:
        os.umask(umask)
    for path in (tmp_path / "model" / "model.safetensors", tmp_path / "model" / "sub" / "scales.safetensors"):
        assert path.stat().st_mode & 0o777 == 0o644, path


def test_a_full_disk_while_writing_is_one_error_and_keeps_the_old_content(tmp_path):
    """ENOSPC as an OSError (Python's writers) or in safetensors' words: one LlmcError; other
    errors stay what they are."""
    import errno

    target = _old_folder(tmp_path)
    for raised in (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")):
        with pytest.raises(LlmcError, match=r"could not write .*/model: No space left on device\. Nothing half-written was left"), atomic_folder(target, overwrite=True) as tmp:
            (tmp / "weights").write_text("half")
            raise raised
        assert (target / "weights").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    with pytest.raises(OSError, match="Permission"), atomic_file(tmp_path / "x", overwrite=True):
        raise PermissionError(errno.EACCES, "Permission denied")
