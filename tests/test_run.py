"""End to end on a tiny model: run, results, savers, reload, atomicity and the group-size check."""

from __future__ import annotations

import json
import math

import pytest
import torch

from llmc_core import config
from llmc_core.errors import LlmcError
from llmc_core.run import Run
from llmc_core import hookimpl
from llmc_core.testing import registered, run_cli, run_config


def _ppl(model, ids, seq_len):
    """An independent perplexity loop (the GPTQ protocol) to compare llmc against."""
    n = ids.numel() // seq_len
    nll = 0.0
    with torch.no_grad():
        for i in range(n):
            w = ids[i * seq_len : (i + 1) * seq_len][None]
            logits = model(input_ids=w).logits
            nll += torch.nn.functional.cross_entropy(logits[0, :-1], w[0, 1:], reduction="sum").item()
    return math.exp(nll / (n * (seq_len - 1)))


def test_run_end_to_end_with_savers(tiny_model_dir, tiny_text_file, tmp_path, write_yaml):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "out"
    # AWQ with v1 clipping changes the float model (folded scales, clamped weights), so the
    # transformed folder can be told apart from the original and from the quantized one.
    cfg = run_config(
        tiny_model_dir, tiny_text_file, out, method="awq", bit=3, special={"weight_clip": True, "n_grid": 5, "clip_check": False},
        eval_pos=("pretrain", "transformed", "fake_quant"), save={"save_path": str(out), "save_fake": True, "save_trans": True},
    )
    res = run_cli("run", str(write_yaml(cfg)), "-q")
    assert res.exit_code == 0, res.stderr
    payload = json.loads((out / "results.json").read_text())
    by_pos = {r["position"]: r for r in payload["results"]}
    assert set(by_pos) == {"pretrain", "transformed", "fake_quant"}
    assert by_pos["transformed"]["value"] != pytest.approx(by_pos["pretrain"]["value"], rel=1e-6)
    assert all(r["metric"] == "perplexity" and r["seconds"] >= 0 for r in by_pos.values())
    assert "fake_quant" in res.stdout and "perplexity" in res.stdout

    # the fake-quant folder reloads with plain transformers and gives the same PPL
    tok = AutoTokenizer.from_pretrained(out / "fake_quant_model")
    model = AutoModelForCausalLM.from_pretrained(out / "fake_quant_model", dtype=torch.float32).eval()
    ids = tok("\n\n".join(tiny_text_file.read_text().splitlines()), return_tensors="pt").input_ids[0]
    assert _ppl(model, ids, 64) == pytest.approx(by_pos["fake_quant"]["value"], rel=1e-4)
    trans = AutoModelForCausalLM.from_pretrained(out / "transformed_model", dtype=torch.float32).eval()
    assert _ppl(trans, ids, 64) == pytest.approx(by_pos["transformed"]["value"], rel=1e-4)
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).state_dict()
    assert any(not torch.equal(v, original[k]) for k, v in trans.state_dict().items())  # not the original model
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary folders left

    # a second run into the same folder is refused, and nothing is touched
    before = (out / "results.json").read_text()
    again = run_cli("run", str(write_yaml(cfg)))
    assert again.exit_code == 2 and "already exists" in again.stderr
    assert (out / "results.json").read_text() == before


