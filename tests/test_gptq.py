"""GPTQ: the solver against RTN and against its objective, act-order layouts, damping, config
checks, and runs end to end on a tiny Llama (seconds each)."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from llmc_core import config
from llmc_core.api import Method
from llmc_core.blockwise import BlockContext, capture_block_inputs
from llmc_core.errors import LlmcError
from llmc_core.quant import QuantSpec
from llmc_core.quant.fake import fake_quantize, quantize_weight
from llmc_core.run import Run
from llmc_core.testing import StopAfterBlock, read_results, registered, run_cli, run_config, save_tiny_llama, tiny_llama, write_config
from llmc_plugins.methods.gptq import Gptq
from llmc_plugins.methods.gptq.method import GptqConfig
from llmc_plugins.methods.gptq.solver import Hessian, gptq_quantize, inverse_factor
from llmc_plugins.models.families import LlamaAdapter

SPECS = [
    QuantSpec(bit=4, symmetric=False, granularity="per_group", group_size=16),
    QuantSpec(bit=3, symmetric=True, granularity="per_group", group_size=32),
    QuantSpec(bit=4, symmetric=False, granularity="per_channel"),
    QuantSpec(bit=8, symmetric=True, granularity="per_tensor"),
    QuantSpec(bit=2, symmetric=False, granularity="per_group", group_size=16, scale_dtype="float16"),
    QuantSpec(bit=3, symmetric=False, granularity="per_group", group_size=16, calib_algo="mse"),
]


def correlated_inputs(n=512, d=64, seed=0):
    """Tokens with correlated channels and a few strong ones, like real activations."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5 + torch.eye(d)
    x = torch.randn(n, d, generator=g) @ mix
    x[:, :4] *= 8
    return x


def hessian(x):
    h = Hessian.zeros(x.shape[1], "cpu")
    h.add(x)
    return h.value()


# -- the solver ----------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
@pytest.mark.parametrize("actorder", [False, True])
def test_identity_hessian_is_rtn_exactly(spec, actorder):
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(1))
    res = gptq_quantize(w, torch.eye(64), spec, blocksize=16, actorder=actorder, static_groups=actorder)
    rtn = quantize_weight(w, spec)
    assert torch.equal(res.weight.codes, rtn.codes)
    assert torch.equal(res.weight.dequantize(), fake_quantize(w, spec))


@pytest.mark.parametrize("spec", SPECS[:3], ids=lambda s: s.describe())
@pytest.mark.parametrize("actorder,static", [(False, False), (True, False), (True, True)])
def test_output_error_on_calibration_inputs_is_below_rtn(spec, actorder, static):
    x = correlated_inputs()
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(2))
    res = gptq_quantize(w, hessian(x), spec, blocksize=16, actorder=actorder, static_groups=static)
    err = (x @ (res.weight.dequantize() - w).T).pow(2).mean()
    err_rtn = (x @ (fake_quantize(w, spec) - w).T).pow(2).mean()
    assert err < 0.8 * err_rtn


def test_blocksize_changes_speed_not_the_result():
    x, w = correlated_inputs(), torch.randn(16, 64)
    a = gptq_quantize(w, hessian(x), SPECS[0], blocksize=64).weight
    b = gptq_quantize(w, hessian(x), SPECS[0], blocksize=8).weight
    # Same algorithm, another float summation order: scales differ in the last bits at most.
    assert (a.codes != b.codes).float().mean() < 0.01
    assert torch.allclose(a.dequantize(), b.dequantize(), atol=1e-5)


def test_groups_wider_than_a_block_use_the_updated_columns():
    """A group straddling blocks gets its parameters from its columns with every update so far
    applied: the result must not depend on where the block boundaries fall."""
    x, w = correlated_inputs(), torch.randn(16, 64)
    spec = QuantSpec(bit=3, symmetric=False, granularity="per_group", group_size=32)
    a = gptq_quantize(w, hessian(x), spec, blocksize=64).weight
    b = gptq_quantize(w, hessian(x), spec, blocksize=8).weight
    assert torch.allclose(a.scales, b.scales, rtol=1e-4)


