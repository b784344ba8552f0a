"""AWQ GEMM export: packing, the saved folder, QuantLinear, the real_quant position, reloading."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from llmc_core import config
from llmc_core.errors import LlmcError
from llmc_core.quant import QuantSpec, quantize_weight
from llmc_core.quant.pack import AWQ_ORDER, dequantize_awq, pack_awq, pack_int4, unpack_awq, unpack_int4
from llmc_core.quant.qlinear import QuantLinear, quant_linears
from llmc_core.run import Run
from llmc_core.testing import run_config, tiny_llama


def independent_dequant(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """AutoAWQ's GEMM layout read back nibble by nibble, with none of llmc's code: ``[out, in]``.

    Output ``8j + c`` of a packed int32 sits in bits ``4i..4i+3`` where ``[0,2,4,6,1,3,5,7][i] == c``.
    """
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    k, words = qweight.shape
    n = words * 8
    g = k // qzeros.shape[0]
    bits = qweight.to(torch.int64) & 0xFFFFFFFF
    zbits = qzeros.to(torch.int64) & 0xFFFFFFFF
    codes = torch.empty(k, n, dtype=torch.int64)
    zeros = torch.empty(qzeros.shape[0], n, dtype=torch.int64)
    for i, c in enumerate(order):
        codes[:, c::8] = (bits >> (4 * i)) & 0xF
        zeros[:, c::8] = (zbits >> (4 * i)) & 0xF
    w = torch.empty(k, n, dtype=torch.float32)
    for gi in range(qzeros.shape[0]):
        rows = slice(gi * g, (gi + 1) * g)
        w[rows] = (codes[rows] - zeros[gi]).float() * scales[gi].float()
    return w.t()


def autoawq_pack_loop(intweight_kn: torch.Tensor) -> torch.Tensor:
    """AutoAWQ ``WQLinear_GEMM.from_linear``'s packing loop, restated (int32, column by column)."""
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    rows, cols = intweight_kn.shape
    out = torch.zeros(rows, cols // 8, dtype=torch.int32)
    for col in range(cols // 8):
        for i in range(8):
            out[:, col] |= intweight_kn[:, col * 8 + order[i]].to(torch.int32) << (i * 4)
    return out


# -- packing ---------------------------------------------------------------------------------------


def test_pack_bit_layout_is_awq_order():
    row = torch.arange(1, 9).reshape(1, 8)  # column c holds c + 1
    packed = pack_int4(row)
    # nibbles from bit 0 up: columns 0,2,4,6,1,3,5,7 -> values 1,3,5,7,2,4,6,8 -> 0x86427531
    assert packed.dtype == torch.int32 and packed.item() == 0x86427531 - 2**32
    assert AWQ_ORDER == (0, 2, 4, 6, 1, 3, 5, 7)


def test_pack_unpack_round_trip_and_matches_autoawq_loop():
    g = torch.Generator().manual_seed(0)
    values = torch.randint(0, 16, (24, 64), generator=g)
    packed = pack_int4(values)
    assert packed.shape == (24, 8)
    assert torch.equal(packed, autoawq_pack_loop(values))
    assert torch.equal(unpack_int4(packed).long(), values)
    with pytest.raises(ValueError):
        pack_int4(torch.full((1, 8), 16))


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_packed_weight_dequantizes_to_fake_quant(symmetric, group):
    torch.manual_seed(group)
    w = torch.randn(48, 256)
    spec = QuantSpec(bit=4, symmetric=symmetric, group_size=group, scale_dtype="float16")
    qw = quantize_weight(w, spec)
    t = pack_awq(qw)
    assert (t.qweight.shape, t.qzeros.shape, t.scales.shape) == ((256, 6), (256 // group, 6), (256 // group, 48))
    assert t.qweight.dtype == t.qzeros.dtype == torch.int32 and t.scales.dtype == torch.float16
    fake = qw.dequantize()
    assert torch.equal(independent_dequant(t.qweight, t.qzeros, t.scales), fake)
    assert torch.equal(dequantize_awq(t.qweight, t.qzeros, t.scales, group), fake)
    codes, zeros, _ = unpack_awq(t)
    assert torch.equal(codes.long() - (8 if symmetric else 0), qw.codes.long())
    if symmetric:
        assert (zeros == 8).all()


def test_fp16_scale_dtype_makes_scales_exact_and_fp32_rounds_slightly():
    torch.manual_seed(1)
    w = torch.randn(16, 128)
    exact = quantize_weight(w, QuantSpec(bit=4, group_size=64, scale_dtype="float16"))
    assert torch.equal(exact.scales.half().float(), exact.scales)
    loose = quantize_weight(w, QuantSpec(bit=4, group_size=64))
    t = pack_awq(loose)
    diff = (dequantize_awq(t.qweight, t.qzeros, t.scales, 64) - loose.dequantize()).abs().max()
    assert 0 < diff <= 1e-3 * loose.dequantize().abs().max()


def test_pack_refuses_what_the_format_cannot_hold():
    w = torch.randn(16, 64)
    with pytest.raises(LlmcError, match="4-bit"):
        pack_awq(quantize_weight(w, QuantSpec(bit=3, group_size=32)))
    with pytest.raises(LlmcError, match="per-group"):
        pack_awq(quantize_weight(w, QuantSpec(bit=4, granularity="per_channel")))
    with pytest.raises(LlmcError, match="divisible by 8"):
        pack_awq(quantize_weight(torch.randn(12, 64), QuantSpec(bit=4, group_size=32)))


# -- QuantLinear -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quant_linear_forward_equals_fake_quant_linear(dtype):
    torch.manual_seed(2)
    lin = torch.nn.Linear(128, 40, bias=True).to(dtype)
    qw = quantize_weight(lin.weight, QuantSpec(bit=4, group_size=32, scale_dtype="float16"))
    q = QuantLinear.from_quantized(qw, lin.bias)
    lin.weight.data.copy_(qw.dequantize(dtype))
    x = torch.randn(3, 5, 128, dtype=dtype)
    assert torch.equal(q(x), lin(x))
    assert q(x).shape == (3, 5, 40) and "group_size=32" in repr(q)
    assert set(q.state_dict()) == {"qweight", "qzeros", "scales", "bias"}


def test_quant_linears_swaps_and_restores():
    model = tiny_llama()
    spec = QuantSpec(bit=4, group_size=32, scale_dtype="float16")
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    quantized = {}
    for n in names:
        lin = model.get_submodule(n)
        quantized[n] = quantize_weight(lin.weight, spec)
        lin.weight.data.copy_(quantized[n].dequantize())
    originals = {n: model.get_submodule(n) for n in names}
    ids = torch.randint(0, 128, (1, 16))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        with quant_linears(model, quantized):
            assert all(isinstance(model.get_submodule(n), QuantLinear) for n in names)
            real = model(input_ids=ids).logits
    assert torch.equal(real, ref)
    assert all(model.get_submodule(n) is originals[n] for n in names)
    with pytest.raises(LlmcError, match="not found"):
        with quant_linears(model, {"model.nope": quantized[names[0]]}):
            pass


# -- the saver, real_quant, reload ---------------------------------------------------------------


def _cfg(model_dir, data, out, scale_dtype="float16", **weight):
    cfg = run_config(model_dir, data, out, eval_pos=("fake_quant", "real_quant"), save={"save_path": str(out), "save_fake": True, "save_awq": True})
    cfg["quant"]["weight"].update(scale_dtype=scale_dtype, **weight)
    cfg["eval"]["num_samples"] = 6  # a few windows keep the two evaluations quick
    return cfg


def test_export_end_to_end_dequantizes_to_save_fake(tiny_model_dir, tiny_text_file, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmc_plugins.savers.awq_format import load_awq_folder

    out = tmp_path / "out"
    run = Run(config.validate(_cfg(tiny_model_dir, tiny_text_file, out)))
    records = {r.position: r.value for r in run.execute()}
    assert records["real_quant"] == pytest.approx(records["fake_quant"], rel=1e-3)
    assert all(type(m) is not QuantLinear for m in run.model.modules())  # the float model is back

    awq, fake = out / "awq_model", out / "fake_quant_model"
    qcfg = json.loads((awq / "config.json").read_text())["quantization_config"]
    assert qcfg == {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm", "modules_to_not_convert": ["lm_head"]}
    assert (awq / "tokenizer.json").is_file() and AutoTokenizer.from_pretrained(awq).vocab_size == 128
    packed, floats = load_file(awq / "model.safetensors"), load_file(fake / "model.safetensors")
    layers = sorted(k[: -len(".qweight")] for k in packed if k.endswith(".qweight"))
    assert layers == sorted(run.quantized) and len(layers) == 14
    for name in layers:
        w = independent_dequant(packed[f"{name}.qweight"], packed[f"{name}.qzeros"], packed[f"{name}.scales"])
        assert torch.equal(w, floats[f"{name}.weight"]), name
        assert packed[f"{name}.scales"].dtype == torch.float16
    others = {k for k in packed if not k.endswith((".qweight", ".qzeros", ".scales"))}
    assert others == {k for k in floats if k.rsplit(".", 1)[0] not in layers}
    assert all(torch.equal(packed[k], floats[k]) for k in others)

    # llmc's own loader: QuantLinear layers, same logits as the fake-quantized model
    model = load_awq_folder(awq)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 14
    ref = AutoModelForCausalLM.from_pretrained(fake, dtype=torch.float32).eval()
    ids = torch.randint(0, 128, (2, 24))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref(input_ids=ids).logits)


def test_float32_scales_export_with_a_warning_and_real_quant_stays_close(tiny_model_dir, tiny_text_file, tmp_path, caplog):
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="llmc"):
        records = {r.position: r.value for r in Run(config.validate(_cfg(tiny_model_dir, tiny_text_file, out, scale_dtype="float32", symmetric=True))).execute()}
    assert "scale_dtype: float16" in caplog.text
    assert records["real_quant"] == pytest.approx(records["fake_quant"], rel=1e-3)
    assert (out / "awq_model" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    ("weight", "expected"),
    [({"bit": 3}, "4-bit weights only"), ({"granularity": "per_channel", "group_size": None}, "per-group scales only"), ({"granularity": "per_tensor", "group_size": None}, "per-group scales only")],
)
def test_unsupported_specs_are_refused_before_loading(tiny_model_dir, tiny_text_file, tmp_path, weight, expected):
    cfg = _cfg(tiny_model_dir, tiny_text_file, tmp_path / "out", **weight)
    with pytest.raises(LlmcError) as err:
        config.validate(cfg)
    lines = err.value.problems
    assert any(line.startswith("save.save_awq:") and expected in line and "save_fake" in line for line in lines), lines
    assert any(line.startswith("eval.eval_pos: real_quant:") and expected in line for line in lines), lines


def test_transformers_loads_the_folder_with_gptqmodel(tiny_model_dir, tiny_text_file, tmp_path):
    """transformers reads AWQ folders only through gptqmodel (and accelerate); skipped without them."""
    pytest.importorskip("gptqmodel")
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    Run(config.validate(_cfg(tiny_model_dir, tiny_text_file, out))).execute()
    model = AutoModelForCausalLM.from_pretrained(out / "awq_model").eval()
    ref = AutoModelForCausalLM.from_pretrained(out / "fake_quant_model", dtype=model.dtype).eval()
    ids = torch.randint(0, 128, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits.float(), ref(input_ids=ids).logits.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.slow
def test_smollm2_awq_export_real_quant_matches_fake_quant(smollm2_hf, shared_data, tmp_path):
    """SmolLM2-135M, RTN w4 g64 with float16 scales, one 2048-token window: the folder dequantizes
    to the save_fake weights and real_quant PPL equals fake_quant PPL within 0.1%."""
    from safetensors.torch import load_file

    out = tmp_path / "out"
    cfg = {
        "model": {"type": "SmolLM2", "path": str(smollm2_hf), "torch_dtype": "float32"},
        "eval": {"eval_pos": ["fake_quant", "real_quant"], "name": "wikitext2", "path": str(shared_data / "wikitext2" / "wiki.test.raw"), "seq_len": 2048, "num_samples": 1},
        "quant": {"method": "RTN", "weight": {"bit": 4, "symmetric": False, "granularity": "per_group", "group_size": 64, "scale_dtype": "float16"}},
        "save": {"save_path": str(out), "save_fake": True, "save_awq": True},
    }
    records = {r.position: r.value for r in Run(config.validate(cfg)).execute()}
    assert abs(records["real_quant"] / records["fake_quant"] - 1) < 1e-3
    packed, floats = load_file(out / "awq_model" / "model.safetensors"), load_file(out / "fake_quant_model" / "model.safetensors")
    name = "model.layers.7.mlp.down_proj"
    w = independent_dequant(packed[f"{name}.qweight"], packed[f"{name}.qzeros"], packed[f"{name}.scales"])
    assert torch.equal(w, floats[f"{name}.weight"])
