"""Issue 32: what llmc reads and writes is guarded. Remote code is never run from a folder llmc
reads; one llmc process at a time writes into a save_path; a model missing a weight is refused; a
resume whose model or data changed is refused; what killed runs left is cleaned up; a tampered
checkpoint manifest is one line, never a traceback or a silently dropped result; and a run with
``save.overwrite: true`` says which earlier outputs it kept."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from llmc_core import hookimpl
from llmc_core.errors import LlmcError
from llmc_core.testing import StopAfterBlock, read_results, registered, run_cli, run_config, save_tiny_llama, write_config
from llmc_plugins.methods.rtn import Rtn

SRC = Path(__file__).resolve().parents[1] / "src"


def _errors(res) -> list[str]:
    return [ln for ln in res.stderr.splitlines() if ln.startswith("llmc:")]


def _one_line(res, *words: str) -> str:
    """``res`` is a user error: exit 2, exactly one ``llmc:`` line holding ``words``, no traceback."""
    errors = _errors(res)
    assert res.exit_code == 2, res.stderr[-3000:]
    assert len(errors) == 1, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    for w in words:
        assert w in errors[0], errors[0]
    return errors[0]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# -- 1. trust_remote_code --------------------------------------------------------------------


def test_every_from_pretrained_passes_trust_remote_code():
    """A ``from_pretrained`` call without an explicit ``trust_remote_code=`` lets transformers ask
    on stdin (or decide by itself) whether to run a folder's Python files."""
    missing = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "from_pretrained":
                if not any(k.arg == "trust_remote_code" for k in node.keywords):
                    missing.append(f"{path.relative_to(SRC)}:{node.lineno}")
    assert not missing, f"from_pretrained without trust_remote_code=: {missing}"


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory, tiny_model_dir, tiny_text_file) -> Path:
    """A finished RTN run with save_fake (its save_path)."""
    tmp = tmp_path_factory.mktemp("fake_run")
    out = tmp / "out"
    cfg = run_config(tiny_model_dir, tiny_text_file, out, eval=None)
    del cfg["eval"]
    cfg["save"] = {"save_path": str(out), "save_fake": True}
    res = run_cli("run", str(write_config(tmp / "cfg.yml", cfg)), "-q")
    assert res.exit_code == 0, res.stderr
    return out


