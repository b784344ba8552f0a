"""The compressed-tensors export (save_vllm, llmc export): proven with compressed-tensors' own
decompression and transformers' own loader, never only with llmc's code."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from llmc_core import config
from llmc_core.errors import LlmcError
from llmc_core.quant import QuantSpec, quantize_weight
from llmc_core.run import Run
from llmc_core.testing import read_results, run_config, save_tiny_llama

pytest.importorskip("compressed_tensors")

from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor  # noqa: E402
from compressed_tensors.quantization import QuantizationConfig  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM, CompressedTensorsConfig  # noqa: E402

from llmc_plugins.savers.ct_format import check_plain_linears, compress_layer, quantization_config  # noqa: E402

SPECS = [
    pytest.param(dict(bit=4, symmetric=False, granularity="per_group", group_size=32), id="w4-asym-g32"),
    pytest.param(dict(bit=4, symmetric=True, granularity="per_group", group_size=64), id="w4-sym-g64"),
    pytest.param(dict(bit=4, symmetric=False, granularity="per_channel"), id="w4-asym-channel"),
    pytest.param(dict(bit=8, symmetric=True, granularity="per_channel"), id="w8-sym-channel"),
    pytest.param(dict(bit=8, symmetric=False, granularity="per_group", group_size=32), id="w8-asym-g32"),
    pytest.param(dict(bit=4, symmetric=True, granularity="per_tensor"), id="w4-sym-tensor"),
]


def ct_decompress(tensors: dict, prefix: str, qcfg: dict) -> torch.Tensor:
    """One layer's float weight through compressed-tensors' own decompressor."""
    scheme = QuantizationConfig.model_validate(qcfg).config_groups["group_0"]
    local = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".weight")}
    return PackedQuantizationCompressor.decompress(local, scheme)["weight"]


def load_ct(folder, dequantize: bool):
    """transformers' own loader: ``dequantize=True`` decompresses at load time; ``False`` is the
    default path (decompressed on the first forward)."""
    kwargs = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    return AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` over all logits (Frobenius norms)."""
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# -- one layer -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", SPECS)
def test_layer_tensors_decompress_to_exactly_the_fake_weight(kw):
    torch.manual_seed(0)
    spec = QuantSpec(scale_dtype="float16", **kw)
    qw = quantize_weight(torch.randn(48, 128), spec)
    out = compress_layer(qw, "layer")
    names = {"weight_packed", "weight_scale", "weight_shape"} | ({"weight_zero_point"} if not spec.symmetric else set())
    assert set(out) == names
    assert out["weight_packed"].dtype == torch.int32 and out["weight_packed"].shape == (48, 128 * spec.bit // 32)
    assert out["weight_shape"].tolist() == [48, 128]
    cols = 128 // spec.group_size if spec.granularity == "per_group" else 1
    assert out["weight_scale"].shape == (48, cols)
    if not spec.symmetric:
        assert out["weight_zero_point"].dtype == torch.int32 and out["weight_zero_point"].shape == (48 * spec.bit // 32, cols)
    qcfg = quantization_config(spec, ["lm_head"]).model_dump()
    w = ct_decompress({f"layer.{k}": v for k, v in out.items()}, "layer", qcfg)
    assert torch.equal(w.float(), qw.dequantize())


def test_int4_words_hold_eight_offset_codes_lowest_nibble_first():
    """The pack-quantized bit layout restated without llmc's or compressed-tensors' code: input
    ``8j + i`` in bits ``4i .. 4i+3`` of word ``j``, each code stored as ``code + 8``."""
    spec = QuantSpec(bit=4, symmetric=True, granularity="per_channel")
    qw = quantize_weight(torch.randn(8, 64), spec)
    packed = compress_layer(qw, "layer")["weight_packed"].to(torch.int64) & 0xFFFFFFFF
    for i in range(8):
        assert torch.equal((packed >> (4 * i)) & 0xF, qw.codes[:, i::8].long() + 8)


def test_group_index_hook():
    spec = QuantSpec(bit=4, group_size=32, scale_dtype="float16")
    qw = quantize_weight(torch.randn(16, 128), spec)
    plain = compress_layer(qw)
    qw.g_idx = torch.arange(128, dtype=torch.int32) // 32  # GPTQ without act-order: the same layout
    assert all(torch.equal(plain[k], v) for k, v in compress_layer(qw).items())
    qw.g_idx = torch.randperm(128) // 32  # act-order: groups are not consecutive columns
    with pytest.raises(LlmcError, match="g_idx.*static groups"):
        compress_layer(qw, "model.layers.0.mlp.up_proj")


def test_moe_and_other_non_linear_weights_are_refused():
    class Experts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_up_proj = torch.nn.Parameter(torch.randn(4, 32, 16))

    model = torch.nn.Module()
    model.experts = Experts()
    qw = quantize_weight(torch.randn(32, 16), QuantSpec(bit=4, group_size=16))
    qw.codes = torch.zeros(4, 32, 16, dtype=torch.uint8)
    with pytest.raises(LlmcError, match=r"experts \(Experts, weight 4x32x16\) is not a plain 2-D linear layer.*MoE.*save_fake"):
        check_plain_linears(model, {"experts": qw}, "save.save_vllm")


@pytest.mark.parametrize(("weight", "expected"), [({"bit": 3}, "4- or 8-bit"), ({"bit": 2}, "4- or 8-bit")])
def test_unsupported_bits_are_refused_before_loading(tiny_model_dir, tiny_text_file, tmp_path, weight, expected):
    cfg = run_config(tiny_model_dir, tiny_text_file, tmp_path / "out", save={"save_path": str(tmp_path / "out"), "save_vllm": True})
    cfg["quant"]["weight"].update(weight)
    with pytest.raises(LlmcError) as err:
        config.validate(cfg)
    assert any(p.startswith("save.save_vllm:") and expected in p and "save_fake" in p for p in err.value.problems), err.value.problems


def test_missing_package_is_one_line_with_the_install_command(tiny_model_dir, tiny_text_file, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "compressed_tensors" else real(name, *a))
    cfg = run_config(tiny_model_dir, tiny_text_file, tmp_path / "out", save={"save_path": str(tmp_path / "out"), "save_vllm": True})
    with pytest.raises(LlmcError) as err:
        config.validate(cfg)
    assert any(p.startswith("save.save_vllm:") and "pip install 'llmc[vllm]'" in p for p in err.value.problems), err.value.problems


# -- whole runs ------------------------------------------------------------------------------------


def _run(model_dir, data, out, method="rtn", save=("save_fake", "save_vllm"), **weight):
    cfg = run_config(model_dir, data, out, method=method, eval_pos=("fake_quant",), save={"save_path": str(out), **{s: True for s in save}})
    cfg["quant"]["weight"].update(scale_dtype="float16", **weight)
    cfg["eval"]["num_samples"] = 2
    run = Run(config.validate(cfg))
    run.execute()
    return run


def _check_folder(out, run, dequantize: bool) -> float:
    """The folder decompresses (compressed-tensors) to the save_fake weights and loads in
    transformers with the fake model's logits; returns the logits' relative error."""
    ct, fake = out / "vllm_quant_model", out / "fake_quant_model"
    qcfg = json.loads((ct / "config.json").read_text())["quantization_config"]
    assert (qcfg["quant_method"], qcfg["format"], qcfg["ignore"]) == ("compressed-tensors", "pack-quantized", ["lm_head"])
    assert qcfg["config_groups"]["group_0"]["targets"] == ["Linear"]
    assert all((ct / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"))
    packed, floats = load_file(ct / "model.safetensors"), load_file(fake / "model.safetensors")
    layers = sorted(k[: -len(".weight_packed")] for k in packed if k.endswith(".weight_packed"))
    assert layers == sorted(run.quantized) and len(layers) == 14
    for name in layers:
        assert torch.equal(ct_decompress(packed, name, qcfg).float(), floats[f"{name}.weight"].float()), name
    others = {k for k in packed if not k.rsplit(".", 1)[0] in layers}
    assert others == {k for k in floats if k.rsplit(".", 1)[0] not in layers}
    assert all(torch.equal(packed[k], floats[k]) for k in others)

    model, ref = load_ct(ct, dequantize), AutoModelForCausalLM.from_pretrained(fake, dtype=torch.float32).eval()
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        err = rel_err(model(input_ids=ids).logits, ref(input_ids=ids).logits)
    print(f"\n{out.name}: logits relative error vs fake_quant_model = {err:.3g} (dequantize={dequantize})")
    assert err <= 1e-3
    return err


@pytest.mark.parametrize(
    "weight",
    [
        pytest.param(dict(bit=4, symmetric=True, group_size=32), id="w4-sym-g32"),
        pytest.param(dict(bit=4, symmetric=False, group_size=32), id="w4-asym-g32"),
        pytest.param(dict(bit=8, symmetric=True, granularity="per_channel", group_size=None), id="w8-sym-channel"),
        pytest.param(dict(bit=8, symmetric=False, granularity="per_channel", group_size=None), id="w8-asym-channel"),
    ],
)
def test_rtn_folder_loads_in_transformers_with_the_fake_logits(tiny_model_dir, tiny_text_file, tmp_path, weight):
    out = tmp_path / "out"
    run = _run(tiny_model_dir, tiny_text_file, out, **weight)
    _check_folder(out, run, dequantize=True)
    if weight["symmetric"]:  # transformers' default path; for asymmetric folders see docs/export.md
        _check_folder(out, run, dequantize=False)


def test_awq_folder_loads_in_transformers_with_the_fake_logits(tiny_model_dir, tiny_text_file, tmp_path):
    out = tmp_path / "out"
    run = _run(tiny_model_dir, tiny_text_file, out, method="awq", bit=4, symmetric=False, group_size=32)
    assert _check_folder(out, run, dequantize=True) <= 1e-3


# -- llmc export -----------------------------------------------------------------------------------


def _same_folder(a, b):
    ta, tb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    qa, qb = (json.loads((f / "config.json").read_text())["quantization_config"] for f in (a, b))
    assert qa == qb


def test_export_from_fake_only_equals_the_run_saves(tiny_model_dir, tiny_text_file, tmp_path, llmc_cli):
    direct = tmp_path / "direct"
    _run(tiny_model_dir, tiny_text_file, direct, save=("save_fake", "save_vllm", "save_awq"), bit=4, symmetric=False, group_size=32)
    later = tmp_path / "later"
    shutil.copytree(direct / "fake_quant_model", later / "fake_quant_model")
    for to, folder in (("vllm", "vllm_quant_model"), ("awq", "awq_model")):
        res = llmc_cli("export", str(later), "--to", to)
        assert res.exit_code == 0, res.stderr
        assert f"wrote {later / folder}" in res.stdout
        _same_folder(direct / folder, later / folder)
    res = llmc_cli("export", str(later), "--to", "vllm")
    assert res.exit_code == 2 and "already exists" in res.stderr and "--overwrite" in res.stderr
    assert llmc_cli("export", str(later), "--to", "vllm", "--overwrite").exit_code == 0


def test_export_refuses_what_it_cannot_do(tiny_model_dir, tiny_text_file, tmp_path, llmc_cli):
    out = tmp_path / "out"
    _run(tiny_model_dir, tiny_text_file, out, save=("save_fake",), bit=4, group_size=32)
    res = llmc_cli("export", str(out), "--to", "onnx")
    assert res.exit_code == 2 and "--to onnx: llmc exports to awq, gguf, vllm" in res.stderr, res.stderr
    res = llmc_cli("export", str(tmp_path / "nothing"), "--to", "vllm")
    assert res.exit_code == 2 and "no fake_quant_model/" in res.stderr

    fake = out / "fake_quant_model"
    tensors = load_file(fake / "model.safetensors")
    tensors["model.layers.1.mlp.down_proj.weight"] = tensors["model.layers.1.mlp.down_proj.weight"] * 1.01
    from safetensors.torch import save_file

    save_file(tensors, str(fake / "model.safetensors"), metadata={"format": "pt"})
    res = llmc_cli("export", str(out), "--to", "vllm")
    assert res.exit_code == 2 and "model.layers.1.mlp.down_proj are not what llmc_qparams.safetensors quantizes to" in res.stderr
    (fake / "llmc_qparams.safetensors").unlink()
    res = llmc_cli("export", str(out), "--to", "vllm")
    assert res.exit_code == 2 and "no llmc_qparams.safetensors" in res.stderr and "save.save_vllm: true" in res.stderr
    assert not (out / "vllm_quant_model").exists()


def test_codes_are_kept_where_the_float_weights_cannot_give_them_back(tmp_path):
    """8-bit codes of float16 weights in the subnormal range do not come back (the scale, at least
    1e-5 / 255, is below float16's 6e-8 spacing there); save_fake then stores them."""
    from llmc_core.quant.stored import read_quantized, write_qparams

    spec = QuantSpec(bit=8, group_size=32)
    model = torch.nn.Module()
    model.big, model.tiny = torch.nn.Linear(64, 16, bias=False).half(), torch.nn.Linear(64, 16, bias=False).half()
    quantized = {}
    for name, factor in (("big", 1.0), ("tiny", 1e-6)):
        lin = model.get_submodule(name)
        quantized[name] = quantize_weight(torch.randn(16, 64) * factor, spec)
        lin.weight.data.copy_(quantized[name].dequantize(torch.float16))
    info = write_qparams(tmp_path, model, quantized)
    assert info["codes_stored"] == ["tiny"]
    (tmp_path / "llmc_quant.json").write_text(json.dumps({"weight": spec.model_dump(), "quantized_layers": ["big", "tiny"]}))
    back = read_quantized(tmp_path, model)
    for name, qw in quantized.items():
        assert torch.equal(back[name].codes, qw.codes) and torch.equal(back[name].scales, qw.scales.float()), name


def test_export_of_8bit_codes_from_bfloat16_weights(tmp_path, tiny_text_file, llmc_cli):
    """8-bit codes come back from bfloat16 fake weights (|q - z| * 2^-9 < 1/2): exact export."""
    model_dir = save_tiny_llama(tmp_path / "model")
    out = tmp_path / "out"
    cfg = run_config(model_dir, tiny_text_file, out, eval_pos=(), save={"save_path": str(out), "save_fake": True})
    cfg["model"]["torch_dtype"] = "bfloat16"
    cfg["quant"]["weight"].update(bit=8, granularity="per_channel", group_size=None)
    del cfg["eval"]
    Run(config.validate(cfg)).execute()
    info = json.loads((out / "fake_quant_model" / "llmc_quant.json").read_text())
    assert llmc_cli("export", str(out), "--to", "vllm").exit_code == 0
    ct = out / "vllm_quant_model"
    qcfg = json.loads((ct / "config.json").read_text())["quantization_config"]
    packed, floats = load_file(ct / "model.safetensors"), load_file(out / "fake_quant_model" / "model.safetensors")
    for name in info["quantized_layers"]:
        assert torch.equal(ct_decompress(packed, name, qcfg).to(torch.bfloat16), floats[f"{name}.weight"]), name


def test_results_are_unchanged_by_the_vllm_save(tiny_model_dir, tiny_text_file, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _run(tiny_model_dir, tiny_text_file, a, save=("save_fake",), bit=4, group_size=32)
    _run(tiny_model_dir, tiny_text_file, b, bit=4, group_size=32)
    assert read_results(a) == read_results(b)


# -- the real model --------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_awq_vllm_folder_matches_fake_quant(smollm2_hf, shared_data, tmp_path):
    """SmolLM2-135M, AWQ w4 g64 (asymmetric, float16 scales), 2 calibration samples of 128 tokens
    and a 5-point scale grid (kept short: the export, not AWQ, is under test):
    the folder decompresses to the save_fake weights and transformers' logits on 512 WikiText-2
    tokens match the fake-quantized model's (relative error <= 1e-3)."""
    from transformers import AutoTokenizer

    out = tmp_path / "out"
    cfg = {
        "model": {"type": "SmolLM2", "path": str(smollm2_hf), "torch_dtype": "float32"},
        "calib": {"name": "c4", "path": str(shared_data / "c4" / "c4-train.00000-of-01024.first1000.jsonl"), "n_samples": 2, "seq_len": 128, "bs": -1, "preproc": "pileval_awq", "seed": 42},
        "quant": {"method": "Awq", "weight": {"bit": 4, "symmetric": False, "granularity": "per_group", "group_size": 64, "scale_dtype": "float16"}, "special": {"n_grid": 5}},
        "save": {"save_path": str(out), "save_fake": True, "save_vllm": True},
    }
    run = Run(config.validate(cfg))
    run.execute()
    ct, fake = out / "vllm_quant_model", out / "fake_quant_model"
    qcfg = json.loads((ct / "config.json").read_text())["quantization_config"]
    packed, floats = load_file(ct / "model.safetensors"), load_file(fake / "model.safetensors")
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.29.mlp.down_proj"):
        assert torch.equal(ct_decompress(packed, name, qcfg).float(), floats[f"{name}.weight"]), name
    tok = AutoTokenizer.from_pretrained(ct)
    text = (shared_data / "wikitext2" / "wiki.test.raw").read_text(encoding="utf-8")[:4000]
    ids = tok(text, return_tensors="pt").input_ids[:, :512]
    model, ref = load_ct(ct, dequantize=True), AutoModelForCausalLM.from_pretrained(fake, dtype=torch.float32).eval()
    with torch.no_grad():
        err = rel_err(model(input_ids=ids).logits, ref(input_ids=ids).logits)
    print(f"\nSmolLM2 AWQ w4 g64: vllm_quant_model logits relative error vs fake_quant_model = {err:.3g}")
    assert err <= 1e-3
