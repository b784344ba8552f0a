"""compressed-tensors ``pack-quantized`` folders: the checkpoint vLLM, SGLang and transformers load.

The ``compressed-tensors`` package (``pip install 'llmc[vllm]'``) does the packing and writes the
config: llmc hands :class:`PackedQuantizationCompressor` each layer's exact dequantized weight with
its scale and zero point, and the package re-derives the integer codes and packs them, names the
tensors and drops what a symmetric scheme does not store. The codes it packed are then unpacked
and compared with llmc's (a mismatch is an error, not a warning). Per quantized linear layer:

- ``weight_packed``: int32 ``[out, ceil(in * bits / 32)]``, the signed codes ``q - 2^(bits-1)``
  offset back to ``0 .. 2^bits - 1`` and packed along the input dimension (8 per word for 4-bit,
  4 per word for 8-bit), element ``i`` of a word in bits ``bits*i ..``;
- ``weight_scale``: float32 ``[out, in / group]`` (``[out, 1]`` per channel). Loaders cast it to
  their compute dtype; kept in float32 because compressed-tensors' decompression computes in the
  stored scale's dtype, and float32 makes it reproduce llmc's float32 dequantization bit for bit;
- ``weight_zero_point`` (asymmetric only): the signed zero points packed along the output
  dimension, int32 ``[ceil(out * bits / 32), in / group]``;
- ``weight_shape``: int64 ``[out, in]``; plus ``bias`` as in the float model.

``W = (code - zero) * scale`` is the weight llmc's fake-quantized model holds. ``config.json``
gets ``quantization_config`` with ``quant_method: compressed-tensors``, ``format:
pack-quantized``, one config group (``targets: [Linear]``) and ``ignore`` = every linear layer
left in float (``lm_head`` at least). Per-tensor specs are written as per-channel scales, all
equal, which dequantize identically (vLLM's kernels take group or channel strategies).
Importing this module is cheap; torch and compressed-tensors load inside the functions.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llmc_core.errors import LlmcError

BITS = (4, 8)  # the integer widths vLLM's kernels run (WNA16, W8A8, W4A8); the folder is meant for them
INSTALL = "pip install 'llmc[vllm]' (or pip install compressed-tensors)"
_STRATEGY = {"per_tensor": "tensor", "per_channel": "channel", "per_group": "group", "per_block": "block", "per_token": "token"}


def ct_problems(scheme: Any) -> list[str]:
    """Why a scheme cannot be written as a compressed-tensors folder (empty list: it can)."""
    from llmc_core.quant.rules import gguf_grid_problems

    w, a, kv = scheme.weight, scheme.act, scheme.kv
    out = gguf_grid_problems(w)
    if not w.is_float and w.bit not in BITS:
        out.append(f"the compressed-tensors export holds 4- or 8-bit integer weights, the widths vLLM's kernels run (quant.weight.bit is {w.bit})")
    for where, spec in (("quant.weight", w), ("quant.act", a), ("quant.kvcache", kv)):
        if spec is not None and spec.is_float and spec.bit == "e5m2":
            out.append(f"{where}: compressed-tensors' FP8 is E4M3; use bit: e4m3")
        if spec is not None and spec.bit == "e2m1" and spec.fp4_kind is None:
            out.append(f"{where}: FP4 is stored as NVFP4 (scale_dtype e4m3, group_size 16) or MXFP4 (scale_dtype e8m0, group_size 32)")
        if spec is not None and spec.fp4_kind == "nvfp4" and spec.group_size != 16 or spec is not None and spec.fp4_kind == "mxfp4" and spec.group_size != 32:
            out.append(f"{where}: compressed-tensors stores NVFP4 with group_size 16 and MXFP4 with group_size 32")
    if a is not None and not a.is_float and a.bit != 8:
        out.append(f"quant.act: vLLM's integer activation kernels take 8 bits (quant.act.bit is {a.bit})")
    if kv is not None and (kv.granularity != "per_tensor" or not (kv.is_float or kv.bit == 8)):
        out.append("quant.kvcache: vLLM's KV cache scheme is per-tensor static scales (k_scale, v_scale) of FP8 or INT8; use granularity: per_tensor")
    return out


def missing_package() -> str | None:
    """The line to show when compressed-tensors is not installed (None when it is)."""
    if importlib.util.find_spec("compressed_tensors") is None:
        return f"the compressed-tensors package is not installed: {INSTALL}"
    return None


def ct_args(spec: Any, activation: bool = False) -> Any:
    """compressed-tensors ``QuantizationArgs`` for one llmc ``QuantSpec`` (weights, or activations / KV)."""
    import torch
    from compressed_tensors.quantization import QuantizationArgs

    kind = spec.fp4_kind
    fields: dict[str, Any] = {"num_bits": spec.num_bits, "type": "float" if spec.is_float else "int", "symmetric": spec.symmetric}
    fields["strategy"] = "tensor_group" if kind == "nvfp4" else _STRATEGY[spec.granularity]
    if spec.granularity == "per_group":
        fields["group_size"] = spec.group_size
    if spec.granularity == "per_block":
        fields["block_structure"] = list(spec.block_size)
    if kind is not None:
        dtype = torch.float8_e4m3fn if kind == "nvfp4" else torch.uint8
        fields.update(scale_dtype=dtype, zp_dtype=dtype)
    if activation:
        fields["dynamic"] = "local" if kind == "nvfp4" else not spec.static
        if spec.static:
            fields["observer"] = "static_minmax" if kind == "nvfp4" else "minmax"
    else:
        fields["dynamic"] = False
    return QuantizationArgs(**fields)


def ct_scheme(scheme: Any) -> Any:
    """The ``QuantizationScheme`` (targets: Linear) of a llmc :class:`~llmc_core.quant.scheme.Scheme`."""
    from compressed_tensors.quantization import QuantizationScheme

    act = ct_args(scheme.act, activation=True) if scheme.act is not None else None
    return QuantizationScheme(targets=["Linear"], weights=ct_args(scheme.weight), input_activations=act)


def compressor_for(scheme: Any) -> tuple[Any, Any, str]:
    """``(compressor class, QuantizationScheme, format name)``, as compressed-tensors itself picks them."""
    import torch
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.compressors.format import infer_module_format

    cts = ct_scheme(scheme)
    fmt = infer_module_format(torch.nn.Linear, cts)
    return BaseCompressor.get_value_from_registry(fmt.value), cts, fmt.value


def signed_parts(qw: Any, name: str = "layer") -> tuple[Any, Any, Any]:
    """``(codes int8 [out, in], scales float32 [out, cols], zeros int8 [out, cols])`` in
    compressed-tensors' signed convention (codes and zero points minus ``2^(bits-1)`` for
    asymmetric specs), per-tensor values repeated per channel."""
    import torch

    spec = qw.spec
    _check_g_idx(qw, name)
    out_f = qw.codes.shape[0]
    offset = 0 if spec.symmetric else 2 ** (spec.bit - 1)
    scales = qw.scales.detach().cpu().float().reshape(qw.scales.shape[0], -1)
    zeros = qw.zeros.detach().cpu().float().reshape(scales.shape).round()
    if scales.shape[0] != out_f:  # per tensor: one value, stored once per output channel
        scales, zeros = scales.expand(out_f, 1).contiguous(), zeros.expand(out_f, 1).contiguous()
    codes = (qw.codes.detach().cpu().to(torch.int16) - offset).to(torch.int8)
    return codes, scales, (zeros - offset).to(torch.int8)


def _check_g_idx(qw: Any, name: str) -> None:
    import torch

    spec = qw.spec
    g_idx = getattr(qw, "g_idx", None)  # GPTQ act-order: which group each input column uses
    if g_idx is None:
        return
    trivial = spec.granularity == "per_group" and torch.equal(g_idx.cpu().long(), torch.arange(qw.codes.shape[1]) // spec.group_size)
    if not trivial:
        raise LlmcError(
            f"{name}: the layer carries a GPTQ act-order group index (g_idx) whose groups are not consecutive columns; "
            "compressed-tensors dropped that form (actorder 'group', weight_g_idx), so vLLM cannot load it. "
            "Quantize with GPTQ's static groups (actorder 'weight'), or save it with save_fake."
        )


def _layer_state(qw: Any, name: str) -> dict[str, Any]:
    """What a compressor takes: the exact float32 weight llmc computed (it re-derives the codes)
    with the scale (and zero point, global scale) in compressed-tensors' shapes and conventions."""
    import torch

    spec = qw.spec
    if not spec.is_float:
        codes, scales, zeros = signed_parts(qw, name)
        cols = scales.shape[1]
        group = codes.shape[1] // cols
        weight = (codes.float() - zeros.float().repeat_interleave(group, dim=1)) * scales.repeat_interleave(group, dim=1)
        return {"weight": weight, "weight_scale": scales, "weight_zero_point": zeros}
    _check_g_idx(qw, name)
    weight = qw.dequantize(torch.float32).cpu()
    scales = qw.scales.detach().cpu().float()
    if spec.granularity == "per_tensor":
        scales = scales.reshape(1)
    if spec.fp4_kind == "nvfp4":  # the FP8 group scales themselves, under the global scale
        gs = qw.global_scale.detach().cpu().float().reshape(1)
        fp8 = (scales * gs).to(torch.float8_e4m3fn).float()  # exact FP8 values, float32: the compressor casts them
        return {"weight": weight, "weight_scale": fp8, "weight_global_scale": gs}
    return {"weight": weight, "weight_scale": scales}


