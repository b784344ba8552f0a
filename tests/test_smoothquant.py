"""SmoothQuant (exact fold for every family, the reference's scale formula) and recipes of methods
(``quant.method: [SmoothQuant, GPTQ]``: options per method, refusals, report, resume)."""

from __future__ import annotations

import json

import pytest
import torch

from llmc_core import config, hookimpl
from llmc_core.api import Method, NoOptions
from llmc_core.errors import LlmcError
from llmc_core.run import Run
from llmc_core.testing import FAMILY_CONFIGS, StopAfterBlock, block_context, read_results, registered, run_cli, run_config, save_tiny_llama, tiny_model, write_config, write_corpus
from llmc_plugins.methods.smoothquant import SmoothQuant, SmoothQuantConfig


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "corpus.txt")


def _smooth(ctx, **options):
    method = SmoothQuant(SmoothQuantConfig(**options), None)
    method.transform_block(ctx)
    return method


@pytest.mark.parametrize("model_type", sorted(FAMILY_CONFIGS))
def test_the_fold_is_exact_for_every_family(model_type):
    """The smoothed block computes what the float block did (float rounding apart), and the scales
    really were folded (the norm before q/k/v changed)."""
    model = tiny_model(model_type, layers=2)
    ctx = block_context(model, index=1)
    before = ctx.forward()
    norm = ctx.block.get_submodule("input_layernorm").weight.detach().clone()
    method = _smooth(ctx)
    after = ctx.forward()
    for a, b in zip(after, before):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert not torch.equal(ctx.block.get_submodule("input_layernorm").weight, norm)
    smoothed = [e["group"] for e in method.log if "alpha" in e]
    assert smoothed[0] == "qkv" and ("gate_up" in smoothed or "experts_gate_up" in smoothed), method.log


def test_scales_follow_the_reference_formula():
    """``s = max|X|^a / max|W|^(1-a)`` per input channel of q/k/v, written here from the block's
    own input (the attention norm's output) and the q/k/v weight columns."""
    model = tiny_model("llama", layers=1)
    ctx = block_context(model, index=0, n_samples=3)
    block = ctx.block
    seen = []
    h = block.input_layernorm.register_forward_hook(lambda m, a, out: seen.append(out.detach().reshape(-1, out.shape[-1])))
    ctx.forward()
    h.remove()
    x_max = torch.cat(seen).abs().amax(0)
    w_max = torch.cat([block.self_attn.q_proj.weight, block.self_attn.k_proj.weight, block.self_attn.v_proj.weight]).abs().amax(0)
    alpha = 0.65
    s = (x_max.clamp(min=1e-5) ** alpha / w_max.clamp(min=1e-5) ** (1 - alpha)).clamp(min=1e-5)
    norm, q = block.input_layernorm.weight.detach().clone(), block.self_attn.q_proj.weight.detach().clone()
    _smooth(ctx, alpha=alpha, groups=["qkv"])
    torch.testing.assert_close(block.input_layernorm.weight, norm / s, rtol=1e-6, atol=0)
    torch.testing.assert_close(block.self_attn.q_proj.weight, q * s, rtol=1e-6, atol=0)


def test_smoothing_flattens_the_outlier_channels():
    """The tiny models carry x8 outlier channels in every norm: after smoothing, the q/k/v input's
    largest channel max is much closer to its median one."""
    model = tiny_model("llama", layers=1, outliers=4)
    ctx = block_context(model, index=0)

    def spread():
        seen = []
        h = ctx.block.self_attn.q_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
        ctx.forward()
        h.remove()
        m = torch.cat(seen).detach().abs().amax(0)
        return float(m.max() / m.median())

    before = spread()
    _smooth(ctx, alpha=0.8)
    assert spread() < before / 2


def test_alpha_search_picks_a_grid_alpha_and_logs_every_loss():
    model = tiny_model("llama", layers=1)
    ctx = block_context(model, index=0)
    from llmc_core.quant import QuantSpec
    from llmc_core.quant.scheme import Scheme

    method = SmoothQuant(SmoothQuantConfig(alpha_search=True, alpha_grid=[0.0, 0.5, 0.9]), QuantSpec(bit=4, symmetric=True, granularity="per_channel"))
    method.scheme = Scheme(method.weight, QuantSpec(bit=4, symmetric=True, granularity="per_token"), None, None)
    before = ctx.forward()
    method.transform_block(ctx)
    entry = next(e for e in method.log if "alpha_search" in e)
    assert set(entry["alpha_search"]) == {"0.0", "0.5", "0.9"} and str(entry["alpha"]) == min(entry["alpha_search"], key=entry["alpha_search"].get) and entry["alpha"] in (0.0, 0.5, 0.9)
    assert len({round(v, 12) for v in entry["alpha_search"].values()}) == 3  # each alpha was really tried
    for a, b in zip(ctx.forward(), before):  # the search's trial copies never touched the block
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# -- recipes ---------------------------------------------------------------------------------------


