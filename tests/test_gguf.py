"""``save_gguf``: llmc's codes and scales in GGUF's block types, read back by readers llmc did not
write (the ``gguf`` package's dequantizer, transformers' GGUF loader)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmc_core.testing import read_results, run_cli, run_config, save_tiny_model, write_config

gguf = pytest.importorskip("gguf")

from llmc_plugins.savers.gguf_format import TYPES, pack_blocks, permute_rows  # noqa: E402

SPECS = {t: {"bit": b, "symmetric": s, "granularity": "per_group", "group_size": 32} for t, (b, s) in TYPES.items()}


def _grid_codes(qtype: str, rows: int = 6, cols: int = 64, seed: int = 0):
    """Random codes over the whole range, float16 scales (signed for symmetric types) and
    (asymmetric types) float16 mins."""
    bits, sym = TYPES[qtype]
    g = torch.Generator().manual_seed(seed)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if sym else (0, 2**bits - 1)
    codes = torch.randint(lo, hi + 1, (rows, cols), generator=g).to(torch.int8 if sym else torch.uint8)
    scales = (torch.rand(rows, cols // 32, generator=g) - 0.5).mul(0.2).half().float()
    mins = torch.zeros_like(scales) if sym else torch.randn(scales.shape, generator=g).half().float()
    return codes, scales if sym else scales.abs(), mins


@pytest.mark.parametrize("qtype", list(TYPES))
def test_blocks_dequantize_to_llmc_values_with_the_gguf_package(qtype):
    codes, scales, mins = _grid_codes(qtype)
    blocks = pack_blocks(codes.numpy(), scales.numpy(), mins.numpy(), qtype)
    assert blocks.shape == (6, 2 * gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]][1])
    back = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[qtype])
    want = codes.float() * scales.repeat_interleave(32, 1) + mins.repeat_interleave(32, 1)
    np.testing.assert_array_equal(back, want.numpy())


def test_permutation_regroups_rope_halves_into_pairs():
    # one head of dimension 4: HF rows [x0, x1, y0, y1] (halves) -> llama.cpp [x0, y0, x1, y1] (pairs)
    t = np.arange(8).reshape(8, 1)
    got = permute_rows(t, heads=2)[:, 0].tolist()
    assert got == [0, 2, 1, 3, 4, 6, 5, 7]


def _run(tmp_path, model_type, qtype, method="rtn", special=None, **extra):
    model_dir = save_tiny_model(tmp_path / f"m_{model_type}", model_type)
    data = tmp_path / "corpus.txt"
    if not data.exists():
        from llmc_core.testing import write_corpus

        write_corpus(data)
    spec = SPECS[qtype]
    cfg = run_config(model_dir, data, tmp_path / f"out_{model_type}_{qtype}_{method}", method=method, bit=spec["bit"], symmetric=spec["symmetric"], eval_pos=("fake_quant",), special=special, **extra)
    cfg["model"]["type"] = "auto"
    cfg["save"].update(save_gguf=True, save_fake=True)
    result = run_cli("run", str(write_config(tmp_path / f"{model_type}_{qtype}_{method}.yml", cfg)))
    assert result.exit_code == 0, result.stderr[-3000:]
    out = tmp_path / f"out_{model_type}_{qtype}_{method}"
    assert sorted(p.name for p in (out / "gguf_model").iterdir()) == ["model.gguf"]  # no scratch left behind
    return out


def _gguf_weights(path):
    reader = gguf.GGUFReader(str(path))
    return {t.name: (t.tensor_type.name, gguf.quants.dequantize(t.data, t.tensor_type)) for t in reader.tensors}


@pytest.mark.parametrize(("model_type", "qtype", "method"), [("llama", "Q4_0", "rtn"), ("llama", "Q4_1", "rtn"), ("llama", "Q5_1", "rtn"), ("llama", "Q8_0", "rtn"), ("qwen2", "Q5_0", "rtn"), ("qwen3", "Q4_1", "rtn"), ("llama", "Q4_1", "awq"), ("llama", "Q4_0", "gptq")])
def test_file_holds_exactly_the_fake_quant_weights(tmp_path, model_type, qtype, method):
    from safetensors.torch import load_file
    from transformers import AutoConfig

    special = {"trans": True, "weight_clip": True} if method == "awq" else None
    out = _run(tmp_path, model_type, qtype, method, special)
    fake = load_file(str(out / "fake_quant_model" / "model.safetensors"))
    cfg = AutoConfig.from_pretrained(out / "fake_quant_model", trust_remote_code=False)
    held = _gguf_weights(out / "gguf_model" / "model.gguf")
    names = gguf.get_tensor_name_map(next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == {"llama": "llama"}.get(model_type, model_type)), cfg.num_hidden_layers)
    quantized = 0
    for hf_name, w in fake.items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        kind, got = held[names.get_name(hf_name, try_suffixes=(".weight", ".bias"))]
        if model_type == "llama" and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = cfg.num_attention_heads if "q_proj" in hf_name else cfg.num_key_value_heads
            got = got.reshape(heads, -1, 2, got.shape[-1]).swapaxes(1, 2).reshape(got.shape)  # pairs back to halves
        if ".layers." in hf_name and hf_name.endswith("proj.weight"):
            assert kind == qtype, hf_name
            np.testing.assert_array_equal(got.reshape(w.shape), w.numpy(), err_msg=hf_name)
            quantized += 1
        else:
            assert kind in ("F16", "F32"), hf_name
            np.testing.assert_allclose(got.reshape(w.shape), w.numpy(), rtol=1e-3, atol=1e-4, err_msg=hf_name)
    assert quantized == 7 * cfg.num_hidden_layers


def test_transformers_reads_the_file_back_to_the_same_weights(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = _run(tmp_path, "llama", "Q4_1")
    fake = load_file(str(out / "fake_quant_model" / "model.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(out / "gguf_model", gguf_file="model.gguf", dtype=torch.float32, trust_remote_code=False)
    sd = model.state_dict()
    for name, w in fake.items():
        if "layers." in name and name.endswith("proj.weight"):
            assert torch.equal(sd[name], w), name


def test_scheme_fit_to_the_file_grid_is_printed_by_validate(tmp_path, tiny_model_dir, tiny_text_file):
    cfg = run_config(tiny_model_dir, tiny_text_file, tmp_path / "o", bit=4, symmetric=False)
    cfg["save"]["save_gguf"] = True
    result = run_cli("validate", str(write_config(tmp_path / "c.yml", cfg)))
    assert result.exit_code == 0, result.stderr
    assert "zero_dtype: float16" in result.stdout and "scale_dtype: float16" in result.stdout


@pytest.mark.parametrize(
    ("weight", "scheme", "needle"),
    [
        ({"bit": 4, "symmetric": True, "granularity": "per_group", "group_size": 64}, None, "the nearest is Q4_0"),
        ({"bit": 8, "symmetric": False, "granularity": "per_group", "group_size": 32}, None, "Q8_0) are symmetric"),
        ({"bit": 3, "symmetric": False, "granularity": "per_group", "group_size": 32}, None, "the nearest is Q4_1"),
        ({"bit": 4, "symmetric": True, "granularity": "per_channel"}, None, "the nearest is Q4_0"),
        (None, "FP8_DYNAMIC", "GGUF stores weights only"),
        (None, "NVFP4A16", "integer block types"),
    ],
)
def test_specs_no_gguf_type_stores_are_refused_before_loading(tmp_path, tiny_model_dir, tiny_text_file, weight, scheme, needle):
    cfg = run_config(tiny_model_dir, tiny_text_file, tmp_path / "o")
    if scheme:
        cfg["quant"].pop("weight")
        cfg["quant"]["scheme"] = scheme
    else:
        cfg["quant"]["weight"] = weight
    cfg["save"]["save_gguf"] = True
    result = run_cli("validate", str(write_config(tmp_path / "c.yml", cfg)))
    assert result.exit_code == 2
    assert "save.save_gguf:" in result.stderr and needle in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_a_family_the_writer_does_not_know_is_refused_before_calibration(tmp_path):
    out = tmp_path / "o"
    model_dir = save_tiny_model(tmp_path / "gemma", "gemma2")
    from llmc_core.testing import write_corpus

    cfg = run_config(model_dir, write_corpus(tmp_path / "c.txt"), out, eval_pos=("fake_quant",))
    cfg["model"]["type"] = "auto"
    cfg["save"]["save_gguf"] = True
    result = run_cli("run", str(write_config(tmp_path / "c.yml", cfg)))
    assert result.exit_code == 2
    assert "llmc writes GGUF for llama, mistral, qwen2, qwen3 models so far, not 'gemma2'" in result.stderr
    assert "quantize" not in result.stderr.split("save.save_gguf")[0].lower().split("load model")[-1]
    assert not (out / "gguf_model").exists()


def test_a_block_off_the_grid_fails_closed(tmp_path):
    from llmc_core.errors import LlmcError
    from llmc_core.quant.fake import quantize_weight
    from llmc_core.quant.spec import QuantSpec
    from llmc_plugins.savers.gguf_format import quantized_tensor

    w = torch.randn(4, 64)
    off = quantize_weight(w, QuantSpec(bit=4, symmetric=False, granularity="per_group", group_size=32))  # float32 scales, integer zero points
    with pytest.raises(LlmcError, match="does not dequantize to llmc's weight"):
        quantized_tensor(off, "Q4_1")
    on = quantize_weight(w, QuantSpec(bit=4, symmetric=False, granularity="per_group", group_size=32, scale_dtype="float16", zero_dtype="float16"))
    assert quantized_tensor(on, "Q4_1").shape == (4, 2 * 20)


def test_float16_min_is_the_group_min_and_recovers_weights_already_on_a_q4_1_grid():
    from llmc_core.quant.fake import fake_quantize, quantize_weight
    from llmc_core.quant.spec import QuantSpec

    g = torch.Generator().manual_seed(0)
    for bit in (4, 5):
        top = 2**bit - 1
        codes = torch.randint(0, top + 1, (64, 4, 32), generator=g).float()
        codes[..., 0], codes[..., 1] = 0, top  # every block spans the whole code range
        d = torch.rand(64, 4, 1, generator=g).mul(0.05).add(1e-3).half().float()
        m = torch.randn(64, 4, 1, generator=g).mul(0.1).half().float()
        w = (codes * d + m).reshape(64, 128)  # SmolLM2's GGUF weights are such a grid (Q4_1, blocks of 32)
        kw = {"bit": bit, "symmetric": False, "granularity": "per_group", "group_size": 32, "scale_dtype": "float16"}
        qw = quantize_weight(w, QuantSpec(zero_dtype="float16", **kw))
        assert torch.equal(qw.zeros, m[..., 0])  # the block's min, in float16
        assert torch.equal(qw.dequantize(), w)  # the grid is found again exactly
        assert torch.equal(qw.dequantize(), fake_quantize(w, QuantSpec(zero_dtype="float16", **kw)))
        integer = quantize_weight(w, QuantSpec(**kw)).dequantize()
        assert not torch.equal(integer, w)  # an integer zero point shifts the grid by up to half a step


def test_zero_dtype_float16_needs_an_asymmetric_float16_spec():
    from pydantic import ValidationError

    from llmc_core.quant.spec import QuantSpec

    with pytest.raises(ValidationError, match="zero_dtype: float16"):
        QuantSpec(bit=4, symmetric=True, granularity="per_group", group_size=32, scale_dtype="float16", zero_dtype="float16")
    with pytest.raises(ValidationError, match="zero_dtype: float16"):
        QuantSpec(bit=4, symmetric=False, granularity="per_group", group_size=32, zero_dtype="float16")


def test_gguf_run_keeps_its_fake_quant_ppl(tmp_path):
    out = _run(tmp_path, "llama", "Q4_0")
    assert ("fake_quant", "ppl", "custom", "perplexity") in read_results(out)


def test_export_writes_the_same_file_from_a_fake_quant_folder_and_refuses_one_off_the_grid(tmp_path):
    out = _run(tmp_path, "llama", "Q4_1")
    first = (out / "gguf_model" / "model.gguf").read_bytes()
    result = run_cli("export", str(out), "--to", "gguf", "--overwrite")
    assert result.exit_code == 0, result.stderr
    assert _gguf_weights(out / "gguf_model" / "model.gguf").keys() == _gguf_weights_from_bytes(tmp_path, first).keys()
    for name, (kind, w) in _gguf_weights(out / "gguf_model" / "model.gguf").items():
        kind0, w0 = _gguf_weights_from_bytes(tmp_path, first)[name]
        assert kind == kind0 and np.array_equal(w, w0), name
    # a run without save_gguf quantized on float32 scales: its folder is refused before any work
    model_dir = save_tiny_model(tmp_path / "plain", "llama")
    cfg = run_config(model_dir, tmp_path / "corpus.txt", tmp_path / "plain_out", eval_pos=())
    cfg["save"]["save_fake"] = True
    assert run_cli("run", str(write_config(tmp_path / "plain.yml", cfg))).exit_code == 0
    result = run_cli("export", str(tmp_path / "plain_out"), "--to", "gguf")
    assert result.exit_code == 2 and "run the config again with save.save_gguf: true" in result.stderr, result.stderr
    assert not (tmp_path / "plain_out" / "gguf_model").exists()


def _gguf_weights_from_bytes(tmp_path, data):
    path = tmp_path / "first.gguf"
    if not path.exists():
        path.write_bytes(data)
    return _gguf_weights(path)


def test_signed_scale_puts_each_group_peak_on_the_longer_end_and_cuts_the_error():
    from llmc_core.quant.fake import fake_quantize, quantize_weight
    from llmc_core.quant.spec import QuantSpec

    w = torch.randn(256, 128)
    kw = {"symmetric": True, "granularity": "per_group", "group_size": 32, "scale_dtype": "float16"}
    for bit in (4, 5, 8):
        signed = quantize_weight(w, QuantSpec(bit=bit, signed_scale=True, **kw))
        plain = quantize_weight(w, QuantSpec(bit=bit, **kw))
        groups = w.reshape(256, 4, 32)
        peak = groups.gather(-1, groups.abs().argmax(-1, keepdim=True))[..., 0]
        codes = signed.codes.reshape(256, 4, 32).gather(-1, groups.abs().argmax(-1, keepdim=True))[..., 0]
        assert (codes == -(2 ** (bit - 1))).all()  # the peak is the code range's longer end
        assert torch.equal(signed.scales < 0, peak > 0)
        assert torch.equal(signed.dequantize(), fake_quantize(w, QuantSpec(bit=bit, signed_scale=True, **kw)))
        ratio = ((signed.dequantize() - w) ** 2).sum() / ((plain.dequantize() - w) ** 2).sum()
        assert ratio < ((2 ** (bit - 1) - 1) / 2 ** (bit - 1)) ** 2 + 0.05, (bit, ratio)  # the step shrinks by (2^(b-1) - 1) / 2^(b-1)


def test_signed_scales_are_refused_by_formats_that_store_positive_ones(tmp_path, tiny_model_dir, tiny_text_file):
    cfg = run_config(tiny_model_dir, tiny_text_file, tmp_path / "o", bit=4, symmetric=True)
    cfg["save"].update(save_gguf=True, save_vllm=True, save_awq=True)
    result = run_cli("validate", str(write_config(tmp_path / "c.yml", cfg)))
    assert result.exit_code == 2
    assert "save.save_vllm: the weights are quantized with signed scales" in result.stderr
    assert "save.save_awq: the weights are quantized with signed scales" in result.stderr
    cfg["save"].update(save_vllm=False, save_awq=False)
    assert run_cli("validate", str(write_config(tmp_path / "c.yml", cfg))).exit_code == 0
