"""AWQ: scale folding, the scale and clip searches, config checks, and runs end to end.

Unit tests use a tiny random Llama (seconds). The one ``slow`` test runs the real SmolLM2-135M on
a few calibration samples and WikiText-2 windows; the speed/accuracy table comes from
``benchmarks/awq_speed.py``.
"""

from __future__ import annotations

import logging

import pytest
import torch

from llmc_core import config
from llmc_core.blockwise import BlockContext, capture_block_inputs
from llmc_core.errors import LlmcError
from llmc_core.quant import QuantSpec
from llmc_core.quant.fake import fake_quantize, fake_quantize_
from llmc_core.run import Run
from llmc_core.testing import (
    read_results,
    run_cli,
    run_config,
    tiny_llama,
    write_config,
)
from llmc_plugins.methods.awq import Awq, capture
from llmc_plugins.methods.awq import scale_search as ss
from llmc_plugins.methods.awq.clip import clippable, search_clip
from llmc_plugins.methods.awq.method import AwqConfig, block_quant_loss
from llmc_plugins.models.families import LlamaAdapter

SPEC3 = QuantSpec(bit=3, symmetric=False, granularity="per_group", group_size=32)


def block_ctx(kv_heads=4, n_batches=3, bs=2, seq=32, seed=0, index=0):
    """Block ``index`` of a tiny Llama with its cached inputs (``n_batches`` batches)."""
    model = tiny_llama(kv_heads=kv_heads, seed=seed)
    adapter = LlamaAdapter(model)
    gen = torch.Generator().manual_seed(seed)
    batches = [torch.randint(4, 128, (bs, seq), generator=gen) for _ in range(n_batches)]
    inputs, kwargs = capture_block_inputs(model, adapter, batches, torch.device("cpu"))
    ctx = BlockContext(0, adapter.blocks()[0], adapter.block_prefix(0), adapter, inputs, kwargs, torch.device("cpu"))
    if index:
        with torch.no_grad():
            outs = ctx.forward()
        ctx = BlockContext(index, adapter.blocks()[index], adapter.block_prefix(index), adapter, outs, kwargs, torch.device("cpu"))
    return model, ctx


def method(spec=SPEC3, **special):
    m = Awq(AwqConfig(**special), spec)
    return m


@torch.no_grad()
def reference(ctx):
    return ctx.forward()


def capture_module(ctx, inspect, layers):
    return capture.capture_block(ctx, [capture.Target("t", inspect, layers)]).modules["t"]


def capture_linear(ctx, layer):
    return capture.capture_block(ctx, [capture.Target("t", layer, [layer], linear=True)]).linears["t"]


# -- the quantize-dequantize kernel ------------------------------------------------------------


@pytest.mark.parametrize("sym", [False, True])
def test_inplace_fake_quantize_is_bit_identical(sym):
    spec = QuantSpec(bit=4, symmetric=sym, granularity="per_group", group_size=16)
    w = torch.randn(5, 24, 64)
    assert torch.equal(fake_quantize_(w.clone(), spec), fake_quantize(w, spec))


# -- folding -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_scale_folding_leaves_block_outputs_unchanged(kv_heads):
    _, ctx = block_ctx(kv_heads=kv_heads)
    before = reference(ctx)
    m = method()
    m.check_model(ctx.adapter)
    with torch.no_grad():
        m.transform_block(ctx)
    after = reference(ctx)
    for a, b in zip(before, after):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    groups = {e["group"] for e in m.log if "alpha" in e}
    assert groups == ({"qkv", "o", "gate_up", "down"} if kv_heads == 4 else {"qkv", "gate_up", "down"})
    if kv_heads == 2:  # GQA: o_proj cannot be scaled against v_proj, and the log says so
        assert any(e["group"] == "o" and "grouped-query" in e["skipped"] for e in m.log)


