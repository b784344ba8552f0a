"""``W8A8Linear``: real 8-bit weights and activations for ``real_quant``.

INT8 W8A8 multiplies int8 activations by int8 weights with ``torch._int_mm`` (int32 accumulation);
FP8 W8A8 multiplies E4M3 by E4M3 with ``torch._scaled_mm`` (row-wise scales). Both exist on CPU
and CUDA in the torch llmc pins. The activations are quantized in the forward: per token (a
dynamic scale ``max|x| / qmax`` per row) or with the layer's calibrated static scale, the same
rule as :func:`llmc_core.quant.fake.fake_quantize_act`, so ``real_quant`` equals ``fake_quant`` up
to the order of the float32 sums.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llmc_core.quant.fake import codes_dtype


def w8a8_problems(scheme: Any) -> list[str]:
    """Why ``scheme`` is not one this module runs (empty list: it is)."""
    w, a = scheme.weight, scheme.act
    if a is None:
        return ["W8A8Linear runs 8-bit activations; the scheme quantizes weights only"]
    fp8 = w.is_float and w.bit == "e4m3" and a.is_float and a.bit == "e4m3"
    int8 = not w.is_float and w.bit == 8 and w.symmetric and not a.is_float and a.bit == 8 and a.symmetric
    out = []
    if not (fp8 or int8):
        out.append(f"real 8-bit layers run INT8 x INT8 (symmetric) or FP8 E4M3 x E4M3, not {scheme.describe()}")
    if w.granularity not in ("per_channel", "per_tensor"):
        out.append(f"real 8-bit layers take per-channel or per-tensor weight scales, not {w.granularity}")
    if a.granularity not in ("per_token", "per_tensor"):
        out.append(f"real 8-bit layers take per-token or per-tensor activation scales, not {a.granularity}")
    return out


class W8A8Linear(nn.Module):
    """``y = (q(x) · s_x) @ (W_q · s_w)ᵀ + b`` computed on 8-bit operands.

    Buffers: ``weight`` (int8 or ``float8_e4m3fn``, ``[out, in]``), ``weight_scale`` float32
    ``[out]``, ``input_scale`` float32 ``[1]`` (static activations only), ``bias``.
    """

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, act: Any, input_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.act = act
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", weight_scale.float().reshape(-1).expand(self.out_features).contiguous())
        self.register_buffer("input_scale", None if input_scale is None else input_scale.float().reshape(1))
        self.register_buffer("bias", None if bias is None else bias.detach())

    @classmethod
    def from_quantized(cls, qw: Any, act: Any, input_scale: torch.Tensor | None, bias: torch.Tensor | None, device: Any) -> W8A8Linear:
        codes = qw.codes.to(device)
        return cls(codes.to(codes_dtype(qw.spec)), qw.scales.to(device), act, None if input_scale is None else input_scale.to(device), bias)

    def _quantize_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        qmax = self.act.qmax
        if self.input_scale is not None:
            s = self.input_scale.expand(x.shape[0], 1)
        else:
            s = x.abs().amax(dim=-1, keepdim=True) / qmax
            s = torch.where(s == 0, torch.finfo(torch.float32).eps, s)
        if self.act.is_float:
            return (x / s).clamp(-qmax, qmax).to(torch.float8_e4m3fn), s
        return (x / s).round().clamp(self.act.qmin, qmax).to(torch.int8), s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).float()
        q, s = self._quantize_input(x2)
        if self.act.is_float:
            y = torch._scaled_mm(q, self.weight.t(), scale_a=s.contiguous(), scale_b=self.weight_scale.reshape(1, -1), out_dtype=torch.float32)
        else:
            m = q.shape[0]
            if q.is_cuda and m <= 16:  # cuBLAS' int8 GEMM wants more than 16 rows
                q = F.pad(q, (0, 0, 0, 17 - m))
            y = torch._int_mm(q, self.weight.t())[:m].float() * s * self.weight_scale.reshape(1, -1)
        if self.bias is not None:
            y = y + self.bias.float()
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        kind = "fp8" if self.act.is_float else "int8"
        return f"in_features={self.in_features}, out_features={self.out_features}, {kind} x {kind}, act={'static' if self.input_scale is not None else 'per-token'}"