def test_actorder_groups_follow_the_permutation_and_g_idx_maps_them():
    x = correlated_inputs()
    x[:, 40:44] *= 20  # the strongest inputs sit in the third group of the natural order
    w = torch.randn(8, 64)
    res = gptq_quantize(w, hessian(x), SPECS[0], actorder=True)
    g_idx = res.weight.g_idx
    assert g_idx is not None and g_idx.shape == (64,)
    assert set(g_idx[40:44].tolist()) == {0}  # processed first, so in the first permuted group
    assert torch.bincount(g_idx).tolist() == [16] * 4
    deq = res.weight.dequantize()
    # every column is exactly codes x its own group's parameters
    j = 41
    col = (res.weight.codes[:, j].float() - res.weight.zeros[:, g_idx[j]]) * res.weight.scales[:, g_idx[j]]
    assert torch.equal(deq[:, j], col)
    static = gptq_quantize(w, hessian(x), SPECS[0], actorder=True, static_groups=True).weight
    assert static.g_idx is None and static.scales.shape == (8, 4)


def test_dead_inputs_zero_their_columns():
    x = correlated_inputs()
    x[:, [3, 17]] = 0
    res = gptq_quantize(torch.randn(8, 64), hessian(x), SPECS[0])
    assert res.dead == 2 and not res.weight.dequantize()[:, [3, 17]].any()


def test_rank_deficient_hessian_gives_no_nan_and_raises_the_damping(caplog):
    x = correlated_inputs(n=3)  # rank 3 of 64
    w = torch.randn(16, 64)
    with caplog.at_level(logging.WARNING, logger="llmc.gptq"):
        res = gptq_quantize(w, hessian(x), SPECS[0], percdamp=0.0)
    assert res.retries >= 1 and "damping raised" in caplog.text
    assert torch.isfinite(res.weight.dequantize()).all() and torch.isfinite(torch.tensor(res.loss))
    res = gptq_quantize(w, hessian(x), SPECS[0])  # percdamp 0.01 suffices: no retry, still finite
    assert res.retries == 0 and torch.isfinite(res.weight.dequantize()).all()


def test_non_finite_hessian_is_a_clear_error():
    h = torch.eye(8)
    h[1, 2] = float("nan")
    with pytest.raises(LlmcError, match="NaN/inf"):
        inverse_factor(h, 0.01)


# -- the method on a block -----------------------------------------------------------------------


def block_ctx(n_batches=2, bs=2, seq=32, seed=0):
    model = tiny_llama(seed=seed)
    adapter = LlamaAdapter(model)
    gen = torch.Generator().manual_seed(seed)
    batches = [torch.randint(4, 128, (bs, seq), generator=gen) for _ in range(n_batches)]
    inputs, kwargs = capture_block_inputs(model, adapter, batches, torch.device("cpu"))
    return BlockContext(0, adapter.blocks()[0], adapter.block_prefix(0), adapter, inputs, kwargs, torch.device("cpu"))


def block_error(ctx, ref):
    with torch.no_grad():
        outs = ctx.forward()
    return sum(float((o - r).pow(2).sum()) for o, r in zip(outs, ref))


@pytest.mark.parametrize("true_sequential", [True, False])
def test_block_output_error_below_rtn_and_float_block_kept(true_sequential):
    spec = QuantSpec(bit=3, symmetric=False, granularity="per_group", group_size=16)
    ctx = block_ctx()
    with torch.no_grad():
        ref = ctx.forward()
    before = {n: p.clone() for n, p in ctx.block.state_dict().items()}
    method = Gptq(GptqConfig(true_sequential=true_sequential, forward_dtype="float32"), spec)
    method.transform_block(ctx)
    assert all(torch.equal(before[n], p) for n, p in ctx.block.state_dict().items())  # float block unchanged
    if not true_sequential:  # the one full forward's outputs are the float block's
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(ctx.outputs, ref))
    qw = method.quantize_block(ctx)
    assert len(qw) == 7 and not method.solved
    err = block_error(ctx, ref)
    ctx.block.load_state_dict(before)
    Method.quantize_block(method, ctx)  # the base class's quantize_block is RTN
    assert err < block_error(ctx, ref)
    assert {r["layer"] for r in method.log} == set(ctx.adapter.quant_linears(ctx.block))


