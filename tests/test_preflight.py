"""The memory preflight: estimates from config shapes, the refusal before the model loads, the report."""

from __future__ import annotations

import json

import pytest

from llmc_core import config, preflight
from llmc_core.testing import run_cli, run_config

MiB = 2**20


def _estimate(tiny_model_dir, tiny_text_file, tmp_path, method="gptq", **overrides):
    cfg = run_config(tiny_model_dir, tiny_text_file, tmp_path / "out", method=method, **overrides)
    rc = config.validate(cfg)
    return preflight.estimate(rc, preflight.read_model_config(rc.model))


def _calib(tiny_text_file, n_samples, seq_len):
    return {"name": "custom", "path": str(tiny_text_file), "n_samples": n_samples, "seq_len": seq_len, "bs": -1, "preproc": "random_truncate_txt", "seed": 42}


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_the_block_pass_grows_with_the_calibration_tokens(tiny_model_dir, tiny_text_file, tmp_path, method):
    def transform(n, s):
        est = _estimate(tiny_model_dir, tiny_text_file, tmp_path, method, calib=_calib(tiny_text_file, n, s), eval={"eval_pos": ["fake_quant"], "name": "custom", "path": str(tiny_text_file), "seq_len": 16, "bs": 1})
        assert est.host_stage.endswith("transform")  # the block pass is this run's peak
        return sum(p.bytes for p in est.host_parts if p.name == "block inputs/outputs"), est.host

    kept, host = transform(2000, 64)
    kept_n, host_n = transform(4000, 64)
    kept_s, host_s = transform(2000, 128)
    assert kept_n == 2 * kept and kept_s == 2 * kept  # tokens x hidden x 2 (inputs and outputs) x dtype
    assert kept == 2 * 2000 * 64 * 64 * 4  # the tiny Llama: hidden 64, float32
    assert host_n > host and host_s > host


def test_gptq_counts_its_kept_inputs_and_hessians(tiny_model_dir, tiny_text_file, tmp_path):
    est = _estimate(tiny_model_dir, tiny_text_file, tmp_path, "gptq", calib=_calib(tiny_text_file, 1000, 64))
    parts = {p.name: p.bytes for p in est.host_parts}
    tokens = 1000 * 64
    assert parts["GPTQ kept inputs"] == tokens * (64 + 128) * 4  # o_proj's output and down_proj's input
    assert parts["GPTQ Hessians"] == 4 * 128 * 128 * 4  # four down_proj-sized matrices while it is solved


def test_eval_logits_grow_with_eval_bs(tiny_model_dir, tiny_text_file, tmp_path):
    def logits(bs):
        est = _estimate(tiny_model_dir, tiny_text_file, tmp_path, "rtn", eval={"eval_pos": ["pretrain"], "name": "custom", "path": str(tiny_text_file), "seq_len": 64, "bs": bs})
        return {p.name: p.bytes for p in est.host_parts}["eval logits"]

    assert logits(1) == 3 * 63 * 128 * 4  # bs x positions x vocab x float32, three times
    assert logits(4) == 4 * logits(1)


