"""``QuantLinear``: a linear layer holding real int4 weights in the AWQ GEMM layout.

Its buffers are named as AutoAWQ names them (``qweight``, ``qzeros``, ``scales``, ``bias``), so a
model's ``state_dict`` with these modules in place is an AWQ checkpoint. The forward pass runs the
Triton W4A16 kernel (:mod:`llmc_core.quant.kernels`) for float16/bfloat16 inputs on CUDA and the
torch reference everywhere else: unpack, dequantize in float32, ``F.linear``. For a model quantized
with ``scale_dtype: float16`` the reference computes exactly what the fake-quantized model does.

:func:`quant_linears` swaps a model's quantized ``nn.Linear`` layers for ``QuantLinear`` modules
(built from ``Run.quantized``) for the duration of a ``with`` block, then puts the originals back.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llmc_core.errors import LlmcError
from llmc_core.quant.pack import PACK, AwqTensors, dequantize_awq, pack_awq


class QuantLinear(nn.Module):
    """A 4-bit AWQ-GEMM linear layer: ``y = x @ dequant(qweight).T + bias``.

    Buffers: ``qweight`` int32 ``[in, out/8]``, ``qzeros`` int32 ``[in/g, out/8]``, ``scales``
    float16 ``[in/g, out]``, optional ``bias`` ``[out]`` (kept in the float model's dtype).
    """

    def __init__(self, in_features: int, out_features: int, group_size: int, bias: bool = False, bias_dtype: torch.dtype = torch.float16, device: Any = None):
        super().__init__()
        if out_features % PACK or in_features % group_size:
            raise ValueError(f"QuantLinear: out_features ({out_features}) must be a multiple of {PACK} and in_features ({in_features}) of group_size ({group_size})")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        self.register_buffer("qweight", torch.zeros(in_features, out_features // PACK, dtype=torch.int32, device=device))
        self.register_buffer("qzeros", torch.zeros(groups, out_features // PACK, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=torch.float16, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, device=device) if bias else None)

    @classmethod
    def from_awq(cls, t: AwqTensors, bias: torch.Tensor | None = None) -> QuantLinear:
        """A module around already-packed tensors (they are used, not copied)."""
        dev = t.qweight.device
        mod = cls(t.in_features, t.out_features, t.group_size, bias is not None, bias.dtype if bias is not None else torch.float16, device="meta")
        mod.qweight, mod.qzeros, mod.scales = t.qweight, t.qzeros.to(dev), t.scales.to(dev)
        mod.bias = None if bias is None else bias.detach().to(dev)
        return mod

    @classmethod
    def from_quantized(cls, qw: Any, bias: torch.Tensor | None = None, name: str = "layer", device: Any = None) -> QuantLinear:
        """Pack a :class:`~llmc_core.quant.fake.QuantizedWeight` (see :func:`~llmc_core.quant.pack.pack_awq`)."""
        t = pack_awq(qw, name)
        if device is not None:
            t = AwqTensors(t.qweight.to(device), t.qzeros.to(device), t.scales.to(device), t.group_size)
        return cls.from_awq(t, None if bias is None else bias.to(t.qweight.device))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight ``[out, in]``, computed in float32 and rounded once to ``dtype``."""
        return dequantize_awq(self.qweight, self.qzeros, self.scales, self.group_size, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from llmc_core.quant import kernels

        if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and kernels.available():
            out = kernels.w4a16_matmul(x.reshape(-1, self.in_features), self.qweight, self.qzeros, self.scales, self.group_size)
            out = out.reshape(*x.shape[:-1], self.out_features)
            return out if self.bias is None else out + self.bias.to(out.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, w_bit=4, group_size={self.group_size}"


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def replace_linears(model: nn.Module, quantized: Mapping[str, Any], scheme: Any = None, act_scales: Mapping[str, Any] | None = None) -> dict[str, nn.Module]:
    """Swap each layer named in ``quantized`` (full name -> ``QuantizedWeight``) for a
    :class:`QuantLinear` (W4A16) or, when ``scheme`` quantizes activations to 8 bits, a
    :class:`~llmc_core.quant.w8a8.W8A8Linear` (which quantizes its input itself; the fake
    activation quantizer stays on the replaced module) on the same device; return the replaced
    modules by name."""
    originals: dict[str, nn.Module] = {}
    try:
        for name, qw in quantized.items():
            try:
                linear = model.get_submodule(name)
            except AttributeError as exc:
                raise LlmcError(f"{name}: quantized layer not found in the model; were the layers renamed after quantization?") from exc
            if not isinstance(linear, nn.Linear):
                raise LlmcError(f"{name}: expected an nn.Linear to replace, found {type(linear).__name__}.")
            if scheme is not None and scheme.act is not None:
                from llmc_core.quant.w8a8 import W8A8Linear

                static = (act_scales or {}).get(name) if scheme.act.static else None
                q = W8A8Linear.from_quantized(qw, scheme.act, static, linear.bias, linear.weight.device)
            else:
                q = QuantLinear.from_quantized(qw, linear.bias, name, device=linear.weight.device)
            parent, child = _parent(model, name)
            setattr(parent, child, q)
            originals[name] = linear
    except BaseException:
        restore_linears(model, originals)
        raise
    return originals


def restore_linears(model: nn.Module, originals: Mapping[str, nn.Module]) -> None:
    """Put back the modules :func:`replace_linears` returned, on the device the model moved them to."""
    for name, linear in originals.items():
        parent, child = _parent(model, name)
        current = getattr(parent, child)
        held = getattr(current, "qweight", None) if isinstance(current, QuantLinear) else getattr(current, "weight", None)
        device = held.device if held is not None and not isinstance(current, nn.Linear) else None
        setattr(parent, child, linear.to(device) if device is not None else linear)


@contextmanager
def quant_linears(model: nn.Module, quantized: Mapping[str, Any], scheme: Any = None, act_scales: Mapping[str, Any] | None = None) -> Iterator[nn.Module]:
    """``with quant_linears(model, run.quantized): ...`` runs ``model`` with real int4 layers
    (with ``scheme`` and its static ``act_scales``: real W8A8 layers where the scheme is one)."""
    if not quantized:
        raise LlmcError("No quantized layers to pack: the quant method returned no integer weights (Run.quantized is empty).")
    originals = replace_linears(model, quantized, scheme, act_scales)
    try:
        yield model
    finally:
        restore_linears(model, originals)
