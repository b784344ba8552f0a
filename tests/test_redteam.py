"""Red team (issue 32): the CLI against a hostile or careless user, on tiny models.

- **Concurrency**: a second llmc process into a save_path in use is refused, even with
  ``overwrite: true`` or ``--resume``, and the first run finishes untouched; two runs started
  together into one fresh folder give one result and one refusal, never a silent mix.
- **Kill at each stage**: a checkpointed AWQ run is SIGKILLed (no cleanup of any kind runs) on
  entering each stage, after the first block is kept, inside a folder save and inside the report;
  the next ``llmc run`` (``--resume`` where a checkpoint is left) finishes, leaves no temporary
  file, lock or checkpoint, and gives the uninterrupted run's results and model.
- **Tamper**: on a SIGKILLed run's checkpoint, a regenerated model, a changed calibration file,
  manifest entries of the wrong shape, a pickle in a block file and a ``.checkpoints`` symlink
  each stop ``--resume`` with one ``llmc:`` line and exit 2; the untouched checkpoint resumes.

Marked ``slow`` (about two minutes on two CPU cores): ``pytest -m slow tests/test_redteam.py``.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

import llmc_core
from llmc_core.testing import read_results, run_cli, run_config, save_tiny_llama, write_config, write_corpus

pytestmark = pytest.mark.slow

SRC = Path(llmc_core.__file__).resolve().parents[1]  # the llmc under test, for the child processes

# ``python -c WRAPPER llmc-args...``: the CLI with kill and pause points chosen by LLMC_REDTEAM:
#   stage:<prefix>  SIGKILL on entering the first stage whose name starts with <prefix>
#   block:<i>       SIGKILL right after block <i> is kept in the checkpoint
#   save            SIGKILL inside the first folder save, its content written, not yet moved in
#   report          SIGKILL while the report's first file is written under its temporary name
#   wait:<prefix>   on entering that stage, print "waiting" and wait until $LLMC_REDTEAM_GO exists
# ``python -c WRAPPER --serve`` imports llmc, torch and transformers once and then, for each JSON
# line ``{"args": [...], "env": {...}}`` on stdin, forks a child that runs the CLI so (its stderr
# into ``env["STDERR"]``, its stdout discarded) and answers ``{"status": <exit code, or -signal>}``: a fresh process per
# run without paying the imports each time (nothing has run torch in the parent, so forking is safe).
WRAPPER = textwrap.dedent(
    """
    import contextlib, json, os, signal, sys, time
    from pathlib import Path
    from llmc_core import checkpoint, fsutil, run
    from llmc_core.cli import main

    def point():
        how, _, arg = os.environ.get("LLMC_REDTEAM", "").partition(":")
        return how, arg

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    real_stage = run.Run.stage

    @contextlib.contextmanager
    def stage(self, name):
        how, arg = point()
        if how == "stage" and name.startswith(arg):
            die()
        if how == "wait" and name.startswith(arg):
            print("waiting", flush=True)
            while not Path(os.environ["LLMC_REDTEAM_GO"]).exists():
                time.sleep(0.05)
        with real_stage(self, name):
            yield

    run.Run.stage = stage
    real_save_block = checkpoint.Checkpoint.save_block

    def save_block(self, state, ctx):
        real_save_block(self, state, ctx)
        how, arg = point()
        if how == "block" and ctx.index == int(arg):
            die()

    checkpoint.Checkpoint.save_block = save_block
    real_fsync_tree, real_fsync_path = fsutil._fsync_tree, fsutil._fsync_path

    def fsync_tree(root):
        real_fsync_tree(root)
        if point()[0] == "save":
            die()

    def fsync_path(path):
        real_fsync_path(path)
        if point()[0] == "report" and Path(path).name.startswith(".report."):
            die()

    fsutil._fsync_tree, fsutil._fsync_path = fsync_tree, fsync_path

    if sys.argv[1:] != ["--serve"]:
        sys.exit(main(sys.argv[1:]))
    import torch, transformers  # noqa: F401 - imported once, before the forks
    print("ready", flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            os.environ.update(request["env"])
            fd = os.open(request["env"]["STDERR"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 2)
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # stdout is the answer channel
            sys.stderr = os.fdopen(2, "w", buffering=1)
            sys.stdout = os.fdopen(1, "w", buffering=1)
            try:
                code = main(request["args"])
            except BaseException:
                import traceback
                traceback.print_exc()
                code = 99
            sys.stderr.flush()
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        print(json.dumps({"status": code}), flush=True)
    """
)


@pytest.fixture(scope="module")
def forks():
    """``forks(args, stderr_path, **env) -> (status, stderr)``: the CLI in a fresh forked process."""
    server = subprocess.Popen([sys.executable, "-c", WRAPPER, "--serve"], env=_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert server.stdout.readline().strip() == "ready"

    def fork(args: list[str], stderr: Path, **env: str) -> tuple[int, str]:
        server.stdin.write(json.dumps({"args": args, "env": {"STDERR": str(stderr), "LLMC_REDTEAM": "", **env}}) + "\n")
        server.stdin.flush()
        status = json.loads(server.stdout.readline())["status"]
        return status, stderr.read_text()

    yield fork
    server.stdin.close()
    server.wait(timeout=60)


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]), "TQDM_DISABLE": "1", **extra}


def _start(args: list[str], **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WRAPPER, *args], env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _one_line(res, *words: str) -> str:
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("llmc:")]
    code = getattr(res, "exit_code", getattr(res, "returncode", None))
    assert code == 2 and len(errors) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    for w in words:
        assert w in errors[0], errors[0]
    return errors[0]


def _clean(out: Path) -> None:
    """Nothing temporary left: no partial or old copy, no lock, no checkpoint."""
    names = [p.name for p in out.iterdir()]
    assert not [n for n in names if ".partial-" in n or ".old-" in n or n in (".llmc.lock", ".checkpoints")], names


def _same_model(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "fake_quant_model" / "model.safetensors"), load_file(b / "fake_quant_model" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(wa[k].equal(wb[k]) for k in wa)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A tiny model, a corpus, a config writer and an uninterrupted reference run."""
    root = tmp_path_factory.mktemp("redteam")
    model = save_tiny_llama(root / "model", layers=2)
    corpus = write_corpus(root / "corpus.txt")

    def config(name: str, **save: object) -> tuple[Path, Path]:
        out = root / name
        cfg = run_config(model, corpus, out, method="awq", bit=4, eval_pos=("pretrain", "transformed", "fake_quant"), special={"n_grid": 2, "search_dtype": "float32"})
        cfg["eval"]["num_samples"] = 2
        cfg["save"] = {"save_path": str(out), "save_fake": True, "save_trans": True, "checkpoint_blocks": True, **save}
        return write_config(root / f"{name}.yml", cfg), out

    ref_cfg, ref_out = config("reference")
    res = run_cli("run", str(ref_cfg), "-q")
    assert res.exit_code == 0, res.stderr
    return {"root": root, "model": model, "corpus": corpus, "config": config, "ref": ref_out}


KILLS = [
    "stage:load model",
    "stage:eval pretrain",
    "stage:calibration data",
    "stage:awq transform",
    "block:0",
    "stage:eval transformed",
    "save",
    "stage:quantize",
    "stage:eval fake_quant",
    "stage:save fake",
    "report",
]


def test_kill_at_each_stage_then_recover(lab, forks):
    started = time.monotonic()
    for i, kill in enumerate(KILLS):
        cfg, out = lab["config"](f"kill{i}")
        status, stderr = forks(["run", str(cfg), "-q"], lab["root"] / f"kill{i}.err", LLMC_REDTEAM=kill)
        assert status == -9, (kill, status, stderr[-2000:])
        if kill == "save":
            assert [p for p in out.iterdir() if ".partial-" in p.name], kill  # the kill left a partial folder
        if kill == "report":
            assert [p for p in out.iterdir() if p.name.startswith(".report.") and ".partial-" in p.name], kill
        assert (out / ".llmc.lock").exists(), kill  # SIGKILL: the lock file stays, stale
        resume = (out / ".checkpoints" / "manifest.json").is_file()
        again = run_cli("run", str(cfg), *(["--resume"] if resume else []), "-q")
        assert again.exit_code == 0, (kill, again.stderr[-3000:])
        assert "taking over the lock" in again.stderr, kill
        _clean(out)
        assert read_results(out) == read_results(lab["ref"]), kill
        _same_model(out, lab["ref"])
        shutil.rmtree(out)
    assert time.monotonic() - started < 600


def test_a_save_path_in_use_is_refused_and_the_run_finishes(lab, forks):
    cfg, out = lab["config"]("busy")
    go = lab["root"] / "go"
    first = _start(["run", str(cfg), "-q"], LLMC_REDTEAM="wait:awq transform", LLMC_REDTEAM_GO=str(go))
    try:
        assert first.stdout.readline().strip() == "waiting"
        for args in (["run", str(cfg), "-q", "save.overwrite=true"], ["run", str(cfg), "--resume", "-q"]):
            _one_line(run_cli(*args), "in use by llmc process", str(first.pid))
        other_cfg, _ = lab["config"]("busy_other", save_path=str(out), overwrite=True)
        status, stderr = forks(["run", str(other_cfg), "-q"], lab["root"] / "busy_other.err")
        assert status == 2 and "Traceback" not in stderr, stderr[-3000:]
        assert [ln for ln in stderr.splitlines() if ln.startswith("llmc:")] == [f"llmc: save.save_path: {out} is in use by " + stderr.split(" is in use by ", 1)[1].splitlines()[0]]
        assert f"llmc process {first.pid}" in stderr
        manifest = json.loads((out / ".checkpoints" / "manifest.json").read_text())
        assert manifest["positions"] == ["pretrain"]  # the refused runs did not touch the checkpoint
        go.touch()
        _, err = first.communicate(timeout=300)
        assert first.returncode == 0, err[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
    _clean(out)
    assert read_results(out) == read_results(lab["ref"])
    _same_model(out, lab["ref"])


def test_two_runs_started_together_give_one_result(lab):
    cfg_a, out = lab["config"]("pair")
    cfg_b, _ = lab["config"]("pair_b", save_path=str(out))
    procs = [_start(["run", str(c), "-q"]) for c in (cfg_a, cfg_b)]
    results = [(p.wait(timeout=300), p.communicate()[1]) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    refusal = next(err for code, err in results if code == 2)
    assert "Traceback" not in refusal and ("in use by llmc process" in refusal or "not empty" in refusal or "appeared" in refusal), refusal
    _clean(out)
    assert read_results(out) == read_results(lab["ref"])
    _same_model(out, lab["ref"])


def test_tampered_checkpoint_after_a_kill(lab, forks):
    cfg, out = lab["config"]("tamper")
    status, stderr = forks(["run", str(cfg), "-q"], lab["root"] / "tamper.err", LLMC_REDTEAM="block:0")
    assert status == -9, stderr[-2000:]
    ckpt = out / ".checkpoints"
    pristine = lab["root"] / "tamper_pristine"
    shutil.copytree(ckpt, pristine)
    model, corpus = lab["model"], lab["corpus"]
    saved_model = lab["root"] / "model_copy"
    shutil.copytree(model, saved_model)
    shutil.copy2(corpus, lab["root"] / "corpus_copy.txt")
    marker = lab["root"] / "pwned"

    def manifest(change):
        def tamper():
            data = json.loads((ckpt / "manifest.json").read_text())
            change(data)
            (ckpt / "manifest.json").write_text(json.dumps(data))

        return tamper

    def regenerate_model():
        save_tiny_llama(model, layers=2, seed=7)

    def change_corpus():
        write_corpus(corpus, seed=7)

    def pickle_block():
        (ckpt / "block_00000.pt").write_bytes(pickle.dumps({"state_dict": _Evil(marker)}))

    def symlink_folder():
        shutil.rmtree(ckpt)
        ckpt.symlink_to(pristine)

    cases = {
        "regenerated model": (regenerate_model, "model.path"),
        "changed calibration file": (change_corpus, "calib.path"),
        "rows path": (manifest(lambda m: m.__setitem__("rows_0", "../../etc/x")), "rows_0"),
        "value string": (manifest(lambda m: m["records"][0].__setitem__("value", "abc")), "value"),
        "position list": (manifest(lambda m: m["records"][0].__setitem__("position", ["pretrain"])), "position"),
        "method_undeclared numbers": (manifest(lambda m: m.__setitem__("method_undeclared", [1])), "method_undeclared"),
        "pickle block": (pickle_block, "block_00000.pt"),
        ".checkpoints symlink": (symlink_folder, "symbolic link"),
    }
    for case, (tamper, word) in cases.items():
        tamper()
        res = run_cli("run", str(cfg), "--resume", "-q")
        assert word in _one_line(res), case
        assert not marker.exists(), case
        # put everything back for the next case
        if ckpt.is_symlink():
            ckpt.unlink()
        shutil.rmtree(ckpt, ignore_errors=True)
        shutil.copytree(pristine, ckpt)
        shutil.rmtree(model)
        shutil.copytree(saved_model, model)  # copytree keeps the modification times (copy2)
        shutil.copy2(lab["root"] / "corpus_copy.txt", corpus)
    res = run_cli("run", str(cfg), "--resume", "-q")
    assert res.exit_code == 0, res.stderr[-3000:]
    _clean(out)
    assert read_results(out) == read_results(lab["ref"])
    _same_model(out, lab["ref"])


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))
