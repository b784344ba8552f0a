"""Issue 32, item 9: input that used to end in a traceback is one ``llmc:`` line and exit code 2.

Each case builds one bad input (a config, a model folder, a saved folder to export, a disk that
fills up) and feeds it to the CLI. The resume-manifest and ``.checkpoints`` cases of the same item
are tested with the checkpoint (tests/test_resume.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import llmc_core
from llmc_core.testing import run_cli, run_config, write_config

SRC = Path(llmc_core.__file__).resolve().parents[1]  # the llmc these tests import, for a child process


def _config(tmp_path, model, data, **kw) -> Path:
    cfg = run_config(model, data, tmp_path / "out", eval_pos=("pretrain",), **kw)
    return write_config(tmp_path / "cfg.yml", cfg)


# -- configs ---------------------------------------------------------------------------------------


def latin1_config(tmp_path, model, data):
    text = "# réglages\n" + _config(tmp_path, model, data).read_text()
    (tmp_path / "cfg.yml").write_bytes(text.encode("latin-1"))
    return ["validate", str(tmp_path / "cfg.yml")], "is not UTF-8 text (byte 0xe9 at offset 3)"


def utf16_config(tmp_path, model, data):
    text = _config(tmp_path, model, data).read_text()
    (tmp_path / "cfg.yml").write_bytes(text.encode("utf-16"))
    return ["validate", str(tmp_path / "cfg.yml")], "is not UTF-8 text (byte 0xff at offset 0)"


def long_integer(tmp_path, model, data):
    path = _config(tmp_path, model, data)
    path.write_text(path.read_text().replace("seed: 0", "seed: " + "7" * 5000, 1))
    return ["validate", str(path)], "an integer of 5000 digits is longer than llmc reads"


def override_on_an_eval_list_with_a_scalar(tmp_path, model, data):
    cfg = run_config(model, data, tmp_path / "out")
    cfg["eval"] = [cfg["eval"], 5]
    return ["validate", str(write_config(tmp_path / "cfg.yml", cfg)), "eval.bs=1"], "Override 'eval.bs=1': eval.1 is not a section (got int 5)"


# -- model files at load ---------------------------------------------------------------------------


def _model_copy(tmp_path, model) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(model, copy)
    return copy


def pickle_weights(tmp_path, model, data):
    import torch
    from safetensors.torch import load_file

    copy = _model_copy(tmp_path, model)
    tensors = load_file(str(copy / "model.safetensors"))
    (copy / "model.safetensors").unlink()
    torch.save({**tensors, "extra": _Unpicklable()}, copy / "pytorch_model.bin")
    return ["run", str(_config(tmp_path, copy, data))], "a pickle weight file that torch.load(weights_only=True) refuses"


class _Unpicklable:
    def __reduce__(self):
        return (print, ("a pickle ran code",))


def truncated_safetensors(tmp_path, model, data):
    """Known from the file's header alone, so refused at validate."""
    copy = _model_copy(tmp_path, model)
    weights = copy / "model.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[: size // 2])
    return ["validate", str(_config(tmp_path, copy, data))], f"model.path: model.safetensors is cut short: its tensors need {size} bytes, the file has {size // 2}"


def safetensors_of_an_unknown_dtype(tmp_path, model, data):
    """A whole file that safetensors still refuses (SafetensorError) when the model loads."""
    copy = _model_copy(tmp_path, model)
    weights = copy / "model.safetensors"
    raw = weights.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + length])
    name = next(k for k in header if k != "__metadata__")
    header[name]["dtype"] = "Q9"
    text = json.dumps(header).encode()
    weights.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + length :])
    return ["run", str(_config(tmp_path, copy, data))], f"model.path: {copy} cannot be loaded ("


def gguf_cut_in_its_header(tmp_path, model, data):
    pytest.importorskip("gguf")
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF\x03\x00\x00\x00\x05\x00")  # magic, version, then 2 of the 16 count bytes
    return ["run", str(_config(tmp_path, path, data))], f"model.path: {path} cannot be loaded (unpack_from requires a buffer"


# -- llmc export on a damaged fake_quant_model -----------------------------------------------------


def _saved(tmp_path, fake_run) -> Path:
    copy = tmp_path / "saved"
    shutil.copytree(fake_run, copy)
    return copy


def quant_json_not_json(tmp_path, fake_run):
    saved = _saved(tmp_path, fake_run)
    (saved / "fake_quant_model" / "llmc_quant.json").write_text("{not json")
    return ["export", str(saved), "--to", "vllm"], "llmc_quant.json: not a valid llmc_quant.json (Expecting property name"


def quant_json_of_the_wrong_shape(tmp_path, fake_run):
    saved = _saved(tmp_path, fake_run)
    info = saved / "fake_quant_model" / "llmc_quant.json"
    info.write_text(json.dumps({**json.loads(info.read_text()), "quantized_layers": 5}))
    return ["export", str(saved), "--to", "vllm"], "not a valid llmc_quant.json (quantized_layers must be a list of layer names"


