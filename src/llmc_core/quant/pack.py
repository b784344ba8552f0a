"""AWQ "GEMM" packing: the int4 layout AutoAWQ writes and vLLM / transformers read.

For a linear layer with ``in`` inputs, ``out`` outputs and group size ``g``:

- ``qweight``: int32 ``[in, out / 8]``. Row ``k`` holds the codes of input ``k`` for all outputs;
  the int32 at column ``j`` packs outputs ``8j .. 8j+7``, output ``8j + AWQ_ORDER[i]`` in bits
  ``4i .. 4i+3``. Equivalently output ``8j + c`` sits at nibble ``AWQ_REVERSE_ORDER[c]``.
- ``qzeros``: int32 ``[in / g, out / 8]``, the zero points packed the same way.
- ``scales``: float16 ``[in / g, out]``.
- the weight is ``W[n, k] = (code[k, n] - zero[k // g, n]) * scale[k // g, n]``.

``QuantizedWeight`` keeps codes ``[out, in]`` (the ``nn.Linear`` layout) and scales/zeros
``[out, in / g]``; :func:`pack_awq` transposes and packs, :func:`unpack_awq` undoes it.
Symmetric int4 codes (``-8 .. 7``, zero 0) are stored as ``code + 8`` with zero point 8, which
dequantizes to the same values: the GEMM layout always carries zero points.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from llmc_core.errors import LlmcError
from llmc_core.quant.rules import awq_problems

if TYPE_CHECKING:
    from llmc_core.quant.fake import QuantizedWeight

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i holds column AWQ_ORDER[i] of its group of 8
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # column c sits at nibble AWQ_REVERSE_ORDER[c]
BITS = 4
PACK = 32 // BITS


@dataclass
class AwqTensors:
    """The three tensors of one AWQ GEMM layer (shapes in the module docstring)."""

    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    group_size: int

    @property
    def in_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def out_features(self) -> int:
        return self.scales.shape[1]


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """Pack ``[rows, cols]`` integers in ``0..15`` into int32 ``[rows, cols / 8]`` in AWQ order."""
    rows, cols = values.shape
    if cols % PACK:
        raise ValueError(f"pack_int4: {cols} columns is not a multiple of {PACK}")
    v = values.to(torch.int64).reshape(rows, cols // PACK, PACK)[..., list(AWQ_ORDER)]
    if v.numel() and (v.min() < 0 or v.max() > 15):
        raise ValueError("pack_int4: values must lie in 0..15")
    shifts = torch.arange(0, 32, BITS, dtype=torch.int64, device=values.device)
    packed = (v << shifts).sum(dim=-1)
    # int64 in [0, 2^32) to the int32 with the same bits (two's complement)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: int32 ``[rows, cols / 8]`` to uint8 ``[rows, cols]``."""
    rows, words = packed.shape
    shifts = torch.tensor(AWQ_REVERSE_ORDER, dtype=torch.int32, device=packed.device) * BITS
    nibbles = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & 0xF  # arithmetic shift; the mask drops the sign
    return nibbles.reshape(rows, words * PACK).to(torch.uint8)


def pack_awq(qw: QuantizedWeight, name: str = "layer") -> AwqTensors:
    """Pack one layer's :class:`~llmc_core.quant.fake.QuantizedWeight` into AWQ GEMM tensors.

    Raises :class:`LlmcError` for specs the layout cannot hold and for shapes it cannot take
    (``out`` not a multiple of 8). Scales are stored as float16 (exact when the spec's
    ``scale_dtype`` is ``float16``; otherwise rounded).
    """
    spec = qw.spec
    problems = awq_problems(spec.bit, spec.granularity, spec.group_size)
    if problems:
        raise LlmcError(*(f"{name}: {p}." for p in problems))
    out_f, in_f = qw.codes.shape
    g = spec.group_size
    if qw.g_idx is not None and not torch.equal(qw.g_idx.cpu(), torch.arange(in_f) // g):
        raise LlmcError(f"{name}: its quantization groups are not consecutive columns (GPTQ actorder without static_groups); the AWQ GEMM format cannot hold them. Use save_fake, or quant.special.static_groups: true.")
    if out_f % PACK or in_f % g:
        raise LlmcError(f"{name}: the AWQ GEMM format needs out_features divisible by {PACK} and in_features by the group size {g} (layer is {out_f}x{in_f}).")
    codes = qw.codes.to(torch.int32)
    zeros = qw.zeros.reshape(out_f, in_f // g).round().to(torch.int32)
    if spec.symmetric:  # -8..7 with zero 0  ->  0..15 with zero 8: the same (code - zero)
        codes = codes + 2 ** (BITS - 1)
        zeros = zeros + 2 ** (BITS - 1)
    scales = qw.scales.reshape(out_f, in_f // g).float()
    if not torch.isfinite(scales).all() or scales.abs().max() > 65504:
        raise LlmcError(f"{name}: a quantization scale does not fit in float16 (max {scales.abs().max().item():.3g}); the AWQ format cannot hold it. Use save_fake instead.")
    return AwqTensors(
        qweight=pack_int4(codes.t().contiguous()),
        qzeros=pack_int4(zeros.t().contiguous()),
        scales=scales.t().contiguous().to(torch.float16),
        group_size=g,
    )


def unpack_awq(t: AwqTensors) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(codes [out, in] uint8, zeros [out, in/g] uint8, scales [out, in/g] float16)``."""
    return unpack_int4(t.qweight).t().contiguous(), unpack_int4(t.qzeros).t().contiguous(), t.scales.t().contiguous()


def dequantize_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight ``[out, in]`` (``nn.Linear`` layout) of AWQ GEMM tensors.

    Computed in float32 and rounded once to ``dtype``: for a model quantized with
    ``scale_dtype: float16`` this equals the fake-quantized weight bit for bit, in any dtype.
    """
    codes_kn = unpack_int4(qweight)  # [in, out]
    zeros_kn = unpack_int4(qzeros).repeat_interleave(group_size, dim=0)
    scales_kn = scales.float().repeat_interleave(group_size, dim=0)
    w_kn = (codes_kn.float() - zeros_kn.float()) * scales_kn
    return w_kn.t().contiguous().to(dtype)