def test_pretrain_ppl_matches_independent_loop(tiny_model_dir, tiny_text_file, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = config.validate(run_config(tiny_model_dir, tiny_text_file, tmp_path / "o", eval_pos=("pretrain",)))
    (record,) = Run(cfg).execute()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ids = tok("\n\n".join(tiny_text_file.read_text().splitlines()), return_tensors="pt").input_ids[0]
    assert record.value == pytest.approx(_ppl(model, ids, 64), rel=1e-6)


@pytest.mark.parametrize("quant_out", [False, True])
def test_fake_quant_weights_are_rtn_of_original(quant_out, tiny_model_dir, tiny_text_file, tmp_path):
    """quant_out: true with RTN (no calibration, so no block pass) once skipped the quantize
    stage and measured the float model as fake_quant."""
    from transformers import AutoModelForCausalLM

    from llmc_core.quant import QuantSpec, fake_quantize

    raw = run_config(tiny_model_dir, tiny_text_file, tmp_path / "o", bit=3)
    raw["quant"]["quant_out"] = quant_out
    cfg = config.validate(raw)
    run = Run(cfg)
    run.execute()
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    spec = QuantSpec(bit=3, symmetric=False, granularity="per_group", group_size=32)
    q = dict(run.model.named_parameters())
    for name, p in original.named_parameters():
        if ".layers." in name and name.endswith("proj.weight"):
            torch.testing.assert_close(q[name], fake_quantize(p.detach(), spec), rtol=0, atol=0)
        else:
            torch.testing.assert_close(q[name], p, rtol=0, atol=0)  # embeddings, norms, lm_head untouched
    assert len(run.quantized) == 2 * 7


def test_group_size_not_dividing_fails_right_after_load(tiny_model_dir, tiny_text_file, tmp_path, write_yaml):
    cfg = run_config(tiny_model_dir, tiny_text_file, tmp_path / "o", group_size=48)
    res = run_cli("run", str(write_yaml(cfg)))
    assert res.exit_code == 2
    assert "group_size: 48 does not divide the input size 64" in res.stderr
    assert "Group sizes that fit every layer: 16, 32, 64." in res.stderr
    assert "pretrain ppl" not in res.stderr  # no evaluation ran before the check
    assert not (tmp_path / "o").exists()


def test_model_of_another_family_is_refused(tiny_model_dir, tiny_text_file, tmp_path, write_yaml):
    cfg = run_config(tiny_model_dir, tiny_text_file, tmp_path / "o")
    cfg["model"]["type"] = "qwen2"
    res = run_cli("run", str(write_yaml(cfg)))
    assert res.exit_code == 2 and "expects a qwen2 checkpoint" in res.stderr and "is 'llama'" in res.stderr


def test_trust_remote_code_is_off_by_default(tiny_model_dir, tiny_text_file, tmp_path, monkeypatch):
    import transformers

    seen = []
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    cfg = config.validate(run_config(tiny_model_dir, tiny_text_file, tmp_path / "o", eval_pos=("pretrain",)))
    Run(cfg).execute()
    assert seen == [False]


def test_inference_per_block_gives_same_ppl(tiny_model_dir, tiny_text_file, tmp_path):
    base = run_config(tiny_model_dir, tiny_text_file, tmp_path / "a", eval_pos=("pretrain",))
    whole = Run(config.validate(base)).execute()[0].value
    base["eval"]["inference_per_block"] = True
    base["save"]["save_path"] = str(tmp_path / "b")
    per_block = Run(config.validate(base)).execute()[0].value
    assert per_block == pytest.approx(whole, rel=1e-5)


class _QuantOutProbe:
    """A method plugin that records ``ctx.quant_out`` in each call (RTN's rounding otherwise)."""

    seen: list[tuple[str, int, bool]] = []

    @hookimpl
    def llmc_register_methods(self, register):
        from llmc_core.api import Method

        probe = self

        class Probe(Method):
            name = "quant_out_probe"

            def transform_block(self, ctx):
                probe.seen.append(("transform", ctx.index, ctx.quant_out))

            def quantize_block(self, ctx):
                probe.seen.append(("quantize", ctx.index, ctx.quant_out))
                return super().quantize_block(ctx)

        register(Probe)


@pytest.mark.parametrize("quant_out", [True, False])
def test_methods_see_quant_out_on_the_block_context(quant_out, tiny_model_dir, tiny_text_file, tmp_path):
    probe = _QuantOutProbe()
    probe.seen = []
    raw = run_config(tiny_model_dir, tiny_text_file, tmp_path / "out", method="quant_out_probe")
    raw["quant"]["quant_out"] = quant_out
    raw["eval"]["eval_pos"] = ["fake_quant"]
    with registered(probe, name="test:quant_out_probe"):
        Run(config.validate(raw)).execute()
    if quant_out:  # each block quantized right after its transform, in the same pass
        expected = [("transform", 0, True), ("quantize", 0, True), ("transform", 1, True), ("quantize", 1, True)]
    else:  # a separate quantize pass after the transform pass
        expected = [("transform", 0, False), ("transform", 1, False), ("quantize", 0, False), ("quantize", 1, False)]
    assert probe.seen == expected


class _QuantizesNothing:
    """A method plugin whose quantize_block quantizes nothing."""

    @hookimpl
    def llmc_register_methods(self, register):
        from llmc_core.api import Method

        class Nothing(Method):
            name = "quantizes_nothing"

            def quantize_block(self, ctx):
                return {}

        register(Nothing)


def test_a_method_that_quantizes_nothing_fails_before_fake_quant(tiny_model_dir, tiny_text_file, tmp_path):
    raw = run_config(tiny_model_dir, tiny_text_file, tmp_path / "out", method="quantizes_nothing")
    raw["eval"]["eval_pos"] = ["fake_quant"]
    raw["save"]["save_fake"] = True
    with registered(_QuantizesNothing(), name="test:quantizes_nothing"), pytest.raises(LlmcError, match="quantized no layer"):
        Run(config.validate(raw)).execute()
    assert not (tmp_path / "out" / "fake_quant_model").exists()


@pytest.mark.skipif(not __import__("os").access("/proc/self/clear_refs", __import__("os").W_OK), reason="needs Linux's /proc/self/clear_refs")
def test_each_stage_records_its_own_peak_memory(tiny_model_dir, tiny_text_file, tmp_path):
    """A stage that touches 256 MB and frees it, then one that allocates nothing: the second's
    peak RSS is its own (well below the first's), not the process's peak so far."""
    run = Run(config.validate(run_config(tiny_model_dir, tiny_text_file, tmp_path / "out")))
    with run.stage("big"):
        big = torch.ones(64 * 2**20)  # 256 MB, every page written
        del big
    with run.stage("small"):
        pass
    big, small = run.stages
    assert big["peak_rss_mb"] - small["peak_rss_mb"] > 200