def test_ranks_split_the_tokens_and_multiply_the_host(tiny_model_dir, tiny_text_file, tmp_path):
    cfg = config.validate(run_config(tiny_model_dir, tiny_text_file, tmp_path / "out", method="gptq", calib=_calib(tiny_text_file, 4096, 64)))
    mc = preflight.read_model_config(cfg.model)
    one, two = preflight.estimate(cfg, mc, ranks=1), preflight.estimate(cfg, mc, ranks=2)
    kept = lambda e: {p.name: p.bytes for p in e.host_parts}["block inputs/outputs"]  # noqa: E731
    assert kept(two) == kept(one) // 2
    assert two.host == 2 * (two.host // 2) and two.host > one.host  # every rank loads the model


def test_shapes_of_a_moe_config_need_no_weights():
    from transformers import AutoConfig

    cfg = AutoConfig.for_model("qwen3_moe", hidden_size=2048, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                               intermediate_size=6144, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8, vocab_size=151936, tie_word_embeddings=False)
    shapes = preflight.ModelShapes.from_config(cfg, 2)
    assert 30.0e9 < shapes.params() < 31.0e9  # Qwen3-30B-A3B
    assert shapes.mlp_width == 8 * 768


def test_a_run_that_cannot_fit_is_refused_before_the_model_loads(tiny_model_dir, tiny_text_file, tmp_path, write_yaml, monkeypatch):
    from llmc_core.run import Run

    loaded = []
    monkeypatch.setattr(Run, "load_model", lambda self: loaded.append(True))
    monkeypatch.setattr(preflight, "available_host", lambda: 4 * 2**30)
    out = tmp_path / "out"
    # 50,000 x 512 tokens: GPTQ keeps 13 GB of block inputs and outputs and 20 GB of layer inputs
    cfg = run_config(tiny_model_dir, tiny_text_file, out, method="gptq", calib=_calib(tiny_text_file, 50_000, 512))
    res = run_cli("run", str(write_yaml(cfg)))
    assert res.exit_code == 2
    lines = [line for line in res.stderr.splitlines() if line.startswith("llmc:")]  # the log lines have a time
    assert len(lines) == 1 and lines[0].startswith("llmc: memory: this run needs about"), res.stderr
    assert "host memory during gptq transform" in lines[0] and "(4.0 GB available" in lines[0]
    assert "fewer calib.n_samples or a shorter calib.seq_len" in lines[0]
    assert "Traceback" not in res.stderr
    assert not loaded
    assert not (out / "results.json").exists()

    # the same config with the memory it needs goes on to load the model
    monkeypatch.setattr(preflight, "available_host", lambda: 2**50)
    monkeypatch.setattr(Run, "load_model", lambda self: (loaded.append(True), exec("raise KeyboardInterrupt")))
    assert run_cli("run", str(write_yaml(cfg))).exit_code == 130
    assert loaded


def test_a_run_that_fits_logs_and_reports_estimate_and_measured(tiny_model_dir, tiny_text_file, tmp_path, write_yaml, caplog):
    out = tmp_path / "out"
    cfg = run_config(tiny_model_dir, tiny_text_file, out, method="gptq")
    with caplog.at_level("INFO", logger="llmc"):
        res = run_cli("run", str(write_yaml(cfg)))
    assert res.exit_code == 0, res.stderr
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("memory estimate: host")]
    assert len(logged) == 1 and "runtime" in logged[0] and "weights" in logged[0]
    payload = json.loads((out / "results.json").read_text())
    memory = payload["memory"]
    assert memory["measured_peak_rss_mb"] == max(s["peak_rss_mb"] for s in payload["stages"])
    assert memory["estimate"]["host_mb"] > 0 and "weights" in memory["estimate"]["host_parts_mb"]
    report = (out / "report.md").read_text()
    assert f"estimated host peak {memory['estimate']['host_mb']:.0f} MB" in report
    assert f"measured {memory['measured_peak_rss_mb']:.0f} MB" in report


def test_a_config_that_cannot_be_read_skips_the_estimate(tiny_model_dir, tiny_text_file, tmp_path, write_yaml, monkeypatch, caplog):
    def unreadable(section):
        raise OSError("no config.json")

    monkeypatch.setattr(preflight, "read_model_config", unreadable)
    out = tmp_path / "out"
    with caplog.at_level("INFO", logger="llmc"):
        res = run_cli("run", str(write_yaml(run_config(tiny_model_dir, tiny_text_file, out))))
    assert res.exit_code == 0, res.stderr
    assert any("memory estimate skipped (no config.json)" in r.getMessage() for r in caplog.records)
    assert "memory" not in json.loads((out / "results.json").read_text())


def test_available_memory_is_read_without_psutil():
    free = preflight.available_host()
    assert free is None or free > 0
    assert preflight.resident_bytes() > 10 * MiB
