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