def test_true_sequential_sees_the_quantized_earlier_layers():
    """With true_sequential o_proj's Hessian comes from q/k/v already quantized, so it differs
    from the float block's; without it, q/k/v's Hessian is the same either way."""
    spec = QuantSpec(bit=2, symmetric=False, granularity="per_group", group_size=16)
    results = {}
    for seq in (True, False):
        ctx = block_ctx()
        m = Gptq(GptqConfig(true_sequential=seq, forward_dtype="float32"), spec)
        m.transform_block(ctx)
        results[seq] = m.solved
    q, o = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj"
    assert torch.equal(results[True][q].codes, results[False][q].codes)
    assert not torch.equal(results[True][o].codes, results[False][o].codes)


@pytest.mark.parametrize("d", [64, 300, 1100])
def test_hessian_upper_triangle_is_the_full_product(d):
    """Only XᵀX's upper block triangle is accumulated (in strips); the value is the whole H."""
    x = correlated_inputs(n=256, d=d, seed=d)
    h = Hessian.zeros(d, "cpu")
    h.add(x[:100])
    h.add(x[100:])
    value = h.value()
    assert torch.equal(value, value.T)
    assert torch.allclose(value, 2 * x.T @ x / 256, rtol=1e-4, atol=1e-3)


def test_hessian_of_a_bfloat16_input_widens_it_in_parts_and_misses_no_row(monkeypatch):
    """A bfloat16 input (forward_dtype) is summed in float32 a few rows at a time: the same H as
    the whole input widened at once, the last short part included."""
    from llmc_plugins.methods.gptq import solver

    monkeypatch.setattr(solver, "CONVERT_TOKENS", 64)
    x = correlated_inputs(n=200, d=40, seed=1).bfloat16()
    h = Hessian.zeros(40, "cpu")
    h.add(x.reshape(2, 100, 40))
    whole = x.float()
    h.add(torch.zeros(0, 40))  # a call that carried no tokens adds nothing, in either dtype
    h.add(torch.zeros(0, 40, dtype=torch.bfloat16))
    assert h.tokens == 200
    assert torch.allclose(h.value(), 2 * whole.T @ whole / 200, rtol=1e-5, atol=1e-5)


FAMILY_ATTN = [("llama", "sdpa"), ("llama", "eager"), ("qwen3", "sdpa"), ("phi3", "sdpa"), ("gemma2", "eager"), ("gemma3_text", "sdpa")]


def family_ctx(model_type, attn, quant_out):
    from llmc_core.testing import tiny_model
    from llmc_plugins.models.families import FAMILIES

    model = tiny_model(model_type, attn=attn)
    family = next(f for f in FAMILIES if model_type in f.model_types)
    adapter = family().adapter(model)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(4, 128, (2, 32), generator=gen) for _ in range(3)]
    inputs, kwargs = capture_block_inputs(model, adapter, batches, torch.device("cpu"))
    return BlockContext(0, adapter.blocks()[0], adapter.block_prefix(0), adapter, inputs, kwargs, torch.device("cpu"), quant_out=quant_out)


def solve_block(ctx, monkeypatch=None, probe=None, **options):
    """GPTQ on ``ctx``'s block, as the run does with quant_out; returns the solved codes, the
    outputs GPTQ handed over and how often each linear layer ran. The block runs as it is
    (``forward_dtype: float32``) unless ``options`` say otherwise."""
    options.setdefault("forward_dtype", "float32")
    from llmc_plugins.methods.gptq import passes

    if probe is not None:
        monkeypatch.setattr(passes, "_probe", probe)
    linears = ctx.adapter.quant_linears(ctx.block)
    calls = dict.fromkeys(linears, 0)
    handles = [m.register_forward_hook(lambda *a, _n=n: calls.__setitem__(_n, calls[_n] + 1)) for n, m in linears.items()]
    method = Gptq(GptqConfig(**options), QuantSpec(bit=3, symmetric=False, granularity="per_group", group_size=16))
    method.transform_block(ctx)
    for handle in handles:
        handle.remove()
    codes = {n: q.codes for n, q in method.solved.items()}
    assert ctx.outputs == []  # quant_out: what transform_block computes is the quantized block's, for quantize_block
    method.quantize_block(ctx)
    return codes, ctx.outputs, calls


