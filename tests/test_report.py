"""The run report (report.md + report.png beside results.json) and the run's console lines."""

from __future__ import annotations

import json
import re
import sys
from types import SimpleNamespace

import pytest
import torch
import yaml

from llmc_core.quant import QuantSpec, fake_quantize
from llmc_core.report import render_markdown
from llmc_core.results import EvalRecord
from llmc_core.testing import run_cli, run_config, write_config


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir, tiny_text_file):
    """One RTN run on the tiny model, with its CLI output."""
    root = tmp_path_factory.mktemp("report")
    out = root / "out"
    cfg = run_config(tiny_model_dir, tiny_text_file, out, save={"save_path": str(out), "save_fake": True})
    cfg["eval"]["num_samples"] = 2
    res = run_cli("run", str(write_config(root / "cfg.yml", cfg)))
    assert res.exit_code == 0, res.stderr
    return out, res, cfg


def _section(text: str, title: str) -> str:
    return text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def _table(block: str) -> list[list[str]]:
    rows = [ln for ln in block.splitlines() if ln.startswith("|")]
    return [[c.strip() for c in r.strip("|").split("|")] for r in rows[2:]]  # skip header and rule


def test_report_holds_ppl_stages_config_and_environment(finished_run):
    out, _, cfg = finished_run
    text = (out / "report.md").read_text()
    payload = json.loads((out / "results.json").read_text())
    ppl = {r["position"]: r["value"] for r in payload["results"]}

    (row,) = _table(_section(text, "Perplexity by position"))
    assert row[0] == "custom"
    assert float(row[1]) == pytest.approx(ppl["pretrain"], abs=1e-4) and float(row[2]) == pytest.approx(ppl["fake_quant"], abs=1e-4)
    assert row[3].startswith(f"{100 * (ppl['fake_quant'] / ppl['pretrain'] - 1):+.2f}%")

    stages = _table(_section(text, "Time and peak memory per stage"))
    assert [r[0] for r in stages[:-1]] == [s["stage"] for s in payload["stages"]]
    assert all(float(r[1]) >= 0 and float(r[2]) > 0 for r in stages)

    config_yaml = _section(text, "Config").split("```yaml\n", 1)[1].split("```", 1)[0]
    shown = yaml.safe_load(config_yaml)
    assert shown["quant"] == cfg["quant"] and shown["eval"]["num_samples"] == 2

    env = _section(text, "Environment")
    assert f"- torch: {torch.__version__}" in env and "- transformers: " in env and "- device: cpu" in env
    assert "None in this run." in _section(text, "Downstream metrics")


def test_report_shows_the_error_of_every_quantized_layer(finished_run, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    out, _, cfg = finished_run
    rows = json.loads((out / "results.json").read_text())["layer_errors"]
    assert len(rows) == 2 * 7  # two blocks of q/k/v/o/gate/up/down
    # RTN sees no calibration data: the layer inputs came from the pretrain evaluation's pass
    assert all(r["output_rel_mse"] is not None and 0 < r["output_rel_mse"] < 1 for r in rows)
    # the weight error, computed here independently from the original checkpoint
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    spec = QuantSpec(**cfg["quant"]["weight"])
    for r in rows:
        w = original.get_submodule(r["layer"]).weight.detach()
        expected = ((w - fake_quantize(w, spec)).pow(2).sum() / w.pow(2).sum()).item()
        assert r["weight_rel_mse"] == pytest.approx(expected, rel=1e-4)

    section = _section((out / "report.md").read_text(), "Quantization error per layer")
    assert "relative MSE of each layer's output" in section
    table = _table(section)
    assert [t[0] for t in table] == ["0", "1", "**mean**"]
    worst = max(rows, key=lambda r: r["output_rel_mse"])
    assert f"`{worst['layer']}` {worst['output_rel_mse']:.2e}" in section.split("Largest errors: ", 1)[1].split(";")[0]


def test_report_plot_is_a_png_and_is_linked(finished_run):
    out, _, _ = finished_run
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![per-layer error and stage times](report.png)" in (out / "report.md").read_text()


def test_report_without_matplotlib_says_so(tmp_path, tiny_model_dir, tiny_text_file, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    out = tmp_path / "out"
    cfg = run_config(tiny_model_dir, tiny_text_file, out, eval_pos=("fake_quant",))
    cfg["eval"]["num_samples"] = 1
    res = run_cli("run", str(write_config(tmp_path / "cfg.yml", cfg)), "-q")
    assert res.exit_code == 0, res.stderr
    assert not (out / "report.png").exists()
    assert "pip install 'llmc[report]'" in (out / "report.md").read_text()


def test_render_markdown_positions_downstream_and_worst_layers():
    records = [
        EvalRecord("pretrain", "ppl", "wikitext2", "perplexity", 20.0, 1.0),
        EvalRecord("fake_quant", "ppl", "wikitext2", "perplexity", 25.0, 1.0),
        EvalRecord("real_quant", "ppl", "wikitext2", "perplexity", 25.5, 1.0),
        EvalRecord("downstream", "opencompass", "humaneval", "pass@1", 12.5, 60.0),
    ]
    cfg = SimpleNamespace(raw={"model": {"type": "Llama", "path": "/m"}}, quant=SimpleNamespace(method="awq", method_name="awq"), weight=QuantSpec(bit=4, group_size=64))
    run = SimpleNamespace(config=cfg, results=records, stages=[{"stage": "load model", "seconds": 2.0, "peak_rss_mb": 100.0}], saved={}, device=torch.device("cpu"), checkpoint=None)
    rows = [{"layer": f"model.layers.{b}.{n}", "block": b, "name": n, "weight_rel_mse": e / 2, "output_rel_mse": e} for b, n, e in [(0, "q", 1e-3), (0, "down", 5e-2), (1, "q", 2e-3), (1, "down", 1e-2)]]
    text = render_markdown(run, rows, plot_note=None)
    (row,) = _table(_section(text, "Perplexity by position"))
    assert row == ["wikitext2", "20.0000", "25.0000", "25.5000", "+27.50% (real_quant)"]
    assert ["downstream", "opencompass", "humaneval", "pass@1", "12.5000", "60.0"] in _table(_section(text, "Downstream metrics"))
    layers = _section(text, "Quantization error per layer")
    assert re.search(r"Largest errors: `model.layers.0.down` 5.00e-02; `model.layers.1.down` 1.00e-02", layers)
    assert _table(layers)[-1] == ["**mean**", "1.50e-03", "3.00e-02"]


def test_one_log_line_per_stage_quiet_and_no_progress_bars(finished_run, tmp_path, tiny_model_dir, tiny_text_file):
    out, res, _ = finished_run
    stages = json.loads((out / "results.json").read_text())["stages"]
    for s in stages:
        assert len(re.findall(rf"I llmc: {re.escape(s['stage'])} done in \d+\.\d s", res.stderr)) == 1, s["stage"]
    assert "it/s" not in res.stderr  # stderr is not a terminal: no progress bars, ours or the libraries'

    cfg = run_config(tiny_model_dir, tiny_text_file, tmp_path / "q", eval_pos=("fake_quant",))
    cfg["eval"]["num_samples"] = 1
    path = write_config(tmp_path / "cfg.yml", cfg)
    quiet = run_cli("run", str(path), "--quiet")
    assert quiet.exit_code == 0 and " I llmc:" not in quiet.stderr and "fake_quant" in quiet.stdout
    verbose = run_cli("run", str(path), "--verbose", "save.save_path=" + str(tmp_path / "v"))
    assert verbose.exit_code == 0 and " I llmc:" in verbose.stderr
