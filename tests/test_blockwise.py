"""Block-wise execution reproduces the full forward pass, with one block at a time on the device."""

from __future__ import annotations

import torch

from llmc_core.blockwise import capture_block_inputs, run_blocks
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


def test_capture_restores_the_model():
    model = tiny_llama(layers=2)
    adapter = LlamaAdapter(model)
    first = model.model.layers[0]
    capture_block_inputs(model, adapter, [torch.randint(4, 100, (1, 8))], torch.device("cpu"))
    assert model.model.layers[0] is first
