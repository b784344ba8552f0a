"""Trustworthy runs: kill a tiny-model run mid-way, resume it, and get exactly the uninterrupted
result; SIGTERM and Ctrl-C leave nothing half-written and say what finished; NaN weights stop the
run naming block and layer."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from safetensors.torch import load_file

from llmc_core import hookimpl
from llmc_core.api import Method, NoOptions
from llmc_core.testing import StopAfterBlock, read_results, registered, run_cli, run_config, save_tiny_llama, write_config

# A calibration method whose result depends on the block inputs (an AWQ-like input scale folded
# into the norm) and on the random-number state (a little noise in the scale), so a resume is only
# exact if both the block outputs and the random state are restored. KILL_AT_BLOCK=k sends SIGTERM
# to the process while block k is being transformed; KEYBOARD_AT_BLOCK=k raises Ctrl-C there;
# NAN_AT_BLOCK=k leaves a NaN in a weight.
PLUGIN = textwrap.dedent(
    '''
    import os, signal, time
    import torch
    from llmc_core import hookimpl
    from llmc_core.api import Method, NoOptions

    class ScaledRtn(Method):
        """Test method: input-scaled RTN."""
        name = "scaled_rtn_test"
        Config = NoOptions
        needs_calibration = True

        def transform_block(self, ctx):
            if os.environ.get("KILL_AT_BLOCK") == str(ctx.index):
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(30)  # the handler raises in here
            if os.environ.get("KEYBOARD_AT_BLOCK") == str(ctx.index):
                raise KeyboardInterrupt
            block = ctx.block
            x = torch.cat([h.reshape(-1, h.shape[-1]) for h in ctx.inputs])
            s = x.abs().mean(0).clamp(min=1e-4).sqrt() * (1 + 0.01 * torch.rand(x.shape[-1]))
            with torch.no_grad():
                block.input_layernorm.weight.div_(s)
                for lin in (block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj):
                    lin.weight.mul_(s)
                if os.environ.get("NAN_AT_BLOCK") == str(ctx.index):
                    block.mlp.up_proj.weight[0, 0] = float("nan")
            self.log.append({"block": ctx.index, "scale_mean": float(s.mean())})

    @hookimpl
    def llmc_register_methods(register):
        register(ScaledRtn)
    '''
)


@pytest.fixture(scope="module")
def plugin_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("plugin") / "resume_test_plugin.py"
    path.write_text(PLUGIN, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def plugin(plugin_file):
    spec = importlib.util.spec_from_file_location("resume_test_plugin", plugin_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with registered(module, name="test:resume_test_plugin"):
        yield module


@pytest.fixture(scope="module")
def model4(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny4"), layers=4)


def _config(tmp_path, model4, corpus, name, **quant):
    out = tmp_path / name
    cfg = run_config(model4, corpus, out, method="scaled_rtn_test", eval_pos=("pretrain", "transformed", "fake_quant"))
    cfg["eval"]["num_samples"] = 2
    cfg["quant"].update(quant)
    if quant.get("quant_out"):
        cfg["eval"]["eval_pos"] = ["pretrain", "fake_quant"]
    cfg["save"] = {"save_path": str(out), "save_fake": True, "checkpoint_blocks": True}
    return write_config(tmp_path / f"{name}.yml", cfg), out


def _run_subprocess(plugin_file: Path, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    code = (
        "import sys, importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('resume_test_plugin', {str(plugin_file)!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "from llmc_core.testing import registered\n"
        "from llmc_core.cli import main\n"
        "with registered(m, name='test:resume_test_plugin'):\n"
        f"    code = main({args!r})\n"
        "sys.exit(code)\n"
    )
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True, timeout=300)


def _assert_same_model(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "fake_quant_model" / "model.safetensors"), load_file(b / "fake_quant_model" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert wa[k].equal(wb[k]), f"{k} differs after resume"


def _no_leftovers(out: Path) -> None:
    assert not [p.name for p in out.iterdir() if ".partial-" in p.name or ".old-" in p.name]


def test_sigterm_then_resume_equals_uninterrupted_run(tmp_path, plugin, plugin_file, model4, tiny_text_file):
    ref_cfg, ref_out = _config(tmp_path, model4, tiny_text_file, "ref")
    res = run_cli("run", str(ref_cfg), "-q")
    assert res.exit_code == 0, res.stderr
    assert not (ref_out / ".checkpoints").exists()  # removed once the run is complete

    cfg, out = _config(tmp_path, model4, tiny_text_file, "killed")
    killed = _run_subprocess(plugin_file, ["run", str(cfg)], {"KILL_AT_BLOCK": "2"})
    assert killed.returncode == 143, killed.stderr[-2000:]
    assert "Traceback" not in killed.stderr
    lines = [ln for ln in killed.stderr.splitlines() if ln.startswith("llmc: interrupted")]
    assert len(lines) == 1, killed.stderr[-2000:]
    assert "SIGTERM" in lines[0] and "during 'scaled_rtn_test transform'" in lines[0]
    assert "finished: load model, eval pretrain" in lines[0] and "2 block(s) kept" in lines[0] and "--resume" in lines[0]
    manifest = json.loads((out / ".checkpoints" / "manifest.json").read_text())
    assert manifest["blocks_done"] == 2 and manifest["positions"] == ["pretrain"]
    assert not (out / "fake_quant_model").exists()
    _no_leftovers(out)

    fresh = run_cli("run", str(cfg), "-q")  # the checkpoint is not thrown away silently
    assert fresh.exit_code == 2 and "--resume" in fresh.stderr and "Traceback" not in fresh.stderr

    resumed = run_cli("run", str(cfg), "--resume")
    assert resumed.exit_code == 0, resumed.stderr
    assert "resuming at block 2" in resumed.stderr and "eval pretrain: restored from the checkpoint" in resumed.stderr
    _assert_same_model(ref_out, out)
    assert read_results(out) == read_results(ref_out)  # pretrain, transformed and fake_quant PPL
    assert json.loads((out / "results.json").read_text())["layer_errors"] == json.loads((ref_out / "results.json").read_text())["layer_errors"]
    assert "resumed: blocks 0-1" in (out / "report.md").read_text()
    assert not (out / ".checkpoints").exists()
    _no_leftovers(out)


def test_ctrl_c_with_quant_out_then_resume(tmp_path, plugin, model4, tiny_text_file, monkeypatch):
    ref_cfg, ref_out = _config(tmp_path, model4, tiny_text_file, "ref", quant_out=True)
    assert run_cli("run", str(ref_cfg), "-q").exit_code == 0

    cfg, out = _config(tmp_path, model4, tiny_text_file, "stopped", quant_out=True)
    monkeypatch.setenv("KEYBOARD_AT_BLOCK", "3")
    stopped = run_cli("run", str(cfg), "-q")
    assert stopped.exit_code == 130 and "interrupted (Ctrl-C)" in stopped.stderr and "3 block(s) kept" in stopped.stderr
    monkeypatch.delenv("KEYBOARD_AT_BLOCK")

    other = run_cli("run", str(cfg), "--resume", "quant.weight.bit=3")
    assert other.exit_code == 2 and "different config" in other.stderr and "Traceback" not in other.stderr

    resumed = run_cli("run", str(cfg), "--resume", "-q")
    assert resumed.exit_code == 0, resumed.stderr
    _assert_same_model(ref_out, out)
    assert read_results(out) == read_results(ref_out)
    ref_info = json.loads((ref_out / "fake_quant_model" / "llmc_quant.json").read_text())
    assert json.loads((out / "fake_quant_model" / "llmc_quant.json").read_text()) == ref_info
    assert len(ref_info["quantized_layers"]) == 4 * 7  # the integer weights of restored blocks came back too


def test_resume_without_checkpoint_is_a_clean_error(tmp_path, plugin, model4, tiny_text_file):
    cfg, _ = _config(tmp_path, model4, tiny_text_file, "none")
    res = run_cli("run", str(cfg), "--resume")
    assert res.exit_code == 2
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("llmc:")]
    assert len(errors) == 1 and "no checkpoint" in errors[0] and "Traceback" not in res.stderr


def test_nan_weights_after_transform_name_block_and_layer(tmp_path, plugin, model4, tiny_text_file, monkeypatch):
    cfg, out = _config(tmp_path, model4, tiny_text_file, "nan")
    monkeypatch.setenv("NAN_AT_BLOCK", "1")
    res = run_cli("run", str(cfg), "-q")
    assert res.exit_code == 2, res.stderr
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("llmc:")]
    assert len(errors) == 1 and "Block 1 (model.layers.1) layer mlp.up_proj has NaN/inf weights" in errors[0]
    assert "Traceback" not in res.stderr
    assert json.loads((out / ".checkpoints" / "manifest.json").read_text())["blocks_done"] == 1


def test_awq_with_deferred_clipping_resumes_exactly(tmp_path, model4, tiny_text_file):
    """AWQ keeps scales and (clip_version v2) clipping ranges on the method object between blocks;
    the checkpoint must carry them for the resumed quantization to be identical."""
    from llmc_core.plugins import get_manager

    if "awq" not in get_manager().names("method"):
        pytest.skip("the AWQ plugin is not installed")
    special = {"weight_clip": True, "clip_version": "v2", "save_scale": True, "n_grid": 5, "clip_grid": 5}

    def config(name):
        out = tmp_path / name
        cfg = run_config(model4, tiny_text_file, out, method="awq", bit=3, special={**special, "scale_path": str(tmp_path / f"scales_{name}")})
        cfg["eval"]["num_samples"] = 1
        cfg["save"] = {"save_path": str(out), "save_fake": True, "checkpoint_blocks": True}
        return write_config(tmp_path / f"{name}.yml", cfg), out

    ref_cfg, ref_out = config("ref")
    assert run_cli("run", str(ref_cfg), "-q").exit_code == 0
    cfg, out = config("stopped")
    with registered(StopAfterBlock(1), name="test:stop_after_block"):
        stopped = run_cli("run", str(cfg), "-q")
    assert stopped.exit_code == 130 and "2 block(s) kept" in stopped.stderr, stopped.stderr
    resumed = run_cli("run", str(cfg), "--resume", "-q")
    assert resumed.exit_code == 0, resumed.stderr
    _assert_same_model(ref_out, out)
    assert read_results(out) == read_results(ref_out)
    ref_scales = load_file(tmp_path / "scales_ref" / "scales.pth")  # safetensors under ModelTC's name
    got_scales = load_file(tmp_path / "scales_stopped" / "scales.pth")
    assert ref_scales.keys() == got_scales.keys() and len(ref_scales) > 0
    assert all(ref_scales[k].equal(got_scales[k]) for k in ref_scales)


def test_interrupted_overwrite_keeps_the_old_folder(tmp_path, monkeypatch):
    """Ctrl-C between moving the old folder aside and moving the new one in (the fallback where
    renameat2 cannot exchange them) puts the old one back."""
    from llmc_core import fsutil
    from llmc_core.fsutil import atomic_folder

    monkeypatch.setattr(fsutil, "_exchange", lambda a, b: False)
    target = tmp_path / "model"
    target.mkdir()
    (target / "weights").write_text("old")
    real_rename = Path.rename

    def rename(self, dest):
        if ".partial-" in self.name:  # the second rename: new folder into place
            raise KeyboardInterrupt
        return real_rename(self, dest)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(KeyboardInterrupt), atomic_folder(target, overwrite=True) as tmp:
        (tmp / "weights").write_text("new")
    monkeypatch.undo()
    assert (target / "weights").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]

    with atomic_folder(target, overwrite=True) as tmp:  # and a finished one is an ordinary folder
        (tmp / "weights").write_text("new")
    umask = os.umask(0)
    os.umask(umask)
    assert (target / "weights").read_text() == "new" and target.stat().st_mode & 0o777 == 0o777 & ~umask


class _Evil:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _tamper(path: Path, how: str, marker: Path) -> None:
    import pickle

    import torch

    if how == "pickle":
        path.write_bytes(pickle.dumps({"state_dict": _Evil(marker)}))
    elif how == "torch_zip":  # a real torch.save archive whose pickle carries the payload
        torch.save({"state_dict": _Evil(marker), "x": torch.zeros(2)}, path)
    else:  # truncated
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])


def test_tampered_or_truncated_checkpoint_is_refused_without_running_code(tmp_path, plugin, model4, tiny_text_file, monkeypatch):
    """Every file of the checkpoint, replaced by a malicious pickle (raw, or inside a torch.save
    archive) or cut in half: --resume stops with one llmc: line naming the file, exit 2, no
    traceback, and the pickle's payload never runs. The untouched checkpoint still resumes."""
    import shutil

    cfg, out = _config(tmp_path, model4, tiny_text_file, "tampered")
    monkeypatch.setenv("KEYBOARD_AT_BLOCK", "2")
    assert run_cli("run", str(cfg), "-q").exit_code == 130
    monkeypatch.delenv("KEYBOARD_AT_BLOCK")
    ckpt = out / ".checkpoints"
    pristine = tmp_path / "pristine"
    shutil.copytree(ckpt, pristine)
    names = sorted(p.name for p in pristine.iterdir())
    assert names == ["block_00000.pt", "block_00001.pt", "manifest.json", "method_00001.safetensors", "outputs_00001.pt"]
    marker = tmp_path / "pwned"
    for name in names:
        for how in ("pickle", "torch_zip", "truncated"):
            shutil.rmtree(ckpt)
            shutil.copytree(pristine, ckpt)
            _tamper(ckpt / name, how, marker)
            res = run_cli("run", str(cfg), "--resume", "-q")
            errors = [ln for ln in res.stderr.splitlines() if ln.startswith("llmc:")]
            assert res.exit_code == 2, (name, how, res.stderr[-2000:])
            assert len(errors) == 1 and name in errors[0] and "damaged" in errors[0], (name, how, res.stderr[-2000:])
            assert "Traceback" not in res.stderr
            assert not marker.exists(), f"{name} ({how}) ran code on --resume"
    shutil.rmtree(ckpt)
    shutil.copytree(pristine, ckpt)
    assert run_cli("run", str(cfg), "--resume", "-q").exit_code == 0