def test_export_never_runs_the_folders_tokenizer_code(tmp_path, fake_run, monkeypatch):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(fake_run, out)
    fake = out / "fake_quant_model"
    marker = tmp_path / "pwned"
    (fake / "evil_tok.py").write_text(f"open({str(marker)!r}, 'w').close()\nfrom transformers import PreTrainedTokenizerFast\nclass EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    tok_cfg = json.loads((fake / "tokenizer_config.json").read_text())
    tok_cfg.update(tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": [None, "evil_tok.EvilTokenizer"]})
    (fake / "tokenizer_config.json").write_text(json.dumps(tok_cfg))

    class NoStdin:
        def readline(self, *a):
            raise AssertionError("llmc export read stdin")

        read = readline

    monkeypatch.setattr(sys, "stdin", NoStdin())
    res = run_cli("export", str(out), "--to", "vllm")
    _one_line(res, "tokenizer", str(fake))
    assert not marker.exists(), "the folder's tokenizer code ran"
    assert not (out / "vllm_quant_model").exists()


# -- 2. one llmc process per save_path --------------------------------------------------------


def test_a_held_save_path_is_refused_in_process(tmp_path):
    from llmc_core.outlock import hold

    with hold(tmp_path / "out") as held:
        assert (tmp_path / "out" / ".llmc.lock").is_file() and held.created
        with pytest.raises(LlmcError, match=rf"is in use by llmc process {os.getpid()}"), hold(tmp_path / "out"):
            pass
    assert not (tmp_path / "out").exists()  # created for the run, left empty: removed again
    with hold(tmp_path / "out"):  # released on the way out
        pass


HOLDER = textwrap.dedent(
    """
    import sys, time
    from llmc_core.outlock import hold
    with hold(sys.argv[1]):
        print("held", flush=True)
        time.sleep(120)
    """
)


@pytest.fixture
def held_elsewhere(tmp_path):
    """``hold`` the folder from another process; yields (folder, process)."""
    folder = tmp_path / "held"
    import llmc_core

    env = {**os.environ, "PYTHONPATH": f"{Path(llmc_core.__file__).resolve().parents[1]}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "held"
        yield folder, proc
    finally:
        proc.kill()
        proc.wait()


def test_a_run_into_a_save_path_in_use_is_refused(tmp_path, held_elsewhere, tiny_model_dir, tiny_text_file):
    folder, proc = held_elsewhere
    cfg = run_config(tiny_model_dir, tiny_text_file, folder, eval_pos=("fake_quant",))
    cfg["save"] = {"save_path": str(folder), "save_fake": True, "overwrite": True}
    path = write_config(tmp_path / "cfg.yml", cfg)
    _one_line(run_cli("validate", str(path)), "in use by llmc process", str(proc.pid))
    _one_line(run_cli("run", str(path), "-q"), "in use by llmc process", str(proc.pid))
    assert sorted(p.name for p in folder.iterdir()) == [".llmc.lock"]  # nothing written beside it

    proc.kill()  # SIGKILL: the lock file stays, stale, and the next run takes it over
    proc.wait()
    res = run_cli("run", str(path), "-q")
    assert res.exit_code == 0, res.stderr
    assert f"taking over the lock left by llmc process {proc.pid}" in res.stderr
    assert not (folder / ".llmc.lock").exists() and (folder / "fake_quant_model").is_dir()


def test_export_into_a_save_path_in_use_is_refused(tmp_path, fake_run, held_elsewhere):
    import shutil

    folder, proc = held_elsewhere
    shutil.copytree(fake_run / "fake_quant_model", folder / "fake_quant_model")
    _one_line(run_cli("export", str(folder), "--to", "vllm"), "in use by llmc process", str(proc.pid))


@pytest.mark.parametrize("intruder", ["empty", "full"])
def test_the_final_move_never_replaces_a_folder_that_appeared(tmp_path, intruder):
    """The exists-check at the start is not enough: a folder that appears while the content is
    being written is left as it is (unless overwrite), and the move fails with one line."""
    from llmc_core.fsutil import atomic_folder

    target = tmp_path / "model"
    with pytest.raises(LlmcError, match="appeared while this run was writing it"), atomic_folder(target) as tmp:
        (tmp / "weights").write_text("new")
        target.mkdir()
        if intruder == "full":
            (target / "weights").write_text("theirs")
    assert sorted(p.name for p in target.iterdir()) == ([] if intruder == "empty" else ["weights"])
    assert intruder == "empty" or (target / "weights").read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no partial left


def test_the_final_file_move_never_replaces_a_file_that_appeared(tmp_path):
    from llmc_core.fsutil import atomic_file

    target = tmp_path / "results.json"
    with pytest.raises(LlmcError, match="appeared"), atomic_file(target) as tmp:
        tmp.write_text("new")
        target.write_text("theirs")
    assert target.read_text() == "theirs" and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


# -- 3. a model folder missing a weight -------------------------------------------------------


@pytest.mark.parametrize("how", ["missing", "unexpected"])
def test_a_checkpoint_missing_or_adding_a_tensor_is_refused(tmp_path, tiny_text_file, how):
    import torch
    from safetensors.torch import load_file, save_file

    model = save_tiny_llama(tmp_path / "model")
    weights = load_file(model / "model.safetensors")
    if how == "missing":
        del weights["model.layers.1.mlp.down_proj.weight"]
        name = "model.layers.1.mlp.down_proj.weight"
    else:
        weights["model.layers.1.mlp.extra.weight"] = torch.zeros(2)
        name = "model.layers.1.mlp.extra.weight"
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    cfg = run_config(model, tiny_text_file, out, eval_pos=("fake_quant",))
    cfg["save"] = {"save_path": str(out), "save_fake": True}
    res = run_cli("run", str(write_config(tmp_path / "cfg.yml", cfg)), "-q")
    _one_line(res, name, "model.path")
    assert not (out / "fake_quant_model").exists()


def test_a_bert_folder_without_its_head_is_refused(tmp_path, tiny_text_file):
    """model.type: auto on a BERT encoder folder: the causal-LM head is not in the checkpoint
    (transformers would make it up) and the pooler has no place in the model."""
    from transformers import BertConfig, BertModel

    from llmc_core.testing import word_tokenizer

    folder = tmp_path / "bert"
    BertModel(BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, max_position_embeddings=128)).save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    out = tmp_path / "out"
    cfg = run_config(folder, tiny_text_file, out, eval_pos=("fake_quant",))
    cfg["model"]["type"] = "auto"
    cfg["eval"]["seq_len"] = 32
    cfg["save"] = {"save_path": str(out), "save_fake": True}
    res = run_cli("run", str(write_config(tmp_path / "cfg.yml", cfg)), "-q")
    errors = _errors(res)
    assert res.exit_code == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert any("missing from the checkpoint" in e and "cls.predictions" in e for e in errors), errors
    assert any("not in the model" in e and "pooler.dense.weight" in e for e in errors), errors
    assert not (out / "fake_quant_model").exists()


# -- 4. --resume checks its inputs ------------------------------------------------------------


class CalibRtn(Rtn):
    """Test method: RTN with a (no-op) calibration pass, so the run keeps block checkpoints."""

    name = "calib_rtn_test"
    needs_calibration = True


class _Plugin:
    @hookimpl
    def llmc_register_methods(self, register):
        register(CalibRtn)


CALIB_PLUGIN = _Plugin()  # one object: registering it again while registered is a no-op


@pytest.fixture
def calib_method():
    with registered(CALIB_PLUGIN, name="test:calib_rtn"):
        yield


def _interrupted(tmp_path, model, corpus, name="out"):
    """A checkpointed run stopped after block 0; returns (config path, save_path)."""
    out = tmp_path / name
    cfg = run_config(model, corpus, out, method="calib_rtn_test")
    cfg["eval"]["num_samples"] = 1
    cfg["save"] = {"save_path": str(out), "save_fake": True, "checkpoint_blocks": True}
    path = write_config(tmp_path / f"{name}.yml", cfg)
    with registered(StopAfterBlock(0), name="test:stop_after_block"):
        res = run_cli("run", str(path), "-q")
    assert res.exit_code == 130 and "1 block(s) kept" in res.stderr, res.stderr
    return path, out


@pytest.mark.parametrize("change", ["model", "calib", "touched"])
def test_resume_refuses_changed_inputs(tmp_path, calib_method, change):
    from llmc_core.testing import write_corpus

    model = save_tiny_llama(tmp_path / "model")
    corpus = write_corpus(tmp_path / "corpus.txt")
    path, out = _interrupted(tmp_path, model, corpus)
    if change == "model":  # regenerated at the same path: same names, same sizes, other weights
        save_tiny_llama(model, seed=1)
        words = ("model.path", "model.safetensors changed (content)")
    elif change == "calib":
        write_corpus(corpus, seed=1)
        words = ("calib.path", "corpus.txt changed")
    else:
        os.utime(model / "config.json", ns=(1, 1))
        words = ("model.path", "config.json changed (modification time)")
    _one_line(run_cli("run", str(path), "--resume", "-q"), "--resume: the inputs changed", *words)
    assert (out / ".checkpoints" / "manifest.json").is_file()  # the checkpoint is kept


def test_large_inputs_are_fingerprinted_on_samples(tmp_path, monkeypatch):
    """Above the whole-file limit (or past the budget) a file is hashed on head, middle and tail:
    a change there is found even when size and modification time are kept."""
    from llmc_core import fingerprint

    monkeypatch.setattr(fingerprint, "FULL_HASH_BYTES", 64)
    monkeypatch.setattr(fingerprint, "SAMPLE_BYTES", 8)
    data = tmp_path / "data"
    data.mkdir()
    (data / "big.bin").write_bytes(bytes(200))
    (data / ".cache").mkdir()
    (data / ".cache" / "x").write_text("ignored")
    before = fingerprint.describe(data)
    assert list(before["files"]) == ["big.bin"]
    st = (data / "big.bin").stat()
    (data / "big.bin").write_bytes(bytes(196) + b"tail")
    os.utime(data / "big.bin", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert fingerprint.changes({"calib.path": before}, {"calib.path": fingerprint.describe(data)}) == ["calib.path: big.bin changed (content)"]


# -- 9 (checkpoint part) and 10. a tampered manifest ------------------------------------------


def _set(key, value):
    def tamper(m):
        m[key] = value

    return tamper


def _record(field, value):
    def tamper(m):
        m["records"][0][field] = value

    return tamper


TAMPERS = {
    "rows path": (_set("rows_0", "../../etc/x"), "rows_0"),
    "rows of numbers": (_set("rows_0", [1, 2]), "rows_0"),
    "rows of another block": (_set("rows_5", []), "rows_5"),
    "method_undeclared numbers": (_set("method_undeclared", [1, 2]), "method_undeclared"),
    "method_undeclared string": (_set("method_undeclared", "seen"), "method_undeclared"),
    "value string": (_record("value", "abc"), "value"),
    "value bool": (_record("value", True), "value"),
    "position list": (_record("position", ["pretrain"]), "position"),
    "position unknown": (_record("position", "elsewhere"), "position"),
    "seconds null": (_record("seconds", None), "seconds"),
    "evaluator number": (_record("evaluator", 3), "evaluator"),
    "blocks_done bool": (_set("blocks_done", True), "blocks_done"),
    "positions unknown": (_set("positions", ["pretrain", "nowhere"]), "positions"),
    "saved numbers": (_set("saved", [1]), "saved"),
    "inputs gone": (lambda m: m.pop("inputs"), "inputs"),
    "unknown entry": (_set("surprise", 1), "surprise"),
}


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, tiny_model_dir, tiny_text_file):
    """One interrupted checkpointed run for the tamper cases: (config path, save_path)."""
    import shutil

    tmp = tmp_path_factory.mktemp("stopped")
    with registered(CALIB_PLUGIN, name="test:calib_rtn"):
        path, out = _interrupted(tmp, tiny_model_dir, tiny_text_file)
    shutil.copytree(out, tmp / "pristine")
    return path, out


@pytest.fixture
def restored(stopped_run):
    """``stopped_run`` with its save_path as the interruption left it (a case the resume wrongly
    accepts finishes the run and removes the checkpoint)."""
    import shutil

    path, out = stopped_run
    shutil.rmtree(out)
    shutil.copytree(out.parent / "pristine", out)
    return path, out


@pytest.mark.parametrize("case", list(TAMPERS))
def test_a_tampered_manifest_is_one_line(restored, case):
    """Each entry of the wrong shape stops --resume before any work: exit 2, one line naming the
    manifest, no traceback (a string value used to fail only after the whole run; a position
    list used to drop the pretrain result silently)."""
    path, out = restored
    manifest = out / ".checkpoints" / "manifest.json"
    data = json.loads(manifest.read_text())
    assert data["records"][0]["position"] == "pretrain"
    tamper, word = TAMPERS[case]
    tamper(data)
    manifest.write_text(json.dumps(data))
    with registered(CALIB_PLUGIN, name="test:calib_rtn"):
        res = run_cli("run", str(path), "--resume", "-q")
    assert word in _one_line(res, "manifest.json", "damaged")


def test_the_untampered_manifest_resumes(tmp_path, calib_method, tiny_model_dir, tiny_text_file):
    path, out = _interrupted(tmp_path, tiny_model_dir, tiny_text_file)
    res = run_cli("run", str(path), "--resume", "-q")
    assert res.exit_code == 0, res.stderr
    assert ("pretrain", "ppl", "custom", "perplexity") in read_results(out)


@pytest.mark.parametrize("resume", [False, True])
def test_a_checkpoints_symlink_is_refused(tmp_path, tiny_model_dir, tiny_text_file, resume):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious").write_text("keep me")
    out = tmp_path / "out"
    out.mkdir()
    (out / ".checkpoints").symlink_to(elsewhere)
    cfg = run_config(tiny_model_dir, tiny_text_file, out, eval_pos=("fake_quant",))
    cfg["save"] = {"save_path": str(out), "save_fake": True, "checkpoint_blocks": True, "overwrite": True}
    args = ["run", str(write_config(tmp_path / "cfg.yml", cfg)), "-q"] + (["--resume"] if resume else [])
    _one_line(run_cli(*args), ".checkpoints", "symbolic link")
    assert (elsewhere / "precious").read_text() == "keep me"


def test_a_symlinked_checkpoint_file_is_refused(tmp_path, calib_method, tiny_model_dir, tiny_text_file):
    path, out = _interrupted(tmp_path, tiny_model_dir, tiny_text_file)
    block = out / ".checkpoints" / "block_00000.pt"
    real = tmp_path / "block_elsewhere.pt"
    block.rename(real)
    block.symlink_to(real)
    _one_line(run_cli("run", str(path), "--resume", "-q"), "block_00000.pt", "symbolic link")


# -- 5. what killed runs left -----------------------------------------------------------------


def test_leftovers_of_killed_runs_are_cleaned_up(tmp_path, tiny_model_dir, tiny_text_file):
    """A folder holding only what a SIGKILLed run left (a stale lock, a partial model folder, a
    partial report file) is not 'not empty'; the next run removes them and says so. Those of a
    live process are left alone."""
    out = tmp_path / "out"
    out.mkdir()
    dead = _dead_pid()
    (out / ".llmc.lock").write_text(json.dumps({"pid": dead, "host": os.uname().nodename, "started": "then"}))
    partial = out / f".fake_quant_model.partial-{dead}-abcdef"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"x" * 1000)
    (out / f".report.png.partial-{dead}-0a1b2c").write_bytes(b"png")
    cfg = run_config(tiny_model_dir, tiny_text_file, out, eval_pos=("fake_quant",))
    cfg["save"] = {"save_path": str(out), "save_fake": True}
    res = run_cli("run", str(write_config(tmp_path / "cfg.yml", cfg)))
    assert res.exit_code == 0, res.stderr
    assert "cleaned up after killed llmc runs" in res.stderr and partial.name in res.stderr
    assert "taking over the lock left by llmc process" in res.stderr
    outputs = sorted(p.name for p in out.iterdir())
    assert outputs == sorted(["fake_quant_model", "report.md", "results.json"] + (["report.png"] if (out / "report.png").exists() else []))

    live = out / f".results.json.partial-{os.getppid()}-123abc"  # the test runner's parent: alive
    live.write_text("busy")
    (out / f".fake_quant_model.partial-{dead}-fedcba").mkdir()
    cfg["save"]["overwrite"] = True
    res = run_cli("run", str(write_config(tmp_path / "cfg.yml", cfg)), "-q")
    assert res.exit_code == 0, res.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted([live.name, *outputs])


def test_an_old_copy_is_renamed_back(tmp_path):
    """A kill between the two renames of the fallback (old folder aside, new one not yet in): the
    next run holding the folder puts the old one back before anything else."""
    from llmc_core.outlock import hold

    out = tmp_path / "out"
    old = out / f".fake_quant_model.old-{_dead_pid()}"
    old.mkdir(parents=True)
    (old / "weights").write_text("old")
    with hold(out):
        assert (out / "fake_quant_model" / "weights").read_text() == "old"
    assert sorted(p.name for p in out.iterdir()) == ["fake_quant_model"]


# -- 11. overwrite says what it kept ----------------------------------------------------------


def test_overwrite_lists_the_earlier_outputs_it_kept(tmp_path, tiny_model_dir, tiny_text_file):
    out = tmp_path / "out"
    cfg = run_config(tiny_model_dir, tiny_text_file, out, eval_pos=("fake_quant",))
    cfg["save"] = {"save_path": str(out), "save_fake": True, "save_trans": True}
    first = write_config(tmp_path / "first.yml", cfg)
    assert run_cli("run", str(first), "-q").exit_code == 0
    (out / "notes.txt").write_text("mine")
    cfg["quant"]["weight"]["bit"] = 8
    cfg["save"] = {"save_path": str(out), "save_fake": True, "overwrite": True}
    res = run_cli("run", str(write_config(tmp_path / "second.yml", cfg)))
    assert res.exit_code == 0, res.stderr
    kept = json.loads((out / "results.json").read_text())["kept_from_earlier_run"]
    assert kept == ["notes.txt", "transformed_model"]
    assert "still holds notes.txt, transformed_model from an earlier run" in res.stderr
    report = (out / "report.md").read_text()
    assert "kept from an earlier run" in report and "`transformed_model`" in report
    assert json.loads((out / "fake_quant_model" / "llmc_quant.json").read_text())  # the new one