def test_fold_scales_into_linear_and_norm_is_exact():
    torch.manual_seed(0)
    norm, prev, layer = torch.nn.RMSNorm(16), torch.nn.Linear(16, 16), torch.nn.Linear(16, 8)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(4, 16)
    ref = layer(prev(norm(x)))
    s = torch.rand(16) + 0.5
    with torch.no_grad():
        ss.fold_scales(prev, [layer], s)
        torch.testing.assert_close(layer(prev(norm(x))), ref)
        ss.fold_scales(norm, [prev], s)
        torch.testing.assert_close(layer(prev(norm(x))), ref)


# -- the scale search --------------------------------------------------------------------------


def _down_inputs(ctx):
    """The inputs of the block's down_proj on the cached batches, as ``[tokens, in]``."""
    seen = []
    handle = ctx.block.mlp.down_proj.register_forward_pre_hook(lambda m, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    try:
        with torch.no_grad():
            ctx.forward()
    finally:
        handle.remove()
    return torch.cat(seen).float()


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_chosen_scales_never_lose_to_alpha_zero(version):
    """Measured apart from the search: the down_proj group (a linear layer, so its error is
    ``Q(W')·x' - W·x`` on the real inputs) after the scale is folded against plain RTN, and the
    search's logged losses are those errors."""
    _, ctx = block_ctx()
    w, x = ctx.block.mlp.down_proj.weight.detach().clone(), _down_inputs(ctx)
    ref = x @ w.T
    rtn_err = float((x @ fake_quantize(w, SPEC3).T - ref).pow(2).mean())
    m = method(trans_version=version)
    m.check_model(ctx.adapter)
    with torch.no_grad():
        m.transform_block(ctx)
    w2, x2 = ctx.block.mlp.down_proj.weight.detach(), _down_inputs(ctx)
    torch.testing.assert_close(x2 @ w2.T, ref, rtol=1e-4, atol=1e-5)  # folded exactly
    chosen_err = float((x2 @ fake_quantize(w2, SPEC3).T - ref).pow(2).mean())
    down = next(e for e in m.log if e["group"] == "down")
    assert down["loss_rtn"] == pytest.approx(rtn_err, rel=1e-3)
    assert down["loss"] == pytest.approx(chosen_err, rel=1e-3)  # the scale folded is the one it chose
    assert chosen_err < rtn_err
    searched = [e for e in m.log if "alpha" in e]
    assert len(searched) == 4 and any(e["loss"] < e["loss_rtn"] for e in searched)


def test_search_lowers_the_quantized_block_loss():
    _, ctx = block_ctx()
    ref = reference(ctx)
    rtn = block_quant_loss(ctx, ref, SPEC3, {})
    m = method()
    m.check_model(ctx.adapter)
    with torch.no_grad():
        m.transform_block(ctx)
    assert block_quant_loss(ctx, ref, SPEC3, {}) < rtn


def test_alpha_zero_candidate_is_identity_and_normalised():
    x_mean = torch.rand(32) + 0.1
    c = ss.candidates(x_mean, None, 20)
    assert c.scales.shape == (20, 32) and c.alphas[0] == 0.0 and c.alphas[-1] == pytest.approx(0.95)
    assert torch.equal(c.scales[0], torch.ones(32))
    torch.testing.assert_close(c.scales.amax(1) * c.scales.amin(1), torch.ones(20))
    duo = ss.candidates(x_mean, torch.rand(32) + 0.1, 20)
    assert duo.alphas[-1] is None and torch.equal(duo.scales[-1], torch.ones(32))


def test_linear_path_loss_equals_running_the_layer():
    """The Gram-matrix shortcut gives the loss a forward pass over the tokens gives."""
    _, ctx = block_ctx()
    down = ctx.block.mlp.down_proj
    lin = capture_linear(ctx, down)
    cand = ss.candidates(lin.act.mean(), None, 20)
    fast = ss.linear_losses(down, lin.gram, lin.act.count, cand, SPEC3)
    slow = ss.module_losses(down, [down], capture_module(ctx, down, [down]), cand, SPEC3)
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=0)


