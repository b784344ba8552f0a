"""AWQ's use of the machine: what ``search_dtype: auto`` picks, and the scale search's memory not
growing with the grid (candidates quantized a chunk at a time, results unchanged)."""

from __future__ import annotations

import logging

import pytest
import torch

from llmc_core.blockwise import BlockContext, capture_block_inputs
from llmc_core.quant import QuantSpec
from llmc_core.testing import tiny_llama
from llmc_plugins.methods.awq import Awq, precision
from llmc_plugins.methods.awq import scale_search as ss
from llmc_plugins.methods.awq.method import AwqConfig
from llmc_plugins.models.families import LlamaAdapter

SPEC = QuantSpec(bit=3, symmetric=False, granularity="per_group", group_size=32)

# -- search_dtype: auto ----------------------------------------------------------------------------

AVX2_ONLY = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"
SAPPHIRE = "processor\t: 0\nflags\t\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"


def test_cpu_flags_are_read_from_cpuinfo():
    assert precision.cpu_bf16_flags(AVX2_ONLY) == set()
    assert precision.cpu_bf16_flags(SAPPHIRE) == {"avx512_bf16", "amx_bf16"}
    assert precision.cpu_bf16_flags("Features\t: fp asimd bf16\n") == set()  # ARM: no x86 flag names


@pytest.mark.parametrize("cpuinfo,expected", [(AVX2_ONLY, torch.float32), (SAPPHIRE, torch.bfloat16)])
def test_auto_picks_bf16_only_where_the_cpu_has_it(cpuinfo, expected, monkeypatch, caplog):
    real = precision.cpu_bf16_flags
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: real(cpuinfo))
    precision.fast_bf16.cache_clear()
    precision._log_once.cache_clear()
    try:
        with caplog.at_level(logging.INFO, logger="llmc.precision"):
            assert precision.auto_search_dtype(torch.float32, "cpu") == expected
            assert precision.auto_search_dtype(torch.float32, "cpu") == expected
        assert caplog.text.count("search_dtype auto:") == 1  # logged once per run
        assert ("CPU without avx512_bf16/amx_bf16" in caplog.text) == (expected == torch.float32)
    finally:
        precision.fast_bf16.cache_clear()
        precision._log_once.cache_clear()


def test_half_precision_models_search_in_their_own_dtype():
    assert precision.auto_search_dtype(torch.float16, "cpu") == torch.float16
    assert precision.auto_search_dtype(torch.bfloat16, "cpu") == torch.bfloat16


def test_without_cpuinfo_a_timed_matmul_decides(monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: None)
    times = {torch.float32: 1.0, torch.bfloat16: 44.0}
    monkeypatch.setattr(precision, "_matmul_seconds", lambda dtype: times[dtype])
    precision.fast_bf16.cache_clear()
    try:
        ok, why = precision.fast_bf16("cpu", None)
        assert not ok and "timed" in why
        times[torch.bfloat16] = 0.5
        precision.fast_bf16.cache_clear()
        assert precision.fast_bf16("cpu", None)[0]
    finally:
        precision.fast_bf16.cache_clear()


def test_awq_auto_uses_the_detection(monkeypatch):
    monkeypatch.setattr(precision, "auto_search_dtype", lambda dtype, device: torch.float16)
    layer = torch.nn.Linear(4, 4)
    assert Awq(AwqConfig(), SPEC)._search_dtype(layer) == torch.float16
    assert Awq(AwqConfig(search_dtype="bfloat16"), SPEC)._search_dtype(layer) == torch.bfloat16


# -- the scale search's memory -----------------------------------------------------------------------


def big_block_ctx(hidden=256, intermediate=1024):
    """A block whose layers are large next to the tiny model's: down_proj is 256 x 1024."""
    model = tiny_llama(hidden=hidden, intermediate=intermediate, heads=4, kv_heads=4, layers=1)
    adapter = LlamaAdapter(model)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(4, 128, (2, 32), generator=gen) for _ in range(2)]
    inputs, kwargs = capture_block_inputs(model, adapter, batches, torch.device("cpu"))
    return BlockContext(0, adapter.blocks()[0], adapter.block_prefix(0), adapter, inputs, kwargs, torch.device("cpu"))


def search(monkeypatch, n_grid, chunk_bytes):
    """Run AWQ's scale search on the big block; return the folded weights and the largest tensor
    (in elements) the grid quantization built in one call."""
    largest = [0]
    real = ss.quantized_weights

    def recording(w, scales, spec):
        out = real(w, scales, spec)
        largest[0] = max(largest[0], out.numel())
        return out

    monkeypatch.setattr(ss, "quantized_weights", recording)
    monkeypatch.setattr(ss, "GRID_CHUNK_BYTES", chunk_bytes)
    ctx = big_block_ctx()
    Awq(AwqConfig(n_grid=n_grid, search_dtype="float32"), SPEC).transform_block(ctx)
    return {k: v.clone() for k, v in ctx.block.state_dict().items()}, largest[0]


def test_grid_memory_is_one_candidate_and_results_are_unchanged(monkeypatch):
    one_down_proj = 256 * 1024
    chunked, peak = search(monkeypatch, n_grid=20, chunk_bytes=1)
    assert peak == one_down_proj  # never more than one candidate of the largest layer at once
    _, peak40 = search(monkeypatch, n_grid=40, chunk_bytes=1)
    assert peak40 == peak  # does not grow with the grid
    whole, peak_whole = search(monkeypatch, n_grid=20, chunk_bytes=2**40)
    assert peak_whole == 4 * one_down_proj  # the default batches a few candidates, never the grid
    assert all(torch.equal(chunked[k], whole[k]) for k in whole)


def test_grid_chunk_is_bounded_by_bytes():
    w = torch.empty(8192, 28672, device="meta")  # a 70B down_proj: 0.94 GB per candidate
    assert ss.grid_chunk(w, 4) == 1
    assert ss.grid_chunk(torch.empty(64, 64, device="meta"), 4) == 4
