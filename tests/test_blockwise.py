"""Block-wise execution reproduces the full forward pass, with one block at a time on the device."""

from __future__ import annotations

import pytest
import torch

from llmc_core.blockwise import capture_block_inputs, join_parts, run_blocks
from llmc_core.errors import LlmcError
from llmc_core.testing import tiny_llama
from llmc_plugins.models.families import LlamaAdapter


def test_blockwise_forward_equals_full_forward():
    model = tiny_llama(layers=3)
    adapter = LlamaAdapter(model)
    ids = torch.randint(4, 100, (2, 24))
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    inputs, kwargs = capture_block_inputs(model, adapter, [ids[:1], ids[1:]], torch.device("cpu"))
    assert len(inputs) == 2 and inputs[0].shape == (1, 24, 64)
    outs = run_blocks(adapter, inputs, kwargs, torch.device("cpu"))
    with torch.no_grad():
        logits = model.lm_head(model.model.norm(torch.cat(outs)))
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)


def test_blocks_visit_in_order_and_work_sees_inputs():
    model = tiny_llama(layers=2)
    adapter = LlamaAdapter(model)
    ids = torch.randint(4, 100, (1, 16))
    inputs, kwargs = capture_block_inputs(model, adapter, [ids], torch.device("cpu"))
    seen = []
    run_blocks(adapter, inputs, kwargs, torch.device("cpu"), work=lambda ctx: seen.append((ctx.index, ctx.prefix, ctx.inputs[0].shape)))
    assert seen == [(0, "model.layers.0", (1, 16, 64)), (1, "model.layers.1", (1, 16, 64))]
    assert inputs == []  # consumed: the caller's list no longer keeps block 0's inputs alive


def test_capture_restores_the_model():
    model = tiny_llama(layers=2)
    adapter = LlamaAdapter(model)
    first = model.model.layers[0]
    capture_block_inputs(model, adapter, [torch.randint(4, 100, (1, 8))], torch.device("cpu"))
    assert model.model.layers[0] is first


def test_blocks_of_another_attention_type_get_their_own_keyword_inputs():
    """Gemma 3's global layers get other rotary embeddings and masks than its local ones: reusing
    block 0's keyword inputs for every block would change the model's output."""
    from llmc_core.testing import tiny_model
    from llmc_plugins.models.families import Gemma3Text

    model = tiny_model("gemma3_text", layers=3, layer_types=["sliding_attention", "full_attention", "sliding_attention"], sliding_window=8)
    adapter = Gemma3Text().adapter(model)
    ids = torch.randint(4, 100, (2, 24))
    with torch.no_grad():
        reference = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    inputs, kwargs = capture_block_inputs(model, adapter, [ids], torch.device("cpu"))
    assert list(kwargs.by_block) == [1]  # block 2 is local like block 0: same objects, not stored again
    outs = run_blocks(adapter, inputs, kwargs, torch.device("cpu"))
    with torch.no_grad():
        torch.testing.assert_close(model.model.norm(outs[0]), reference, rtol=1e-5, atol=1e-5)


def test_block_context_holds_the_blocks_real_inputs():
    """``llmc_core.testing.block_context``: block 1's context, with the hidden states that reach it in
    the full model, ready for a method's transform_block / quantize_block."""
    from llmc_core.api import Method
    from llmc_core.quant import QuantSpec
    from llmc_core.testing import block_context

    model = tiny_llama(layers=3)
    ctx = block_context(model, index=1, n_samples=2, seq_len=16)
    assert (ctx.index, ctx.prefix, ctx.block) == (1, "model.layers.1", model.model.layers[1])
    assert len(ctx.inputs) == len(ctx.kwargs) == 1 and ctx.inputs[0].shape == (2, 16, 64)
    ids = torch.randint(3, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(ctx.inputs[0], hidden[1])  # block 0's output
    torch.testing.assert_close(ctx.forward()[0], hidden[2])

    quantized = Method(None, QuantSpec(bit=4, group_size=32)).quantize_block(ctx)  # the default: RTN
    assert sorted(quantized) == sorted(f"model.layers.1.{n}" for n in ctx.adapter.quant_linears(ctx.block))
    q = quantized["model.layers.1.mlp.down_proj"]
    assert q.codes.shape == (64, 128) and q.scales.shape == q.zeros.shape == (64, 128 // 32)
    torch.testing.assert_close(model.model.layers[1].mlp.down_proj.weight, q.dequantize())


def test_a_large_batch_is_forwarded_in_slices_with_the_same_outputs(monkeypatch):
    """``calib.bs: -1`` puts every sample in one batch: the block sees at most FORWARD_TOKENS
    tokens per call (whole samples), and the outputs equal one call on the whole batch."""
    from llmc_core import blockwise
    from llmc_core.testing import block_context

    model = tiny_llama(layers=2)
    ctx = block_context(model, index=1, n_samples=5, seq_len=16)
    whole = ctx.forward()[0]
    calls = []
    handle = ctx.block.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    monkeypatch.setattr(blockwise, "FORWARD_TOKENS", 32)  # two samples of 16 tokens per call
    sliced = ctx.forward()[0]
    handle.remove()
    assert calls == [2, 2, 1]
    torch.testing.assert_close(sliced, whole, rtol=1e-5, atol=1e-6)


def test_split_call_cuts_per_sample_tensors_only():
    """A batch of as many samples as tokens: the per-sample mask is cut, the per-position
    ``cache_position`` (1-D) and the shared position embeddings (``[1, seq, d]``) are not."""
    from llmc_core.blockwise import split_call

    n = seq = 4
    h = torch.randn(n, seq, 8)
    kw = {"attention_mask": torch.zeros(n, 1, seq, seq), "cache_position": torch.arange(seq), "position_embeddings": (torch.ones(1, seq, 2), torch.ones(1, seq, 2))}
    calls = list(split_call((h,), kw, max_tokens=2 * seq))
    assert [a[0].shape[0] for a, _ in calls] == [2, 2]
    for (part,), part_kw in calls:
        assert part_kw["attention_mask"].shape[0] == 2
        assert part_kw["cache_position"].shape == (seq,)
        assert part_kw["position_embeddings"][0].shape == (1, seq, 2)
    torch.testing.assert_close(torch.cat([a[0] for a, _ in calls]), h)
    assert [a[0].shape[0] for a, _ in split_call((h,), kw, size=3)] == [3, 1]
    assert len(list(split_call((h,), kw))) == 1  # 16 tokens fit FORWARD_TOKENS: the call stays whole


def test_join_parts_writes_the_slices_in_order_into_one_batch():
    x = torch.randn(8, 3, 4)
    parts = [x[0:3].clone(), x[3:6].clone(), x[6:8].clone()]
    assert torch.equal(join_parts(8, iter(parts)), x)
    whole = x.clone()
    assert join_parts(8, iter([whole])) is whole  # one call: no copy
    with pytest.raises(LlmcError, match="6 of its 8 samples"):
        join_parts(8, iter(parts[:2]))