@pytest.mark.parametrize("model_type,attn", FAMILY_ATTN)
def test_known_submodule_outputs_change_nothing_and_save_the_forwards(model_type, attn, monkeypatch):
    """GPTQ (true_sequential, quant_out) replaces a submodule whose output is a solved layer's by
    that layer on its kept input. Against the same solve with every submodule recomputed: the
    same codes, the handed-over outputs are the quantized block's, and every layer ran once per
    calibration call (plus the probe), o_proj's submodule only where attention returns no weights."""
    from llmc_plugins.methods.gptq import passes

    ctx = family_ctx(model_type, attn, quant_out=True)
    found = passes._probe(ctx, ctx.adapter.quant_linears(ctx.block))[1]
    assert {layer: parent for layer, (parent, _) in found.items()} == ({"self_attn.o_proj": "self_attn"} if attn == "sdpa" else {}) | {"mlp.down_proj": "mlp"}
    codes, outputs, calls = solve_block(ctx)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(outputs, ctx.forward()))  # the quantized block's outputs
    once = [n for n in calls if attn == "sdpa" or n.startswith("mlp.")]  # eager attention is recomputed
    assert {calls[n] for n in once} == {1 + len(ctx.inputs)}, calls
    ref = family_ctx(model_type, attn, quant_out=True)
    ref_codes, ref_outputs, ref_calls = solve_block(ref, monkeypatch, probe=lambda c, lin, compute=None: (list(lin), {}))
    assert codes.keys() == ref_codes.keys() and all(torch.equal(codes[n], ref_codes[n]) for n in codes)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(outputs, ref_outputs))
    assert max(ref_calls.values()) > 1 + len(ctx.inputs)  # the reference recomputed them


def test_one_pass_solve_hands_over_the_quantized_block_outputs():
    """Without true_sequential every input comes from the float block: o_proj's input is not the
    quantized block's, so it must not stand in for the attention's output."""
    ctx = family_ctx("llama", "sdpa", quant_out=True)
    _, outputs, _ = solve_block(ctx, true_sequential=False)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(outputs, ctx.forward()))


def test_sliced_calls_keep_and_let_go_of_known_outputs_per_slice(monkeypatch):
    """Batches forwarded in slices (one sample per call here): each kept input turns into its
    layer's output slice by slice, every pass finds the known output of its own call, and the
    last pass (which lets each go after use) still hands over the quantized block's outputs."""
    from llmc_core import blockwise

    monkeypatch.setattr(blockwise, "FORWARD_TOKENS", 32)
    ctx = family_ctx("llama", "sdpa", quant_out=True)
    _, outputs, calls = solve_block(ctx)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(outputs, ctx.forward()))
    assert calls["mlp.down_proj"] == calls["self_attn.o_proj"] == 1 + 2 * len(ctx.inputs)  # the probe, then once per slice


def test_bfloat16_forwards_run_under_autocast_and_hand_over_the_same_outputs(monkeypatch):
    """``forward_dtype: bfloat16`` on a float32 block: the layers after a matmul (o_proj,
    down_proj) see bfloat16 inputs, their kept inputs are bfloat16 (half the memory), the
    handed-over outputs are the quantized block's under the same autocast and stay float32, and
    the known-output shortcut changes nothing against recomputing every submodule."""
    from llmc_plugins.methods.gptq import passes

    ctx = family_ctx("llama", "sdpa", quant_out=True)
    seen, kept = {}, []
    linears = ctx.adapter.quant_linears(ctx.block)
    handles = [m.register_forward_pre_hook(lambda mod, a, _n=n: seen.__setitem__(_n, a[0].dtype)) for n, m in linears.items()]
    real_mark = passes.BlockPasses.mark_solved
    monkeypatch.setattr(passes.BlockPasses, "mark_solved", lambda self, layers: (kept.extend((layers[0], x.dtype) for x in self._inputs.get(layers[0], [])), real_mark(self, layers))[1])
    codes, outputs, _ = solve_block(ctx, forward_dtype="bfloat16")
    for h in handles:
        h.remove()
    assert seen["self_attn.o_proj"] == seen["mlp.down_proj"] == torch.bfloat16 and seen["self_attn.q_proj"] == torch.float32
    assert kept and all(dtype == torch.bfloat16 for _, dtype in kept)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = ctx.forward()
    assert all(a.dtype == torch.float32 and torch.equal(a, b) for a, b in zip(outputs, expected))
    ref = family_ctx("llama", "sdpa", quant_out=True)
    ref_codes, ref_outputs, _ = solve_block(ref, monkeypatch, probe=lambda c, lin, compute=None: (list(lin), {}), forward_dtype="bfloat16")
    assert all(torch.equal(codes[n], ref_codes[n]) for n in codes)
    assert all(torch.equal(a, b) for a, b in zip(outputs, ref_outputs))