class _Stateful(Method):
    """A third-party method written before state_dict existed: it keeps a counter in self."""

    name = "stateful_undeclared_test"
    Config = NoOptions

    def transform_block(self, ctx):
        self.seen = getattr(self, "seen", 0) + 1
        if os.environ.get("KEYBOARD_AT_BLOCK") == str(ctx.index):
            raise KeyboardInterrupt


class _StatefulPlugin:
    @hookimpl
    def llmc_register_methods(self, register):
        register(_Stateful)


def test_resume_refuses_a_method_with_undeclared_state(tmp_path, model4, tiny_text_file, monkeypatch):
    """Fails closed: state the checkpoint cannot carry stops --resume instead of being dropped."""
    out = tmp_path / "out"
    data = run_config(model4, tiny_text_file, out, method="stateful_undeclared_test")
    data["eval"]["num_samples"] = 1
    data["save"] = {"save_path": str(out), "save_fake": True, "checkpoint_blocks": True}
    cfg = write_config(tmp_path / "cfg.yml", data)
    with registered(_StatefulPlugin(), name="test:stateful"):
        monkeypatch.setenv("KEYBOARD_AT_BLOCK", "2")
        assert run_cli("run", str(cfg), "-q").exit_code == 130
        monkeypatch.delenv("KEYBOARD_AT_BLOCK")
        res = run_cli("run", str(cfg), "--resume", "-q")
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("llmc:")]
    assert res.exit_code == 2 and len(errors) == 1 and "seen" in errors[0] and "state_dict" in errors[0], res.stderr


def test_method_state_round_trips_without_pickle(tmp_path):
    import torch

    from llmc_core.statefile import read_state, write_state

    s = torch.rand(8)
    state = {"log": [{"block": 0, "alpha": None, "loss": 0.5}], "state": {"scales": {"a": s, "b": s}, "n": 3, "pair": (1, "x")}}
    write_state(tmp_path / "m.safetensors", state)
    back = read_state(tmp_path / "m.safetensors")
    assert back["log"] == state["log"] and back["state"]["n"] == 3 and back["state"]["pair"] == [1, "x"]
    assert back["state"]["scales"]["a"].equal(s) and back["state"]["scales"]["b"].equal(s)
    with pytest.raises(TypeError, match="state.state.bad"):
        write_state(tmp_path / "x.safetensors", {"state": {"bad": object()}})