def _recipe_cfg(tmp_path, model_dir, corpus, methods, special=None, **quant):
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg = run_config(model_dir, corpus, tmp_path / "out", method=methods, eval_pos=("pretrain", "transformed", "fake_quant"), special=special)
    cfg["eval"]["num_samples"] = 4
    cfg["quant"].update(quant)
    if "scheme" in quant:
        del cfg["quant"]["weight"]
    return cfg


def test_smoothquant_then_gptq_runs_as_one_recipe(tiny_model_dir, corpus, tmp_path):
    """W8A8 through [SmoothQuant, GPTQ]: transformed is the float model (exact fold), each method's
    options reach it, both methods work on every block, and the report names each with its time."""
    cfg = _recipe_cfg(tmp_path, tiny_model_dir, corpus, ["SmoothQuant", "GPTQ"], {"smoothquant": {"alpha": 0.5}, "GPTQ": {"actorder": False}}, scheme="W8A8")
    run = Run(config.validate(cfg))
    records = {r.position: r.value for r in run.execute()}
    assert records["transformed"] == pytest.approx(records["pretrain"], rel=1e-4)
    sq, gptq = run.method.steps
    assert sq.options.alpha == 0.5 and gptq.options.actorder is False
    assert {e["block"] for e in sq.log if "alpha" in e} == {0, 1} and {e["block"] for e in gptq.log} == {0, 1}
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [t["method"] for t in results["recipe"]] == ["smoothquant", "gptq"] and all(t["seconds"] > 0 for t in results["recipe"])
    assert "smoothquant+gptq transform" in [s["stage"].lower() for s in results["stages"]]
    assert not any("whole-model" in s["stage"] for s in results["stages"])  # neither method has one
    assert "recipe: smoothquant (" in (tmp_path / "out" / "report.md").read_text()


def test_smoothing_before_gptq_changes_what_gptq_rounds(tiny_model_dir, corpus, tmp_path):
    """GPTQ rounds the smoothed weights: the quantized model differs from GPTQ alone."""
    results = {}
    for name, methods in (("alone", "GPTQ"), ("recipe", ["SmoothQuant", "GPTQ"])):
        cfg = _recipe_cfg(tmp_path / name, tiny_model_dir, corpus, methods, scheme="W8A8")
        run = Run(config.validate(cfg))
        run.execute()
        results[name] = run.model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    assert not torch.equal(results["alone"], results["recipe"])


def test_awq_then_gptq_is_a_recipe(tiny_model_dir, tiny_text_file, tmp_path):
    """What GPTQ's special.awq did: AWQ's exact folding first, GPTQ's rounding after."""
    cfg = run_config(tiny_model_dir, tiny_text_file, tmp_path / "out", method=["Awq", "GPTQ"], bit=3, eval_pos=("pretrain", "transformed", "fake_quant"), special={"Awq": {"trans": True, "n_grid": 5}})
    cfg["eval"]["num_samples"] = 4
    run = Run(config.validate(cfg))
    records = {r.position: r.value for r in run.execute()}
    assert records["transformed"] == pytest.approx(records["pretrain"], rel=1e-4)
    awq, gptq = run.method.steps
    assert any("alpha" in e for e in awq.log) and len(gptq.log) == 14
    scaled = run.model.model.layers[0].input_layernorm.weight
    assert not torch.allclose(scaled, torch.ones_like(scaled))  # scales were folded into the norm


@pytest.mark.parametrize(
    ("methods", "special", "expected"),
    [
        (["SmoothQuant", "GPTQ"], {"alpha": 0.5}, "quant.special.alpha: with quant.method: [SmoothQuant, GPTQ] each method's options go under its name"),
        (["SmoothQuant", "GPTQ"], {"SmoothQuant": {"alfa": 0.5}}, "quant.special.SmoothQuant.alfa"),
        (["RTN", "GPTQ"], {}, "quant.special.rtn: RTN only rounds the weights"),
        (["Awq", "GPTQ"], {"Awq": {"weight_clip": True, "clip_version": "v2"}}, "clip_version: v1"),
        (["GPTQ", "gptq"], {}, "a recipe names each method once"),
        ([], {}, "name a method"),
        (["SmoothQuant", "Nope"], {}, "quant.method.1"),
    ],
)
def test_bad_recipes_are_refused_in_one_line(tiny_model_dir, corpus, tmp_path, methods, special, expected):
    cfg = _recipe_cfg(tmp_path, tiny_model_dir, corpus, methods, special, scheme="W4A16")
    with pytest.raises(LlmcError) as exc:
        config.validate(cfg)
    assert any(expected in line for line in exc.value.problems), exc.value.problems