@pytest.mark.parametrize("cpu,expected", [("avx2", None), ("amx", torch.bfloat16)])
def test_forward_dtype_auto_lowers_float32_only_where_bf16_is_fast(cpu, expected, monkeypatch, caplog):
    from llmc_plugins.methods.awq import precision

    monkeypatch.setattr(precision, "fast_bf16", lambda *a: (cpu == "amx", cpu))
    precision._log_once.cache_clear()
    method = Gptq(GptqConfig(), SPECS[0])
    with caplog.at_level(logging.INFO, logger="llmc.precision"):
        assert method._forward_dtype(torch.zeros(2, 2)) is expected
    assert f"forward_dtype auto: {'bfloat16' if expected else 'float32'} on cpu ({cpu})" in caplog.text
    assert method._forward_dtype(torch.zeros(2, 2, dtype=torch.bfloat16)) is None  # a bf16 model runs as it is
    assert Gptq(GptqConfig(forward_dtype="float32"), SPECS[0])._forward_dtype(torch.zeros(2, 2)) is None
    precision._log_once.cache_clear()


def test_fused_moe_experts_are_refused_before_any_work():
    from llmc_core.testing import tiny_model
    from llmc_plugins.models.families import FAMILIES

    model = tiny_model("mixtral")
    adapter = next(f for f in FAMILIES if "mixtral" in f.model_types)().adapter(model)
    with pytest.raises(LlmcError, match="fused MoE expert weights .* Use quant.method: Awq or RTN"):
        Gptq(GptqConfig(), SPECS[0]).check_model(adapter)


# -- configs, savers, runs -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "special,message",
    [
        ({"actordr": True}, "Did you mean 'actorder'?"),
        ({"percdamp": -1}, "quant.special.percdamp"),
        ({"blocksize": 0}, "quant.special.blocksize"),
        ({"owq": True, "n_outs": [6]}, "'owq' is not supported"),
        ({"quant_out": True}, "move it to quant.quant_out"),
        ({"weighted_mse": True}, "set quant.weight.calib_algo: mse"),
    ],
)
def test_bad_special_keys_are_clear_errors(special, message, tiny_model_dir, tiny_text_file, tmp_path):
    cfg = run_config(tiny_model_dir, tiny_text_file, tmp_path / "out", method="GPTQ", special=special)
    with pytest.raises(LlmcError) as exc:
        config.validate(cfg)
    text = "\n".join(exc.value.problems)
    assert message in text and "quant.special" in text


@pytest.mark.parametrize("what", ["save_awq", "real_quant"])
def test_actorder_without_static_groups_cannot_be_packed(what, tiny_model_dir, tiny_text_file, tmp_path):
    cfg = run_config(tiny_model_dir, tiny_text_file, tmp_path / "out", method="gptq", special={"actorder": True, "static_groups": False})
    if what == "save_awq":
        cfg["save"]["save_awq"] = True
    else:
        cfg["eval"]["eval_pos"] = ["fake_quant", "real_quant"]
    with pytest.raises(LlmcError) as exc:
        config.validate(cfg)
    lines = [ln for ln in exc.value.problems if "static_groups: true" in ln]
    assert len(lines) == 1 and lines[0].startswith("save.save_awq:" if what == "save_awq" else "eval.eval_pos: real_quant:"), exc.value.problems
    cfg["quant"]["special"]["static_groups"] = True
    config.validate(cfg)


