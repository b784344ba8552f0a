"""The real third-party path: the example plugin, pip-installed, found through its entry point and
run from a YAML config by ``llmc run`` — no in-process registration."""

from __future__ import annotations

import importlib.util
import json

import pytest

from llmc_core.testing import read_results, run_cli, run_config, write_config

INSTALL = "pip install -e examples/llmc-plugin-example --no-deps"

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llmc_plugin_example") is None,
    reason=f"the example plugin is not installed; install it with: {INSTALL}",
)


@pytest.fixture
def entry_point_plugins(fresh_plugins, monkeypatch):
    """A manager built from the installed entry points only (third-party autoload on)."""
    monkeypatch.delenv("LLMC_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    fresh_plugins()


def test_listed_with_its_distribution(entry_point_plugins):
    result = run_cli("plugins", "--json")
    assert result.exit_code == 0, result.stderr
    mine = [r for r in json.loads(result.stdout) if r["distribution"] == "llmc-plugin-example"]
    assert mine == [
        {"class": "llmc_plugin_example.Lines", "distribution": "llmc-plugin-example", "kind": "dataset", "name": "lines", "plugin": "llmc-plugin-example:example"},
        {"class": "llmc_plugin_example.AbsmaxMse", "distribution": "llmc-plugin-example", "kind": "method", "name": "absmax_mse", "plugin": "llmc-plugin-example:example"},
    ]


def test_llmc_run_with_the_installed_method(entry_point_plugins, tiny_model_dir, tiny_text_file, tmp_path):
    out = tmp_path / "out"
    evaluation = {"eval_pos": ["pretrain", "fake_quant"], "name": "lines", "path": str(tiny_text_file), "seq_len": 64, "bs": 2, "num_samples": 4}
    cfg = run_config(tiny_model_dir, tiny_text_file, out, method="absmax_mse", bit=3, group_size=32, symmetric=True, special={"grid": 10}, eval=evaluation)
    cfg["save"]["save_fake"] = True
    result = run_cli("run", str(write_config(tmp_path / "absmax_mse.yml", cfg)), "-q")
    assert result.exit_code == 0, result.stderr

    results = read_results(out)
    pretrain = results[("pretrain", "ppl", "lines", "perplexity")]
    quantized = results[("fake_quant", "ppl", "lines", "perplexity")]
    assert 1.0 < pretrain < float("inf") and 1.0 < quantized < float("inf") and quantized != pretrain

    # The saved weights lie on the 3-bit symmetric grid: at most 8 distinct values per group.
    from safetensors.torch import load_file

    weights = load_file(str(out / "fake_quant_model" / "model.safetensors"))
    w = weights["model.layers.0.mlp.down_proj.weight"]
    per_group = [len(set(g.tolist())) for g in w.reshape(-1, 32)]
    assert max(per_group) <= 8
    assert json.loads((out / "fake_quant_model" / "llmc_quant.json").read_text())["method"] == "absmax_mse"


def test_disabled_autoload_hides_it(entry_point_plugins, monkeypatch, fresh_plugins):
    monkeypatch.setenv("LLMC_DISABLE_PLUGIN_AUTOLOAD", "1")
    fresh_plugins()
    result = run_cli("plugins", "--json")
    assert result.exit_code == 0, result.stderr
    assert "llmc-plugin-example" not in result.stdout