def test_a_recipe_refuses_a_scheme_one_of_its_methods_cannot_make(tiny_model_dir, corpus, tmp_path):
    cfg = _recipe_cfg(tmp_path, tiny_model_dir, corpus, ["Awq", "GPTQ"], scheme="FP8_DYNAMIC")
    with pytest.raises(LlmcError) as exc:
        config.validate(cfg)
    assert any(line.startswith("quant.method: Awq+GPTQ: awq in the recipe:") for line in exc.value.problems), exc.value.problems


def test_gptq_special_awq_points_to_the_recipe(tiny_model_dir, corpus, tmp_path):
    cfg = run_config(tiny_model_dir, corpus, tmp_path / "out", method="gptq", special={"awq": {"trans": True}})
    res = run_cli("run", str(write_config(tmp_path / "c.yml", cfg)))
    assert res.exit_code == 2 and "Traceback" not in res.stderr
    assert "quant.method: [Awq, GPTQ]" in res.stderr and "quant.special.Awq" in res.stderr, res.stderr


def test_a_recipe_resumes_to_the_uninterrupted_result(tmp_path, corpus):
    from safetensors.torch import load_file

    model = save_tiny_llama(tmp_path / "model4", layers=4)

    def cfg_for(name):
        cfg = _recipe_cfg(tmp_path / name, model, corpus, ["SmoothQuant", "GPTQ"], scheme="W8A8")
        cfg["save"] = {"save_path": str(tmp_path / name / "out"), "save_fake": True, "checkpoint_blocks": True}
        return write_config(tmp_path / f"{name}.yml", cfg), tmp_path / name / "out"

    ref_cfg, ref_out = cfg_for("ref")
    assert run_cli("run", str(ref_cfg), "-q").exit_code == 0
    cfg, out = cfg_for("stopped")
    with registered(StopAfterBlock(1), name="test:stop_after_block_recipe"):
        stopped = run_cli("run", str(cfg), "-q")
    assert stopped.exit_code == 130 and "2 block(s) kept" in stopped.stderr, stopped.stderr
    resumed = run_cli("run", str(cfg), "--resume", "-q")
    assert resumed.exit_code == 0, resumed.stderr
    a, b = load_file(ref_out / "fake_quant_model" / "model.safetensors"), load_file(out / "fake_quant_model" / "model.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    assert read_results(out) == read_results(ref_out)
    ref_log, got_log = (json.loads((o / "results.json").read_text())["recipe"] for o in (ref_out, out))
    assert [t["method"] for t in got_log] == [t["method"] for t in ref_log]


# -- whole-model step ------------------------------------------------------------------------------


class _Doubler(Method):
    """Test method: a whole-model step (the embedding doubled), then RTN; records its calls."""

    name = "whole_model_test"
    Config = NoOptions
    calls: list = []

    def transform_model(self, adapter, device):
        with torch.no_grad():
            adapter.model.model.embed_tokens.weight.mul_(2)
        type(self).calls.append(("model", None))

    def transform_block(self, ctx):
        type(self).calls.append(("block", ctx.index))


class _WholeModel:
    @hookimpl
    def llmc_register_methods(self, register):
        register(_Doubler)


def test_a_whole_model_step_runs_once_before_the_block_pass(tiny_model_dir, corpus, tmp_path):
    plugin = _WholeModel()
    _Doubler.calls = []
    cfg = run_config(tiny_model_dir, corpus, tmp_path / "out", method="whole_model_test", eval_pos=("pretrain", "transformed"))
    cfg["eval"]["num_samples"] = 2
    with registered(plugin, name="test:whole_model"):
        run = Run(config.validate(cfg))
        records = {r.position: r.value for r in run.execute()}
    calls = _Doubler.calls
    assert [c[0] for c in calls] == ["model", "block", "block"], calls
    assert records["transformed"] != pytest.approx(records["pretrain"], rel=1e-6)  # the doubled embedding changed the model
    assert any(s["stage"] == "whole_model_test whole-model step" for s in run.stages)