def test_actorder_static_groups_round_trips_through_save_awq(tiny_model_dir, tiny_text_file, tmp_path):
    from safetensors.torch import load_file

    from llmc_plugins.savers.awq_format import load_awq_folder
    from llmc_core.quant.pack import unpack_awq, AwqTensors

    out = tmp_path / "out"
    cfg = run_config(tiny_model_dir, tiny_text_file, out, method="gptq", eval_pos=("fake_quant", "real_quant"), special={"actorder": True, "static_groups": True}, save={"save_path": str(out), "save_fake": True, "save_awq": True})
    cfg["quant"]["weight"]["scale_dtype"] = "float16"
    cfg["quant"]["quant_out"] = True
    cfg["eval"]["num_samples"] = 4
    run = Run(config.validate(cfg))
    records = {r.position: r.value for r in run.execute()}
    assert records["real_quant"] == pytest.approx(records["fake_quant"], rel=1e-3)
    packed, floats = load_file(out / "awq_model" / "model.safetensors"), load_file(out / "fake_quant_model" / "model.safetensors")
    names = sorted(k[: -len(".qweight")] for k in packed if k.endswith(".qweight"))
    assert len(names) == 14
    for name in names:
        codes, zeros, scales = unpack_awq(AwqTensors(packed[f"{name}.qweight"], packed[f"{name}.qzeros"], packed[f"{name}.scales"], 32))
        g = torch.arange(codes.shape[1]) // 32
        w = (codes.float() - zeros.float()[:, g]) * scales.float()[:, g]
        assert torch.equal(w, floats[f"{name}.weight"]), name
        assert torch.equal(run.quantized[name].dequantize(), w), name
    assert sum(1 for _ in load_awq_folder(out / "awq_model").modules()) > 0


def test_end_to_end_tiny_run_via_cli_beats_rtn(tiny_model_dir, tiny_text_file, tmp_path, caplog):
    results = {}
    for method in ("rtn", "GPTQ"):
        out = tmp_path / method
        cfg = run_config(tiny_model_dir, tiny_text_file, out, method=method, bit=3, special={"actorder": True} if method == "GPTQ" else {})
        cfg["calib"].update(n_samples=16, preproc="random_window")
        cfg["quant"]["quant_out"] = method == "GPTQ"
        cfg["eval"].update(num_samples=8)
        cfg["save"]["save_fake"] = True
        path = write_config(tmp_path / f"{method}.yml", cfg)
        with caplog.at_level(logging.INFO, logger="llmc.gptq"):
            result = run_cli("run", str(path))
        assert result.exit_code == 0, result.stderr
        assert read_results(out)[("fake_quant", "ppl", "custom", "perplexity")] > 0
        rows = json.loads((out / "results.json").read_text())["layer_errors"]
        results[method] = sum(r["output_rel_mse"] for r in rows) / len(rows)
        assert len(rows) == 14
    assert "block 1 mlp.down_proj: loss" in caplog.text
    # A random tiny model's perplexity hardly moves under quantization; the per-layer output error
    # on calibration tokens (the report's) is what GPTQ minimises.
    assert results["GPTQ"] < 0.8 * results["rtn"]


def test_quant_out_false_keeps_the_float_block_until_quantize(tiny_model_dir, tiny_text_file, tmp_path):
    cfg = run_config(tiny_model_dir, tiny_text_file, tmp_path / "out", method="gptq", bit=3, eval_pos=("pretrain", "transformed", "fake_quant"))
    cfg["eval"]["num_samples"] = 4
    run = Run(config.validate(cfg))
    records = {r.position: r.value for r in run.execute()}
    assert records["transformed"] == pytest.approx(records["pretrain"], rel=1e-6)
    assert records["fake_quant"] != pytest.approx(records["pretrain"], rel=1e-4)
    assert len(run.quantized) == 14 and not run.method.solved
    rows = run.layer_errors.rows
    assert len(rows) == 14 and all(r["output_rel_mse"] is not None and r["output_rel_mse"] > 0 for r in rows)