def compress_layer(qw: Any, name: str = "layer", scheme: Any = None) -> dict[str, Any]:
    """One layer's compressed tensors (local names: ``weight_packed`` or ``weight``,
    ``weight_scale``, ...), by compressed-tensors' own compressor for the scheme; what it wrote is
    decompressed again and compared with llmc's weight (a mismatch is an error, not a warning)."""
    import torch

    from llmc_core.quant.scheme import Scheme

    scheme = scheme or Scheme(qw.spec)
    problems = ct_problems(scheme)
    if problems:
        raise LlmcError(*(f"{name}: {p}." for p in problems))
    compressor, cts, _ = compressor_for(scheme)
    state = _layer_state(qw, name)
    out = dict(compressor.compress(dict(state), cts))
    back = dict(out)
    if "weight_packed" in back and "weight_shape" not in back:
        back["weight_shape"] = torch.tensor(state["weight"].shape)
    restored = compressor.decompress(back, cts)["weight"]  # in the compressor's dtype (bfloat16 for FP4)
    if not torch.equal(restored, state["weight"].to(restored.dtype)):
        raise RuntimeError(f"{name}: compressed-tensors stored a weight that decompresses to other values than llmc's ({(restored - state['weight']).abs().max():.3g} apart); please report this as a bug.")
    return out


