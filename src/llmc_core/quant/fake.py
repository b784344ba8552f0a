"""Group quantization in torch: the one implementation every method uses.

Weights are ``[out, in]``. The helpers reshape them to ``[..., rows, group]`` so that one call
handles per-tensor, per-channel and per-group settings, and extra leading dimensions let a search
(AWQ's scale and clip grids) quantize many candidates in one batched call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from llmc_core.quant.spec import QuantSpec


def group_view(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Reshape ``[..., out, in]`` to ``[..., rows, group]`` for ``spec``'s granularity."""
    out_f, in_f = w.shape[-2], w.shape[-1]
    lead = w.shape[:-2]
    if spec.granularity == "per_tensor":
        return w.reshape(*lead, 1, out_f * in_f)
    if spec.granularity == "per_channel":
        return w
    return w.reshape(*lead, out_f * (in_f // spec.group_size), spec.group_size)


def qparams(wg: torch.Tensor, spec: QuantSpec, max_val: torch.Tensor | None = None, min_val: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zero points for grouped weights ``wg`` (``[..., rows, group]``).

    ``max_val``/``min_val`` (``[..., rows, 1]``) override the group's range, as weight clipping does.
    Returns ``(scale, zero)``, each ``[..., rows, 1]``; ``zero`` is 0 for symmetric specs.
    """
    if spec.symmetric:
        amax = wg.abs().amax(dim=-1, keepdim=True) if max_val is None else max_val
        scale = _stored_scale(amax.clamp(min=1e-5) / spec.qmax, spec)
        return scale, torch.zeros_like(scale)
    hi = wg.amax(dim=-1, keepdim=True) if max_val is None else max_val
    lo = wg.amin(dim=-1, keepdim=True) if min_val is None else min_val
    scale = _stored_scale((hi - lo).clamp(min=1e-5) / spec.qmax, spec)
    zero = torch.round(-lo / scale).clamp(spec.qmin, spec.qmax)
    return scale, zero


# ``calib_algo: mse``: shrink factors 1, 1 - 1/GRID, ... (MSE_STEPS of them), error norm NORM; the
# GPTQ reference quantizer's and ModelTC/llmc's settings.
MSE_GRID, MSE_STEPS, MSE_NORM = 100, 80, 2.4
MSE_CHUNK = 1 << 22  # elements of the weight searched at a time (16 MB in float32)


def weight_range(wg: torch.Tensor, spec: QuantSpec, importance: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(max_val, min_val)`` for :func:`qparams` under ``spec.calib_algo``: ``(None, None)`` (the
    groups' own min and max) for ``minmax``; for ``mse`` the min-max range of each group shrunk
    by the factor that minimises ``sum |w - q(w)|^MSE_NORM`` over the group (first minimum wins,
    so a group that no shrink helps keeps its full range). ``importance`` (``[k]``, one per
    column of a ``[rows, k]`` ``wg``) weights each column's error in that sum, e.g. the energy of
    the input it multiplies; ``[rows, k]``: one weight per element)."""
    if getattr(spec, "calib_algo", "minmax") != "mse":
        return None, None
    rows = max(1, MSE_CHUNK // max(1, wg.shape[-1]))  # a few temporaries of this size, whatever the layer
    weights = importance.split(rows, dim=-2) if importance is not None and importance.dim() > 1 else [importance] * -(-wg.shape[-2] // rows)
    parts = [_mse_range(part.float(), spec, imp) for part, imp in zip(wg.split(rows, dim=-2), weights)]
    return torch.cat([hi for hi, _ in parts], dim=-2), torch.cat([lo for _, lo in parts], dim=-2)


def _mse_range(wg: torch.Tensor, spec: QuantSpec, importance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    hi0 = wg.abs().amax(dim=-1, keepdim=True) if spec.symmetric else wg.amax(dim=-1, keepdim=True)
    lo0 = -hi0 if spec.symmetric else wg.amin(dim=-1, keepdim=True)
    best_err = torch.full_like(hi0, float("inf"))
    best_hi, best_lo = hi0.clone(), lo0.clone()
    buf = torch.empty_like(wg)  # one temporary for every step: a fresh one each time costs its page faults
    for i in range(MSE_STEPS):
        p = 1 - i / MSE_GRID
        hi, lo = hi0 * p, lo0 * p
        scale, zero = qparams(wg, spec, hi, lo)
        err = quantize_grouped(wg, scale, zero, spec, out=buf).sub_(zero).mul_(scale).sub_(wg).abs_().pow_(MSE_NORM)
        err = (err if importance is None else err.mul_(importance)).sum(dim=-1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_hi = torch.where(better, hi, best_hi)
        best_lo = torch.where(better, lo, best_lo)
    return best_hi, best_lo


def _stored_scale(scale: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``scale`` as the export format stores it (``spec.scale_dtype``), kept in float32."""
    if getattr(spec, "scale_dtype", "float32") != "float16":
        return scale
    # Rounded before the zero point and the codes are computed, so fake == exported, bit for bit.
    return scale.clamp(max=65504.0).to(torch.float16).float().clamp(min=2.0**-24)


def quantize_grouped(wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec, out: torch.Tensor | None = None) -> torch.Tensor:
    """Integer codes (as floats) of ``wg`` for the given scale and zero point: one new tensor, or
    ``out`` (of the result's shape) when given, for a loop that reuses its temporary."""
    return torch.div(wg, scale, out=out).round_().add_(zero).clamp_(spec.qmin, spec.qmax)


def fake_quantize(w: torch.Tensor, spec: QuantSpec, max_val: torch.Tensor | None = None, min_val: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize then dequantize ``w`` (``[..., out, in]``); returns a tensor of ``w``'s shape and dtype.
    Without ``max_val``/``min_val`` the range follows ``spec.calib_algo`` (as :func:`quantize_weight`)."""
    wg = group_view(w.float(), spec)
    if max_val is None and min_val is None:
        max_val, min_val = weight_range(wg, spec)
    scale, zero = qparams(wg, spec, max_val, min_val)
    q = quantize_grouped(wg, scale, zero, spec)
    return ((q - zero) * scale).reshape(w.shape).to(w.dtype)


@dataclass
class QuantizedWeight:
    """The integer form of one linear layer's weight.

    ``codes`` is ``[out, in]`` (uint8 for asymmetric, int8 for symmetric specs); ``scales`` and
    ``zeros`` are ``[out, in // group]`` (one column for per-channel, one value for per-tensor).
    ``g_idx`` (``[in]`` int64, per-group only) names the group of each input column when groups are
    not consecutive columns (GPTQ's act-order: groups formed in a permuted column order); None means
    column ``j`` is in group ``j // group_size``, the layout packed formats need.
    ``dequantize()`` gives back exactly the fake-quantized weight.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    spec: QuantSpec
    g_idx: torch.Tensor | None = None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        codes = self.codes
        out_f, in_f = codes.shape
        if self.g_idx is not None:
            idx = self.g_idx.to(codes.device)
            w = (codes.float() - self.zeros.float()[:, idx]) * self.scales.float()[:, idx]
            return w.to(dtype)
        wg = group_view(codes.float(), self.spec)
        rows = wg.shape[-2]
        w = (wg - self.zeros.reshape(rows, 1).float()) * self.scales.reshape(rows, 1).float()
        return w.reshape(out_f, in_f).to(dtype)


@dataclass(frozen=True)
class _Nibbles:
    """Codes of 4 bits or fewer held two to a byte: ``[rows, cols / 2]`` uint8, the even column in
    the low nibble; ``offset`` (8 for int8 codes in -8..7) is added before packing."""

    data: torch.Tensor
    dtype: torch.dtype
    offset: int

    @classmethod
    def pack(cls, codes: torch.Tensor) -> _Nibbles | torch.Tensor:
        """``codes`` packed, or ``codes`` itself when they do not fit 4 bits (or are not ``[rows,
        even cols]`` uint8/int8)."""
        if codes.ndim != 2 or codes.shape[1] % 2 or codes.dtype not in (torch.uint8, torch.int8) or not codes.numel():
            return codes
        offset = 8 if codes.dtype == torch.int8 else 0
        lo, hi = torch.aminmax(codes)
        if int(lo) + offset < 0 or int(hi) + offset > 15:
            return codes
        v = (codes.to(torch.int16) + offset).to(torch.uint8) if offset else codes
        return cls((v[:, 0::2] | (v[:, 1::2] << 4)).contiguous(), codes.dtype, offset)

    def unpack(self) -> torch.Tensor:
        rows, half = self.data.shape
        out = torch.empty(rows, half * 2, dtype=torch.uint8, device=self.data.device)
        out[:, 0::2] = self.data & 0xF
        out[:, 1::2] = self.data >> 4
        return (out.to(torch.int16) - self.offset).to(self.dtype) if self.offset else out


def _get_codes(self: QuantizedWeight) -> torch.Tensor:
    held = self.__dict__["_codes"]
    return held.unpack() if isinstance(held, _Nibbles) else held


def _set_codes(self: QuantizedWeight, codes: torch.Tensor) -> None:
    self.__dict__["_codes"] = _Nibbles.pack(codes)


# Every quantized layer's codes wait in memory until the model is saved (one byte per weight
# otherwise: 70 GB for a 70B model): 4-bit and narrower codes are held two to a byte, and
# ``codes`` gives a fresh unpacked tensor on each read (changing it in place changes nothing).
QuantizedWeight.codes = property(_get_codes, _set_codes, doc="``[out, in]`` integer codes (uint8 asymmetric, int8 symmetric).")  # type: ignore[assignment]


def quantize_weight(w: torch.Tensor, spec: QuantSpec) -> QuantizedWeight:
    """Round-to-nearest quantization of a ``[out, in]`` weight into a :class:`QuantizedWeight`."""
    out_f, in_f = w.shape
    wg = group_view(w.detach().float(), spec)
    scale, zero = qparams(wg, spec, *weight_range(wg, spec))
    q = quantize_grouped(wg, scale, zero, spec)
    cols = 1 if spec.granularity == "per_tensor" else wg.shape[0] // out_f
    shape = (1, 1) if spec.granularity == "per_tensor" else (out_f, cols)
    codes = q.reshape(out_f, in_f).to(torch.int8 if spec.symmetric else torch.uint8)
    return QuantizedWeight(codes, scale.reshape(shape), zero.reshape(shape), spec)


def column_qparams(cols: torch.Tensor, spec: QuantSpec, importance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zero points for a ``[out, k]`` slice of weight columns, for methods that quantize
    column by column (GPTQ): the slice is one group's columns (``per_group``), or the whole weight
    (``per_channel``: ``[out, 1]`` each; ``per_tensor``: ``[1, 1]``). Same rule as :func:`qparams`;
    ``importance`` (``[k]``) weights the columns in ``calib_algo: mse``'s search."""
    wg = cols.float().reshape(1, -1) if spec.granularity == "per_tensor" else cols.float()
    if importance is not None and spec.granularity == "per_tensor":
        importance = importance.repeat(cols.shape[0])
    return qparams(wg, spec, *weight_range(wg, spec, importance))


def quantize_columns(cols: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, dequantized)`` of ``[out, k]`` columns under ``scale``/``zero`` from
    :func:`column_qparams` (broadcast over the columns); the same operations as
    :func:`fake_quantize`, so equal inputs and parameters give bit-identical values."""
    q = quantize_grouped(cols.float(), scale, zero, spec)
    return q, (q - zero) * scale


@torch.no_grad()
def fake_quantize_linear(linear: torch.nn.Linear, spec: QuantSpec) -> QuantizedWeight:
    """Replace ``linear.weight`` by its fake-quantized value; return the integer form."""
    qw = quantize_weight(linear.weight, spec)
    linear.weight.data.copy_(qw.dequantize(linear.weight.dtype))
    return qw


def fake_quantize_(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """In-place :func:`fake_quantize` of a float32 ``w`` (``[..., out, in]``); returns ``w``.

    Same operations in the same order as :func:`fake_quantize` (so bit-identical results) but with
    one temporary instead of six: searches (AWQ's scale and clip grids) call it on a whole grid of
    candidates stacked along the leading dimensions, where memory traffic is the cost.
    """
    if w.dtype != torch.float32 or not w.is_contiguous():
        raise ValueError("fake_quantize_ needs a contiguous float32 tensor")
    wg = group_view(w, spec)
    scale, zero = qparams(wg, spec)
    q = quantize_grouped(wg, scale, zero, spec)
    wg.copy_(q.sub_(zero).mul_(scale))
    return w