def test_loss_is_accumulated_over_all_batches():
    """The loss per candidate is the MSE over every batch, not the first batch's."""
    _, ctx = block_ctx(n_batches=3)
    mlp = ctx.block.mlp
    layers = [mlp.gate_proj, mlp.up_proj]
    cap = capture_module(ctx, mlp, layers)
    assert len(cap.outputs) == 3
    cand = ss.candidates(cap.act.mean(), None, 10)
    all_batches = ss.module_losses(mlp, layers, cap, cand, SPEC3)
    per_batch = []
    for i in range(3):
        one = capture.ModuleCapture([cap.calls[i]], [cap.outputs[i]], cap.act)
        per_batch.append(ss.module_losses(mlp, layers, one, cand, SPEC3))
    torch.testing.assert_close(all_batches, sum(per_batch) / 3)  # equal-size batches
    assert not torch.equal(per_batch[0], all_batches)


def test_capture_in_sub_batches_records_the_same_data():
    """``awq_bs`` (and the default token budget) bound the capture forward's activations: each
    sub-batch is one recorded call, and the outputs, statistics and losses do not change."""
    _, ctx = block_ctx(n_batches=1, bs=4)
    attn = ctx.block.self_attn
    layers = [attn.q_proj, attn.k_proj, attn.v_proj]
    whole = capture.capture_block(ctx, [capture.Target("t", attn, layers)])
    split = capture.capture_block(ctx, [capture.Target("t", attn, layers)], awq_bs=1)
    assert len(whole.modules["t"].calls) == 1 and len(split.modules["t"].calls) == 4
    torch.testing.assert_close(whole.outputs[0], split.outputs[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(whole.modules["t"].act.mean(), split.modules["t"].act.mean())
    cand = ss.candidates(whole.modules["t"].act.mean(), None, 5)
    torch.testing.assert_close(ss.module_losses(attn, layers, split.modules["t"], cand, SPEC3), ss.module_losses(attn, layers, whole.modules["t"], cand, SPEC3))


def test_search_tokens_records_the_first_calls_and_keeps_all_statistics():
    """``search_tokens``: the inspect module's calls and outputs stop once they hold that many
    tokens (whole sub-batches), ``|x|`` still counts every token, and the loss equals the one
    over a capture of only those samples."""
    _, ctx = block_ctx(n_batches=1, bs=4)
    attn = ctx.block.self_attn
    layers = [attn.q_proj, attn.k_proj, attn.v_proj]
    per_sample = ctx.inputs[0].shape[1]
    full = capture.capture_block(ctx, [capture.Target("t", attn, layers)], awq_bs=1)
    part = capture.capture_block(ctx, [capture.Target("t", attn, layers)], awq_bs=1, search_tokens=2 * per_sample)
    m, f = part.modules["t"], full.modules["t"]
    assert len(m.calls) == len(m.outputs) == 2 and m.tokens == 2 * per_sample and len(f.calls) == 4
    assert m.act.count == f.act.count == 4 * per_sample
    torch.testing.assert_close(m.act.mean(), f.act.mean())
    torch.testing.assert_close(part.outputs[0], full.outputs[0])  # the block's outputs cover every sample
    cand = ss.candidates(f.act.mean(), None, 5)
    first_two = capture.ModuleCapture(f.calls[:2], f.outputs[:2], f.act)
    torch.testing.assert_close(ss.module_losses(attn, layers, m, cand, SPEC3), ss.module_losses(attn, layers, first_two, cand, SPEC3))
    assert not torch.allclose(ss.module_losses(attn, layers, m, cand, SPEC3), ss.module_losses(attn, layers, f, cand, SPEC3))


def test_coarse_to_fine_finds_the_minimum_of_every_unimodal_grid_in_nine_evaluations():
    """Every position of the minimum on a 20-point grid, and V shapes of both slopes: the search
    returns the grid's argmin, evaluating at most 9 points; on a non-unimodal loss it still
    returns the best point it evaluated."""
    for m in range(20):
        for left, right in ((1.0, 1.0), (0.2, 3.0), (3.0, 0.2)):
            calls = []

            def loss(i, m=m, left=left, right=right):
                calls.append(i)
                return (m - i) * left if i < m else (i - m) * right

            seen = ss.coarse_to_fine(20, loss)
            assert min(seen, key=seen.get) == m and len(calls) == len(set(calls)) <= 9
    bumpy = [5, 1, 5, 5, 5, 5, 5, 5, 0, 5]  # two valleys, one between coarse points
    seen = ss.coarse_to_fine(10, bumpy.__getitem__)
    assert seen[min(seen, key=seen.get)] == min(seen.values()) and all(bumpy[i] == v for i, v in seen.items())


def test_coarse_to_fine_module_losses_agree_with_the_grid_where_evaluated():
    _, ctx = block_ctx(n_batches=1, bs=4)
    attn = ctx.block.self_attn
    layers = [attn.q_proj, attn.k_proj, attn.v_proj]
    cap = capture_module(ctx, attn, layers)
    for w_mean in (None, ss.weight_mean(layers, SPEC3)):  # v2, and v1 with its identity candidate
        cand = ss.candidates(cap.act.mean(), w_mean, 20)
        grid = ss.module_losses(attn, layers, cap, cand, SPEC3)
        fast = ss.module_losses(attn, layers, cap, cand, SPEC3, search="coarse_to_fine")
        done = torch.isfinite(fast)
        assert int(done.sum()) <= 9 + (w_mean is not None) and bool(done[0]) and bool(done[-1]) == (w_mean is not None)
        torch.testing.assert_close(fast[done], grid[done])


def test_search_tokens_default_and_null():
    from llmc_plugins.methods.awq.method import SEARCH_TOKENS, AwqConfig

    assert AwqConfig().search_tokens == SEARCH_TOKENS == 16384
    assert AwqConfig(search_tokens=None).search_tokens is None
    assert AwqConfig().alpha_search == "grid" and AwqConfig(alpha_search="coarse_to_fine").alpha_search == "coarse_to_fine"
    with pytest.raises(ValueError):
        AwqConfig(alpha_search="golden")
    with pytest.raises(ValueError):
        AwqConfig(search_tokens=0)


def test_awq_bs_splits_batches_without_changing_the_loss():
    _, ctx = block_ctx(n_batches=1, bs=4)
    attn = ctx.block.self_attn
    layers = [attn.q_proj, attn.k_proj, attn.v_proj]
    cap = capture_module(ctx, attn, layers)
    cand = ss.candidates(cap.act.mean(), None, 5)
    torch.testing.assert_close(ss.module_losses(attn, layers, cap, cand, SPEC3, awq_bs=1), ss.module_losses(attn, layers, cap, cand, SPEC3))


def test_one_forward_capture_stays_valid_after_folding():
    """What the block's single capture forward recorded equals a fresh capture after a group's
    scales are folded: other groups' inputs are unchanged, the group's own Gram matrices are those
    of ``x / s`` (as the clip search rescales them), and so are the block outputs."""
    from llmc_plugins.methods.awq.clip import rescale_grams

    _, ctx = block_ctx()
    attn, mlp = ctx.block.self_attn, ctx.block.mlp
    qkv = capture.Target("qkv", attn, [attn.q_proj, attn.k_proj, attn.v_proj])
    gu = capture.Target("gate_up", mlp, [mlp.gate_proj, mlp.up_proj])
    clip_layers = {"self_attn.v_proj": (attn.v_proj, 32), "mlp.down_proj": (mlp.down_proj, 32)}
    before = capture.capture_block(ctx, [qkv, gu], clip_layers, clip_tokens=40)
    s = torch.rand(64, generator=torch.Generator().manual_seed(1)) + 0.5
    with torch.no_grad():
        ss.fold_scales(ctx.block.input_layernorm, qkv.layers, s)
    after = capture.capture_block(ctx, [gu], clip_layers, clip_tokens=40)
    for (a, _), (b, _) in zip(before.modules["gate_up"].calls, after.modules["gate_up"].calls):
        torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-6)
    for x, y in zip(before.outputs, after.outputs):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    g_before, n = before.clip_grams["self_attn.v_proj"]
    g_after, n_after = after.clip_grams["self_attn.v_proj"]
    assert n == n_after and 40 <= n <= 48
    torch.testing.assert_close(rescale_grams(g_before, s), g_after, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(before.clip_grams["mlp.down_proj"][0], after.clip_grams["mlp.down_proj"][0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("clip_version", ["v1", "v2"])
def test_awq_hands_the_runner_the_outputs_of_the_float_block(clip_version):
    """AWQ's block outputs (the next block's inputs) come from its capture forward; they are
    only handed over when the float block is unchanged, and then equal running it again."""
    _, ctx = block_ctx()
    m = method(weight_clip=True, clip_version=clip_version)
    m.check_model(ctx.adapter)
    with torch.no_grad():
        m.transform_block(ctx)
    kept = next(e for e in m.log if e["group"] == "clip")["kept"]
    if clip_version == "v1" and kept:
        assert ctx.outputs == []  # clamped float weights: the runner must run the block
        return
    assert len(ctx.outputs) == len(ctx.inputs)
    for a, b in zip(ctx.outputs, reference(ctx)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_clip_check_uses_the_first_samples_up_to_its_token_budget():
    _, ctx = block_ctx(n_batches=3, bs=2, seq=32)
    ref = reference(ctx)
    full = block_quant_loss(ctx, ref, SPEC3, {}, max_tokens=10**9)
    manual = block_quant_loss(ctx, ref, SPEC3, {}, max_tokens=3 * 32)  # batch 0 whole, one sample of batch 1
    with torch.no_grad():
        linears = ctx.adapter.quant_linears(ctx.block)
        originals = {n: lin.weight.data for n, lin in linears.items()}
        for lin in linears.values():
            lin.weight.data = fake_quantize(lin.weight.data, SPEC3)
        outs = [ctx.block(ctx.inputs[0], **ctx.kwargs[0]), ctx.block(ctx.inputs[1][:1], **{k: v[:1] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == 2 else v for k, v in ctx.kwargs[1].items()})]
        for n, lin in linears.items():
            lin.weight.data = originals[n]
    outs = [o[0] if isinstance(o, tuple) else o for o in outs]
    expected = (float((outs[0] - ref[0]).pow(2).sum()) + float((outs[1] - ref[1][:1]).pow(2).sum())) / (ref[0].numel() + ref[1][:1].numel())
    assert manual == pytest.approx(expected, rel=1e-5) and manual != pytest.approx(full, rel=1e-9)


# -- clipping ----------------------------------------------------------------------------------


def test_clip_skips_queries_and_keys():
    assert not clippable("self_attn.q_proj") and not clippable("self_attn.k_proj")
    assert all(clippable(n) for n in ("self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))


@pytest.mark.parametrize("clip_sym", [True, False])
def test_clip_search_never_increases_layer_error(clip_sym):
    torch.manual_seed(0)
    w = torch.randn(64, 96)
    w[:, 5] *= 8  # an outlier column makes clipping worth it
    x = torch.randn(200, 96)
    grams = torch.einsum("tgi,tgj->gij", x.view(200, 3, 32), x.view(200, 3, 32))
    rng, before, after = search_clip(w, grams, 200, SPEC3, clip_sym)
    assert (rng.shrink < 1).any()
    # every row and group got the best shrink of the grid (1, 0.95, ..., 0.55), found by brute force
    xg = x.view(200, 3, 32)

    def group_errors(wq):  # [rows, groups]: mean over tokens of the group's output error squared
        return ((xg.unsqueeze(1) * (wq - w).view(1, 64, 3, 32)).sum(-1) ** 2).mean(0)

    wg = w.view(64, 3, 32)
    per_f = []
    for f in [1 - i / 20 for i in range(10)]:
        if clip_sym:
            hi = wg.abs().amax(-1, keepdim=True) * f
            lo = -hi
        else:
            lo, hi = wg.amin(-1, keepdim=True) * f, wg.amax(-1, keepdim=True) * f
        per_f.append(group_errors(fake_quantize(torch.clamp(wg, lo, hi).view(64, 96), SPEC3)))
    best = torch.stack(per_f).amin(0)
    torch.testing.assert_close(group_errors(fake_quantize(rng.apply(w), SPEC3)), best, rtol=1e-4, atol=1e-7)
    # the error it reports is the real output error of each group
    def err(wq):
        return float(((x.view(200, 3, 32).unsqueeze(1) * (wq - w).view(1, 64, 3, 32)).sum(-1) ** 2).mean(0).sum())
    assert err(fake_quantize(w, SPEC3)) == pytest.approx(before, rel=1e-4)
    assert err(fake_quantize(rng.apply(w), SPEC3)) == pytest.approx(after, rel=1e-4)


@pytest.mark.parametrize("tokens, hurts", [(1, True), (512, False)])
def test_clip_check_keeps_clipping_only_when_the_block_gains(tokens, hurts):
    """On one token the per-group search overfits and clipping hurts the block; on 512 it helps.
    The check ends at the better of the two, measured on an unchecked copy of the same search."""
    _, ctx = block_ctx()
    _, unchecked = block_ctx()
    ref = reference(ctx)
    plain = block_quant_loss(ctx, ref, SPEC3, {})
    originals = {n: m.weight.detach().clone() for n, m in ctx.adapter.quant_linears(ctx.block).items()}
    m, m_off = method(trans=False, weight_clip=True, clip_tokens=tokens), method(trans=False, weight_clip=True, clip_tokens=tokens, clip_check=False)
    for meth, c in ((m, ctx), (m_off, unchecked)):
        meth.check_model(c.adapter)
        with torch.no_grad():
            meth.transform_block(c)
    clipped = block_quant_loss(unchecked, ref, SPEC3, {})  # clip v1 clamped the float weights
    assert (clipped > plain) == hurts  # the two cases are what they claim to be
    final = block_quant_loss(ctx, ref, SPEC3, {})
    assert final == pytest.approx(min(plain, clipped), rel=1e-6)
    entry = next(e for e in m.log if e["group"] == "clip")
    assert entry["kept"] is not hurts
    if hurts:  # dropped: the float weights are the unclipped ones
        for n, lin in ctx.adapter.quant_linears(ctx.block).items():
            assert torch.equal(lin.weight, originals[n]), n


def test_clip_v2_keeps_float_weights_and_quantizes_like_v1():
    _, ctx1 = block_ctx()
    _, ctx2 = block_ctx()
    before = reference(ctx2)
    m1, m2 = method(weight_clip=True, clip_check=False), method(weight_clip=True, clip_check=False, clip_version="v2")
    for m, ctx in ((m1, ctx1), (m2, ctx2)):
        m.check_model(ctx.adapter)
        with torch.no_grad():
            m.transform_block(ctx)
    for a, b in zip(before, reference(ctx2)):  # v2: float block unchanged by clipping
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    m1.quantize_block(ctx1)
    m2.quantize_block(ctx2)
    for (n, l1), l2 in zip(ctx1.adapter.quant_linears(ctx1.block).items(), ctx2.adapter.quant_linears(ctx2.block).values()):
        torch.testing.assert_close(l1.weight, l2.weight, rtol=0, atol=1e-5, msg=n)


def test_save_clip_writes_the_ranges_of_clipped_layers(tmp_path):
    from safetensors.torch import load_file

    _, ctx = block_ctx(index=1)
    m = method(weight_clip=True, save_clip=True, clip_path=str(tmp_path))
    m.check_model(ctx.adapter)
    with torch.no_grad():
        m.transform_block(ctx)
    assert not (tmp_path / "clips.pth").exists()  # written by finish(), once every block is done
    m.finish(overwrite=False)
    clips = load_file(tmp_path / "clips.pth")  # safetensors: nothing to unpickle
    assert "model.layers.1.mlp.down_proj.lo" in clips and not any("q_proj" in k or "k_proj" in k for k in clips)
    lo, hi = clips["model.layers.1.mlp.down_proj.lo"], clips["model.layers.1.mlp.down_proj.hi"]
    assert lo.shape == hi.shape == (64, 128 // 32, 1) and (lo <= hi).all()
    with pytest.raises(LlmcError, match="already exists"):
        m.finish(overwrite=False)


def test_awq_state_survives_a_round_trip_through_the_checkpoint_format(tmp_path):
    """What a resumed run gets back: the scales and deferred clip ranges, tensors without pickle."""
    from llmc_core.statefile import read_state, write_state

    _, ctx = block_ctx()
    m = method(weight_clip=True, clip_version="v2", save_scale=True, scale_path=str(tmp_path))
    m.check_model(ctx.adapter)
    with torch.no_grad():
        m.transform_block(ctx)
    assert m.scales and m.clips
    write_state(tmp_path / "m.safetensors", m.state_dict())
    back = method(weight_clip=True, clip_version="v2", save_scale=True, scale_path=str(tmp_path))
    back.load_state_dict(read_state(tmp_path / "m.safetensors"))
    assert back.scales.keys() == m.scales.keys() and all(back.scales[k].equal(m.scales[k]) for k in m.scales)
    assert back.clips.keys() == m.clips.keys()
    for k, r in m.clips.items():
        assert back.clips[k].lo.equal(r.lo) and back.clips[k].hi.equal(r.hi) and back.clips[k].shrink.equal(r.shrink)


@pytest.mark.parametrize("key, special", [("scale_path", {"save_scale": True}), ("clip_path", {"save_clip": True, "weight_clip": True})])
def test_existing_scale_or_clip_file_is_refused_before_the_model_loads(key, special, tiny_model_dir, tiny_text_file, tmp_path, monkeypatch):
    folder = tmp_path / "files"
    folder.mkdir()
    name = "scales.pth" if key == "scale_path" else "clips.pth"
    (folder / name).write_bytes(b"someone's earlier result")
    cfg = run_config(tiny_model_dir, tiny_text_file, tmp_path / "out", method="Awq", special={**special, key: str(folder)})

    def no_load(self, *args, **kwargs):
        raise AssertionError("the model was loaded before the check")

    monkeypatch.setattr(Run, "load_model", no_load)
    res = run_cli("run", str(write_config(tmp_path / "cfg.yml", cfg)))
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("llmc:")]
    assert res.exit_code == 2 and len(errors) == 1 and f"quant.special.{key}" in errors[0] and name in errors[0], res.stderr
    assert (folder / name).read_bytes() == b"someone's earlier result"
    cfg["save"]["overwrite"] = True
    assert config.validate(cfg).special.save_scale == special.get("save_scale", False)  # save.overwrite: true lets it through


# -- config ------------------------------------------------------------------------------------


def test_seed_config_special_validates():
    cfg = AwqConfig.model_validate({"trans": True, "trans_version": "v2", "weight_clip": True, "clip_sym": True})
    assert cfg.weight_clip and cfg.clip_sym and cfg.n_grid == 20


@pytest.mark.parametrize(
    "special, message",
    [
        ({"trans_version": "v3"}, "quant.special.trans_version"),
        ({"clip_version": "v9"}, "quant.special.clip_version"),
        ({"awq_bs": 0}, "quant.special.awq_bs"),
        ({"weight_clp": True}, "unknown key"),
        ({"do_gqa_trans": True}, "'do_gqa_trans' is not supported"),
        ({"true_sequential": True}, "'true_sequential' is not supported"),
        ({"save_scale": True}, "save_scale: true needs scale_path"),
        ({"save_clip": True, "clip_path": "/tmp/x", "weight_clip": False}, "needs weight_clip: true"),
        ({"save_clip": True, "weight_clip": True}, "needs clip_path"),
    ],
)
def test_bad_special_keys_are_clear_errors(special, message, tiny_model_dir, tiny_text_file, tmp_path):
    cfg = run_config(tiny_model_dir, tiny_text_file, tmp_path / "out", method="Awq", special=special)
    with pytest.raises(LlmcError) as exc:
        config.validate(cfg)
    text = "\n".join(exc.value.problems)
    assert message in text and "quant.special" in text


# -- end to end --------------------------------------------------------------------------------


def test_end_to_end_tiny_run_via_cli(tiny_model_dir, tiny_text_file, tmp_path, caplog):
    out = tmp_path / "out"
    special = {"trans": True, "trans_version": "v2", "weight_clip": False, "save_scale": True, "scale_path": str(tmp_path / "scales")}
    cfg = run_config(tiny_model_dir, tiny_text_file, out, method="Awq", bit=3, special=special)
    cfg["eval"].update(eval_pos=["pretrain", "transformed", "fake_quant"], num_samples=8)
    path = write_config(tmp_path / "awq.yml", cfg)
    with caplog.at_level(logging.INFO, logger="llmc.awq"):
        result = run_cli("run", str(path))
    assert result.exit_code == 0, result.stderr
    res = read_results(out)
    pre = res[("pretrain", "ppl", "custom", "perplexity")]
    assert res[("transformed", "ppl", "custom", "perplexity")] == pytest.approx(pre, abs=0.01)
    assert res[("fake_quant", "ppl", "custom", "perplexity")] > 0
    assert "alpha=" in caplog.text and "o: skipped" in caplog.text  # the tiny model uses GQA
    from safetensors.torch import load_file

    scales = load_file(tmp_path / "scales" / "scales.pth")
    assert "model.layers.1.mlp.down_proj" in scales and "model.layers.0.self_attn.o_proj" not in scales


def test_shipped_configs_validate(monkeypatch, tmp_path, shared_data, smollm2_path):
    monkeypatch.setenv("LLMC_OUT", str(tmp_path))
    monkeypatch.setenv("LLMC_DATA", str(shared_data))
    assert config.load("configs/quickstart/awq_w4g64_smollm2.yml").method is Awq
    monkeypatch.setenv("LLMC_MODEL", str(smollm2_path))
    monkeypatch.setenv("LLMC_CALIB", str(shared_data / "c4" / "c4-train.00000-of-01024.first1000.jsonl"))
    cfg = config.load("configs/quantization/awq_w4a16g128.yml", ["model.type=SmolLM2"])
    assert cfg.special.weight_clip and cfg.special.clip_sym and cfg.weight.group_size == 128


@pytest.mark.slow
def test_smollm2_awq_beats_rtn(smollm2_hf, shared_data, tmp_path):
    """Real model, 2 calibration samples of 256 tokens, 1 WikiText-2 window: transformed equals
    pretrain, and AWQ's fake_quant perplexity is below RTN's on the same window."""
    common = [f"model.path={smollm2_hf}", f"eval.path={shared_data / 'wikitext2' / 'wiki.test.raw'}", "eval.num_samples=1"]
    awq = config.load(
        "configs/quickstart/awq_w4g64_smollm2.yml",
        [*common, f"save.save_path={tmp_path / 'awq'}", f"calib.path={shared_data / 'c4' / 'c4-train.00000-of-01024.first1000.jsonl'}", "calib.n_samples=2", "calib.seq_len=256", "quant.weight.bit=3", "quant.special.weight_clip=true", "quant.special.clip_version=v2"],
    )
    res = {r.position: r.value for r in Run(awq).execute()}
    assert res["transformed"] == pytest.approx(res["pretrain"], abs=0.01)
    rtn = config.load("configs/quickstart/rtn_w4g64_smollm2.yml", [*common, f"save.save_path={tmp_path / 'rtn'}", "quant.weight.bit=3", "eval.eval_pos=[fake_quant]"])
    rtn_ppl = {r.position: r.value for r in Run(rtn).execute()}["fake_quant"]
    assert res["fake_quant"] < rtn_ppl