def check_plain_linears(model: Any, quantized: Mapping[str, Any], where: str) -> None:
    """Refuse anything but 2-D ``nn.Linear`` weights (e.g. fused 3-D MoE experts)."""
    import torch

    for name, qw in quantized.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise LlmcError(f"{where}: quantized layer {name} is not in the model.") from None
        if not isinstance(module, torch.nn.Linear) or qw.codes.ndim != 2 or tuple(qw.codes.shape) != tuple(module.weight.shape):
            shape = "x".join(map(str, qw.codes.shape))
            raise LlmcError(
                f"{where}: {name} ({type(module).__name__}, weight {shape}) is not a plain 2-D linear layer; llmc does not write "
                "compressed-tensors checkpoints of MoE experts or other fused weights yet. Save it with save_fake."
            )


def quantization_config(scheme: Any, ignore: list[str]) -> Any:
    """The compressed-tensors ``QuantizationConfig`` of the folder (``scheme``: a ``Scheme``, or a
    weight ``QuantSpec`` alone)."""
    from compressed_tensors.quantization import QuantizationConfig

    from llmc_core.quant.scheme import Scheme

    if not isinstance(scheme, Scheme):
        scheme = Scheme(scheme)
    _, cts, fmt = compressor_for(scheme)
    kv = ct_args(scheme.kv, activation=True) if scheme.kv is not None else None
    return QuantizationConfig(config_groups={"group_0": cts}, format=fmt, kv_cache_scheme=kv, ignore=ignore, quantization_status="compressed")