@pytest.mark.parametrize("quant_out", [True, False])
def test_interrupted_run_resumes_to_the_same_model(quant_out, tmp_path, tiny_text_file):
    """With quant_out the blocks are quantized as they finish; without it the solved integer
    weights wait on the method object, so the checkpoint must carry them."""
    from safetensors.torch import load_file

    model = save_tiny_llama(tmp_path / "model", layers=3)

    def config(name):
        out = tmp_path / name
        cfg = run_config(model, tiny_text_file, out, method="gptq", bit=3, special={"actorder": True, "static_groups": False})
        cfg["quant"]["quant_out"] = quant_out
        cfg["eval"]["num_samples"] = 1
        cfg["save"] = {"save_path": str(out), "save_fake": True, "checkpoint_blocks": True}
        return write_config(tmp_path / f"{name}.yml", cfg), out

    ref_cfg, ref_out = config("ref")
    assert run_cli("run", str(ref_cfg), "-q").exit_code == 0
    cfg, out = config("stopped")
    with registered(StopAfterBlock(0), name="test:stop_after_block"):
        stopped = run_cli("run", str(cfg), "-q")
    assert stopped.exit_code == 130 and "1 block(s) kept" in stopped.stderr, stopped.stderr
    resumed = run_cli("run", str(cfg), "--resume", "-q")
    assert resumed.exit_code == 0, resumed.stderr
    for file in ("model.safetensors", "llmc_qparams.safetensors"):  # the weights, and the codes/scales/g_idx beside them
        wa, wb = load_file(ref_out / "fake_quant_model" / file), load_file(out / "fake_quant_model" / file)
        assert wa.keys() == wb.keys() and all(wa[k].equal(wb[k]) for k in wa), file
    assert any(k.endswith(".g_idx") for k in wa)  # act-order without static groups: the layout the checkpoint must keep
    assert read_results(out) == read_results(ref_out)


def test_shipped_configs_validate(monkeypatch, tmp_path, shared_data, smollm2_path):
    monkeypatch.setenv("LLMC_OUT", str(tmp_path))
    monkeypatch.setenv("LLMC_DATA", str(shared_data))
    cfg = config.load("configs/quickstart/gptq_w4g64_smollm2.yml")
    assert cfg.method is Gptq and cfg.special.actorder and cfg.special.static_groups and cfg.quant.quant_out
    config.load("configs/quickstart/gptq_w4g64_smollm2.yml", ["save.save_awq=true", "quant.weight.scale_dtype=float16"])
    monkeypatch.setenv("LLMC_MODEL", str(smollm2_path))
    cfg = config.load("configs/quantization/gptq_w4a16g128.yml", ["model.type=SmolLM2"])
    assert cfg.special.actorder and not cfg.special.static_groups and cfg.weight.group_size == 128
    cfg = config.load("configs/quantization/gptq_w4a16g128.yml", ["model.type=SmolLM2", "quant.special={}"])
    assert cfg.special.actorder and cfg.special.static_groups  # llmc's defaults: act-order, packed layout kept


@pytest.mark.slow
def test_smollm2_gptq_beats_rtn(smollm2_hf, shared_data, tmp_path):
    """Real model, 8 calibration samples of 512 tokens, 1 WikiText-2 window at w3 g64: GPTQ's
    fake_quant perplexity is below RTN's on the same window (measured: 39.58 against 56.01).
    (With 4 x 256 tokens, fewer than down_proj's 1536 inputs, H is rank-deficient and GPTQ
    overfits: 57.7 against RTN's 56.0.)"""
    common = [f"model.path={smollm2_hf}", f"eval.path={shared_data / 'wikitext2' / 'wiki.test.raw'}", "eval.num_samples=1", "eval.eval_pos=[fake_quant]", "quant.weight.bit=3"]
    gptq = config.load(
        "configs/quickstart/gptq_w4g64_smollm2.yml",
        [*common, f"save.save_path={tmp_path / 'gptq'}", f"calib.path={shared_data / 'c4' / 'c4-train.00000-of-01024.first1000.jsonl'}", "calib.n_samples=8", "calib.seq_len=512"],
    )
    ppl = {r.position: r.value for r in Run(gptq).execute()}["fake_quant"]
    rtn = config.load("configs/quickstart/rtn_w4g64_smollm2.yml", [*common, f"save.save_path={tmp_path / 'rtn'}"])
    rtn_ppl = {r.position: r.value for r in Run(rtn).execute()}["fake_quant"]
    assert ppl < rtn_ppl
