"""Tests of the example plugin, written the way a plugin author would: with llmc's own harness.

``llmc_core.testing`` is a pytest plugin (installed with llmc), so the fixtures ``tiny_model_dir``,
``tiny_text_file`` and ``llmc_cli`` need no conftest.py. Run with::

    pip install -e examples/llmc-plugin-example
    python -m pytest examples/llmc-plugin-example/tests -q
"""

from __future__ import annotations

import json

import pytest
import torch

import llmc_plugin_example
from llmc_core import LlmcError
from llmc_core.quant import QuantSpec, fake_quantize, qparams, quantize_grouped
from llmc_core.testing import read_results, registered, run_config, write_config
from llmc_plugin_example import AbsmaxMse, AbsmaxMseConfig, Lines

SPEC = QuantSpec(bit=3, symmetric=True, granularity="per_group", group_size=32)


@pytest.fixture
def plugin():
    """The example plugin on the process-wide manager: already there when installed, else in-process."""
    with registered(llmc_plugin_example, distribution="llmc-plugin-example") as manager:
        yield manager


def _quick_config(tiny_model_dir, tiny_text_file, save_path, **kwargs):
    """A tiny run with the example method, evaluated on the example dataset (a few windows only)."""
    evaluation = {"eval_pos": ["pretrain", "fake_quant"], "name": "lines", "path": str(tiny_text_file), "seq_len": 64, "bs": 2, "num_samples": 4}
    return run_config(tiny_model_dir, tiny_text_file, save_path, method="absmax_mse", bit=3, symmetric=True, eval=evaluation, **kwargs)


def test_installed_plugin_is_listed(llmc_cli):
    result = llmc_cli("plugins", "--json")
    assert result.exit_code == 0, result.stderr
    rows = {(r["kind"], r["name"]): r for r in json.loads(result.stdout)}
    assert rows[("method", "absmax_mse")]["distribution"] == "llmc-plugin-example"
    assert rows[("dataset", "lines")]["class"] == "llmc_plugin_example.Lines"


def test_search_never_does_worse_than_plain_rtn():
    torch.manual_seed(0)
    w = torch.randn(48, 128) * torch.rand(48, 1)  # rows of different ranges, some outliers
    w[0, 3] = 8.0
    method = AbsmaxMse(AbsmaxMseConfig(grid=16), SPEC)
    qw, ratio = method.quantize_weight(w)
    err_search = (qw.dequantize() - w).pow(2).reshape(-1, 32).sum(-1)
    err_rtn = (fake_quantize(w, SPEC) - w).pow(2).reshape(-1, 32).sum(-1)
    # Brute force over the 16 ratios with llmc's quantizer (scale absmax * ratio / qmax): each
    # group's error is the smallest one, so the search kept the best ratio and quantized with it.
    groups = w.reshape(-1, 32)
    amax = groups.abs().amax(-1, keepdim=True)
    tried = []
    for r in torch.linspace(1.0, 0.5, 16).tolist():
        scale, zero = qparams(groups, SPEC, max_val=amax * r)
        tried.append(((quantize_grouped(groups, scale, zero, SPEC) - zero) * scale - groups).pow(2).sum(-1))
    torch.testing.assert_close(err_search, torch.stack(tried).amin(0), rtol=1e-5, atol=1e-7)
    assert err_search.sum() < err_rtn.sum()  # and on Gaussian weights clipping pays off
    assert 0.5 <= ratio <= 1.0
    # The integer form is on the 3-bit symmetric grid and reproduces the fake-quantized weight.
    assert qw.codes.dtype == torch.int8 and int(qw.codes.min()) >= -4 and int(qw.codes.max()) <= 3
    assert torch.equal(qw.zeros, torch.zeros_like(qw.zeros))


def test_grid_of_one_is_plain_symmetric_rtn():
    w = torch.randn(16, 64)
    qw, ratio = AbsmaxMse(AbsmaxMseConfig(grid=1), SPEC).quantize_weight(w)
    assert ratio == 1.0
    torch.testing.assert_close(qw.dequantize(), fake_quantize(w, SPEC))


def test_config_is_strict():
    with pytest.raises(ValueError, match="grdi"):
        AbsmaxMseConfig.model_validate({"grdi": 5})


def test_lines_dataset(tmp_path):
    (tmp_path / "a.txt").write_text("# a comment\nfirst line\n\n  second line  \n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("third line\n", encoding="utf-8")
    assert Lines().load_rows(str(tmp_path / "a.txt"), False, "calib") == ["first line", "second line"]
    assert Lines().load_rows(str(tmp_path), False, "calib") == ["first line", "second line", "third line"]
    with pytest.raises(LlmcError, match="calib.path"):
        Lines().load_rows(str(tmp_path / "missing.txt"), False, "calib")


def test_end_to_end_run(plugin, llmc_cli, tiny_model_dir, tiny_text_file, tmp_path):
    out = tmp_path / "out"
    cfg = _quick_config(tiny_model_dir, tiny_text_file, out, special={"grid": 8, "max_shrink": 0.3}, save={"save_path": str(out), "save_fake": True})
    result = llmc_cli("run", str(write_config(tmp_path / "cfg.yml", cfg)), "-q")
    assert result.exit_code == 0, result.stderr
    results = read_results(out)
    pretrain = results[("pretrain", "ppl", "lines", "perplexity")]
    quantized = results[("fake_quant", "ppl", "lines", "perplexity")]
    assert 1.0 < pretrain < float("inf") and 1.0 < quantized < float("inf")
    assert quantized != pretrain  # the weights really changed
    info = json.loads((out / "fake_quant_model" / "llmc_quant.json").read_text())
    assert info["method"] == "absmax_mse"
    assert len(info["quantized_layers"]) == 2 * 7  # 2 blocks x (q, k, v, o, gate, up, down)


def test_asymmetric_weight_is_refused(plugin, llmc_cli, tiny_model_dir, tiny_text_file, tmp_path):
    cfg = _quick_config(tiny_model_dir, tiny_text_file, tmp_path / "out")
    cfg["quant"]["weight"]["symmetric"] = False
    result = llmc_cli("run", str(write_config(tmp_path / "cfg.yml", cfg)), "-q")
    assert result.exit_code == 2
    assert "absmax_mse is a symmetric method" in result.stderr
    assert "Traceback" not in result.stderr


def test_misspelled_option_is_one_line(plugin, llmc_cli, tiny_model_dir, tiny_text_file, tmp_path):
    cfg = _quick_config(tiny_model_dir, tiny_text_file, tmp_path / "out", special={"grdi": 8})
    result = llmc_cli("validate", str(write_config(tmp_path / "cfg.yml", cfg)))
    assert result.exit_code == 2
    assert "quant.special.grdi: unknown key. Did you mean 'grid'?" in result.stderr