def quant_json_without_layers(tmp_path, fake_run):
    saved = _saved(tmp_path, fake_run)
    (saved / "fake_quant_model" / "llmc_quant.json").write_text("[]")
    return ["export", str(saved), "--to", "vllm"], "not a valid llmc_quant.json"


def truncated_qparams(tmp_path, fake_run):
    saved = _saved(tmp_path, fake_run)
    qparams = saved / "fake_quant_model" / "llmc_qparams.safetensors"
    qparams.write_bytes(qparams.read_bytes()[:100])
    return ["export", str(saved), "--to", "vllm"], "llmc_qparams.safetensors: cannot be read ("


def truncated_saved_model(tmp_path, fake_run):
    saved = _saved(tmp_path, fake_run)
    weights = saved / "fake_quant_model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return ["export", str(saved), "--to", "vllm"], "fake_quant_model: could not be loaded as a causal LM (Error while deserializing header"


def scales_of_the_wrong_shape(tmp_path, fake_run):
    from safetensors.torch import load_file, save_file

    saved = _saved(tmp_path, fake_run)
    qparams = saved / "fake_quant_model" / "llmc_qparams.safetensors"
    tensors = load_file(str(qparams))
    name = next(k for k in tensors if k.endswith(".scales"))
    tensors[name] = tensors[name].T.contiguous()  # [groups, out] instead of [out, groups]
    save_file(tensors, str(qparams))
    return ["export", str(saved), "--to", "vllm"], f"the parameters of {name.removesuffix('.scales')} in llmc_qparams.safetensors do not fit its weight"


CONFIG_CASES = [latin1_config, utf16_config, long_integer, override_on_an_eval_list_with_a_scalar, pickle_weights, truncated_safetensors, safetensors_of_an_unknown_dtype, gguf_cut_in_its_header]
EXPORT_CASES = [quant_json_not_json, quant_json_of_the_wrong_shape, quant_json_without_layers, truncated_qparams, truncated_saved_model, scales_of_the_wrong_shape]


@pytest.fixture(scope="module")
def fake_run(tiny_model_dir, tiny_text_file, tmp_path_factory) -> Path:
    """The save_path of a tiny RTN run with save_fake: true."""
    out = tmp_path_factory.mktemp("fake_run") / "out"
    cfg = run_config(tiny_model_dir, tiny_text_file, out, eval_pos=("pretrain",), save={"save_path": str(out), "save_fake": True})
    res = run_cli("run", str(write_config(out.parent / "cfg.yml", cfg)), "-q")
    assert res.exit_code == 0, res.stderr
    return out


def _one_llmc_line(res, expected: str) -> None:
    lines = [line for line in res.stderr.splitlines() if line.startswith("llmc:")]
    assert getattr(res, "exit_code", getattr(res, "returncode", None)) == 2, res.stderr
    assert "Traceback" not in res.stderr and len(lines) == 1, res.stderr
    assert expected in lines[0], lines[0]


@pytest.mark.parametrize("case", CONFIG_CASES + EXPORT_CASES, ids=lambda c: c.__name__)
def test_bad_input_is_one_line_and_exit_2(case, request, tmp_path, tiny_model_dir, tiny_text_file):
    if case in EXPORT_CASES:
        args, expected = case(tmp_path, request.getfixturevalue("fake_run"))
    else:
        args, expected = case(tmp_path, tiny_model_dir, tiny_text_file)
    _one_llmc_line(run_cli(*args, "-q"), expected)


def test_a_disk_that_fills_up_during_the_save_is_one_line(tmp_path, tiny_model_dir, tiny_text_file):
    """In a fresh process whose files may not grow past 64 KiB (RLIMIT_FSIZE, SIGXFSZ ignored): the
    weights' write fails as on a full disk, inside the saver (safetensors says ``I/O error``)."""
    resource = pytest.importorskip("resource")
    import signal

    cfg = run_config(tiny_model_dir, tiny_text_file, tmp_path / "out", eval_pos=("pretrain",), save={"save_path": str(tmp_path / "out"), "save_fake": True})
    path = write_config(tmp_path / "cfg.yml", cfg)

    def small_disk() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-m", "llmc_core", "run", str(path), "-q"], capture_output=True, text=True, timeout=300, preexec_fn=small_disk, env=env)
    _one_llmc_line(res, f"could not write {tmp_path / 'out' / 'fake_quant_model'}: File too large. Nothing half-written was left")
    assert not (tmp_path / "out" / "fake_quant_model").exists()
    assert not list((tmp_path / "out").glob(".fake_quant_model.partial*"))  # (the run may also remove out/ itself)


def test_saved_safetensors_follow_the_umask(fake_run):
    """Issue 32, item 12 (here for the saved run it shares): safetensors writes 0600; a saved
    model gets the umask's mode, as any other file the user writes."""
    umask = os.umask(0)
    os.umask(umask)
    folder = fake_run / "fake_quant_model"
    modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()}
    assert "model.safetensors" in modes and "llmc_qparams.safetensors" in modes
    assert set(modes.values()) == {0o666 & ~umask}, modes
