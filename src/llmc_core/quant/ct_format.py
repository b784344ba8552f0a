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

BITS = (4, 8)  # what vLLM's WNA16 kernels (and SGLang's) run; the folder is meant for them
INSTALL = "pip install 'llmc[vllm]' (or pip install compressed-tensors)"


def ct_problems(bit: int, granularity: str, group_size: int | None) -> list[str]:
    """Why a weight spec cannot be written as a pack-quantized folder (empty list: it can)."""
    if bit not in BITS:
        return [f"the compressed-tensors export holds 4- or 8-bit weights, the widths vLLM's WNA16 kernels run (quant.weight.bit is {bit})"]
    return []


def missing_package() -> str | None:
    """The line to show when compressed-tensors is not installed (None when it is)."""
    if importlib.util.find_spec("compressed_tensors") is None:
        return f"the compressed-tensors package is not installed: {INSTALL}"
    return None


def weight_args(spec: Any) -> dict[str, Any]:
    """compressed-tensors ``QuantizationArgs`` fields for a ``QuantSpec``."""
    group = spec.granularity == "per_group"
    return {"num_bits": spec.bit, "type": "int", "symmetric": spec.symmetric, "strategy": "group" if group else "channel", "group_size": spec.group_size if group else None}


def _scheme(spec: Any) -> Any:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    return QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**weight_args(spec)))


def signed_parts(qw: Any, name: str = "layer") -> tuple[Any, Any, Any]:
    """``(codes int8 [out, in], scales float32 [out, cols], zeros int8 [out, cols])`` in
    compressed-tensors' signed convention (codes and zero points minus ``2^(bits-1)`` for
    asymmetric specs), per-tensor values repeated per channel."""
    import torch

    spec = qw.spec
    g_idx = getattr(qw, "g_idx", None)  # GPTQ act-order: which group each input column uses
    if g_idx is not None:
        trivial = spec.granularity == "per_group" and torch.equal(g_idx.cpu().long(), torch.arange(qw.codes.shape[1]) // spec.group_size)
        if not trivial:
            raise LlmcError(
                f"{name}: the layer carries a GPTQ act-order group index (g_idx) whose groups are not consecutive columns; "
                "compressed-tensors dropped that form (actorder 'group', weight_g_idx), so vLLM cannot load it. "
                "Quantize with GPTQ's static groups (actorder 'weight'), or save it with save_fake."
            )
    out_f = qw.codes.shape[0]
    offset = 0 if spec.symmetric else 2 ** (spec.bit - 1)
    scales = qw.scales.detach().cpu().float().reshape(qw.scales.shape[0], -1)
    zeros = qw.zeros.detach().cpu().float().reshape(scales.shape).round()
    if scales.shape[0] != out_f:  # per tensor: one value, stored once per output channel
        scales, zeros = scales.expand(out_f, 1).contiguous(), zeros.expand(out_f, 1).contiguous()
    codes = (qw.codes.detach().cpu().to(torch.int16) - offset).to(torch.int8)
    return codes, scales, (zeros - offset).to(torch.int8)


def compress_layer(qw: Any, name: str = "layer") -> dict[str, Any]:
    """One layer's compressed tensors (local names: ``weight_packed``, ``weight_scale``, ...)."""
    import torch
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor, unpack_from_int32

    spec = qw.spec
    problems = ct_problems(spec.bit, spec.granularity, spec.group_size)
    if problems:
        raise LlmcError(*(f"{name}: {p}." for p in problems))
    codes, scales, zeros = signed_parts(qw, name)
    scheme = _scheme(spec)
    cols = scales.shape[1]
    group = codes.shape[1] // cols
    # the exact weight llmc computed, in float32, from which the package re-derives the codes
    weight = (codes.float() - zeros.float().repeat_interleave(group, dim=1)) * scales.repeat_interleave(group, dim=1)
    state = {"weight": weight, "weight_scale": scales, "weight_zero_point": zeros}
    out = dict(PackedQuantizationCompressor.compress(state, scheme))
    if not torch.equal(unpack_from_int32(out["weight_packed"], spec.bit, codes.shape), codes):
        raise RuntimeError(f"{name}: compressed-tensors packed integer codes that differ from llmc's; please report this as a bug.")
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


def quantization_config(spec: Any, ignore: list[str]) -> Any:
    """The compressed-tensors ``QuantizationConfig`` of the folder."""
    from compressed_tensors.quantization import QuantizationConfig

    return QuantizationConfig(config_groups={"group_0": _scheme(spec)}, format="pack-quantized", ignore=ignore, quantization_status="compressed")


def write_ct_folder(model: Any, quantized: Mapping[str, Any], folder: str | Path, tokenizer: Any = None, where: str = "save.save_vllm") -> dict[str, Any]:
    """Save ``model`` with the layers in ``quantized`` (full name -> ``QuantizedWeight``) compressed.

    ``model`` is left as it was. Returns the ``quantization_config`` written to ``config.json``.
    """
    import json

    from llmc_core.quant.awq_format import unquantized_linears

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
    problems = ct_problems(spec.bit, spec.granularity, spec.group_size)
    if problems:
        raise LlmcError(*(f"{where}: {p}. Use save.save_fake instead." for p in problems))
    state = dict(model.state_dict())
    for name, qw in quantized.items():
        del state[f"{name}.weight"]
        state.update({f"{name}.{key}": tensor for key, tensor in compress_layer(qw, name).items()})
    folder = Path(folder)
    model.save_pretrained(folder, state_dict=state, safe_serialization=True)
    qcfg = quantization_config(spec, unquantized_linears(model, quantized))
    ModelCompressor(quantization_config=qcfg).update_config(str(folder))
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return json.loads((folder / "config.json").read_text(encoding="utf-8"))["quantization_config"]