def write_ct_folder(model: Any, quantized: Mapping[str, Any], folder: str | Path, tokenizer: Any = None, where: str = "save.save_vllm", scheme: Any = None, act_scales: Mapping[str, Any] | None = None, kv_scales: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Save ``model`` with the layers in ``quantized`` (full name -> ``QuantizedWeight``) compressed
    under ``scheme`` (default: the layers' weight spec alone), with the static activation scales
    (``<layer>.input_scale``, NVFP4: ``<layer>.input_global_scale``) and KV cache scales
    (``<attention>.k_scale`` / ``v_scale``) the scheme needs.

    ``model`` is left as it was. Returns the ``quantization_config`` written to ``config.json``.
    """
    import json

    from llmc_plugins.savers.awq_format import unquantized_linears
    from llmc_core.quant.scheme import Scheme

    missing = missing_package()
    if missing:
        raise LlmcError(f"{where}: {missing}.")
    from compressed_tensors.compressors import ModelCompressor

    if not quantized:
        raise LlmcError(f"{where}: nothing was quantized (the quant method returned no integer weights), so there is no compressed-tensors model to write.")
    check_plain_linears(model, quantized, where)
    specs = {q.spec.model_dump_json() for q in quantized.values()}
    if len(specs) > 1:
        raise LlmcError(f"{where}: llmc writes one compressed-tensors scheme per model, but the layers were quantized with {len(specs)} settings. Use save_fake instead.")
    spec = next(iter(quantized.values())).spec
    scheme = Scheme(spec) if scheme is None else scheme
    problems = ct_problems(scheme)
    if problems:
        raise LlmcError(*(f"{where}: {p}. Use save.save_fake instead." for p in problems))
    act_scales, kv_scales = act_scales or {}, kv_scales or {}
    state = dict(model.state_dict())
    for name, qw in quantized.items():
        del state[f"{name}.weight"]
        state.update({f"{name}.{key}": tensor for key, tensor in compress_layer(qw, name, scheme).items()})
        if scheme.act is not None and scheme.act.static:
            if name not in act_scales:
                raise LlmcError(f"{where}: {name} has no calibrated activation scale; the run did not observe it. Report this with the config.")
            key = "input_global_scale" if scheme.act.fp4_kind == "nvfp4" else "input_scale"
            value = _act_global(act_scales[name]) if key == "input_global_scale" else act_scales[name]
            state[f"{name}.{key}"] = value.detach().float().cpu().reshape(1)
    if scheme.kv is not None:
        for attn, scales in kv_scales.items():
            for kv in ("k", "v"):
                state[f"{attn}.{kv}_scale"] = scales[kv].detach().float().cpu().reshape(1)
    folder = Path(folder)
    model.save_pretrained(folder, state_dict=state, safe_serialization=True)
    qcfg = quantization_config(scheme, unquantized_linears(model, quantized))
    ModelCompressor(quantization_config=qcfg).update_config(str(folder))
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return json.loads((folder / "config.json").read_text(encoding="utf-8"))["quantization_config"]


def _act_global(amax: Any) -> Any:
    """NVFP4 activations: the observed ``max |x|`` as compressed-tensors' global scale."""
    from llmc_core.quant.floats import nvfp4_global_scale

    return nvfp4_global_scale(amax.float().reshape(1))
