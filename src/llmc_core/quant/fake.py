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
    """Reshape ``[..., out, in]`` to ``[..., rows, group]`` for ``spec``'s granularity
    (``per_token`` is ``per_channel`` of an activation's ``[tokens, in]``). ``per_block`` tiles
    are gathered into rows (a copy), row ``i * (in / c) + j`` holding tile ``(i, j)``;
    :func:`ungroup` puts them back."""
    out_f, in_f = w.shape[-2], w.shape[-1]
    lead = w.shape[:-2]
    if spec.granularity == "per_tensor":
        return w.reshape(*lead, 1, out_f * in_f)
    if spec.granularity in ("per_channel", "per_token"):
        return w
    if spec.granularity == "per_block":
        r, c = spec.block_size
        tiles = w.reshape(*lead, out_f // r, r, in_f // c, c).transpose(-3, -2)
        return tiles.reshape(*lead, (out_f // r) * (in_f // c), r * c)
    return w.reshape(*lead, out_f * (in_f // spec.group_size), spec.group_size)


def ungroup(wg: torch.Tensor, shape: torch.Size | tuple[int, ...], spec: QuantSpec) -> torch.Tensor:
    """The inverse of :func:`group_view`: ``[..., rows, group]`` back to ``shape`` (``[..., out, in]``)."""
    if spec.granularity != "per_block":
        return wg.reshape(shape)
    r, c = spec.block_size
    *lead, out_f, in_f = shape
    return wg.reshape(*lead, out_f // r, in_f // c, r, c).transpose(-3, -2).reshape(shape)


def qparams(wg: torch.Tensor, spec: QuantSpec, max_val: torch.Tensor | None = None, min_val: torch.Tensor | None = None, global_amax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zero points for grouped weights ``wg`` (``[..., rows, group]``).

    ``max_val``/``min_val`` (``[..., rows, 1]``) override the group's range, as weight clipping does.
    Returns ``(scale, zero)``, each ``[..., rows, 1]``; ``zero`` is 0 for symmetric specs. Float
    formats: ``scale`` is the one each value is divided by before rounding to the element format
    (NVFP4's FP8 group scale over its global scale; ``global_amax``: the whole tensor's ``max |w|``
    that global scale comes from, by default ``wg``'s own over its last two dimensions).
    """
    if spec.is_float:
        return _float_qparams(wg, spec, max_val, global_amax)
    if spec.symmetric:
        amax = wg.abs().amax(dim=-1, keepdim=True) if max_val is None else max_val
        if getattr(spec, "signed_scale", False):  # the group's peak lands on qmin, the longer end
            peak = wg.gather(-1, wg.abs().argmax(dim=-1, keepdim=True))
            scale = _stored_scale(torch.where(peak > 0, -1.0, 1.0) * amax.clamp(min=1e-5) / -spec.qmin, spec)
        else:
            scale = _stored_scale(amax.clamp(min=1e-5) / spec.qmax, spec)
        return scale, torch.zeros_like(scale)
    hi = wg.amax(dim=-1, keepdim=True) if max_val is None else max_val
    lo = wg.amin(dim=-1, keepdim=True) if min_val is None else min_val
    scale = _stored_scale((hi - lo).clamp(min=1e-5) / spec.qmax, spec)
    if float_min(spec):  # the group's min itself, as a GGUF Q4_1 block stores it
        return scale, lo.clamp(-65504.0, 65504.0).to(torch.float16).float()
    zero = torch.round(-lo / scale).clamp(spec.qmin, spec.qmax)
    return scale, zero


def float_min(spec: QuantSpec) -> bool:
    """``zero_dtype: float16``: ``zero`` holds the float16 min ``m`` (``w = q * scale + m``), not a code."""
    return getattr(spec, "zero_dtype", "int") == "float16"


def dequantize_codes(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec, inplace: bool = False) -> torch.Tensor:
    """Values of codes ``q`` (float32): ``(q - zero) * scale``, or ``q * scale + m`` with a float min;
    ``inplace`` overwrites ``q``."""
    if float_min(spec):
        return q.mul_(scale).add_(zero) if inplace else q * scale + zero
    return q.sub_(zero).mul_(scale) if inplace else (q - zero) * scale


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
        err = dequantize_codes(quantize_grouped(wg, scale, zero, spec, out=buf), scale, zero, spec, inplace=True).sub_(wg).abs_().pow_(MSE_NORM)
        err = (err if importance is None else err.mul_(importance)).sum(dim=-1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_hi = torch.where(better, hi, best_hi)
        best_lo = torch.where(better, lo, best_lo)
    return best_hi, best_lo


def _float_qparams(wg: torch.Tensor, spec: QuantSpec, max_val: torch.Tensor | None, global_amax: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    from llmc_core.quant import floats

    amax = wg.abs().amax(dim=-1, keepdim=True) if max_val is None else max_val
    kind = spec.fp4_kind
    if kind == "nvfp4":
        if global_amax is None:
            global_amax = amax.amax(dim=(-2, -1), keepdim=True)
        gs = floats.nvfp4_global_scale(global_amax)
        scale = floats.nvfp4_group_scales(amax, gs).float() / gs
    elif kind == "mxfp4":
        scale = floats.mx_scale(amax, spec.bit).float()
    else:
        scale = amax.float() / spec.qmax
        scale = torch.where(scale == 0, torch.finfo(torch.float32).eps, scale)
    return scale, torch.zeros_like(scale)


def global_scale(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor | None:
    """NVFP4's per-tensor float32 global scale of weight ``w`` (None for every other format)."""
    if spec.fp4_kind != "nvfp4":
        return None
    from llmc_core.quant import floats

    return floats.nvfp4_global_scale(w.detach().float().abs().amax().reshape(1))


def codes_dtype(spec: QuantSpec) -> torch.dtype:
    """How a format's codes are held: int8/uint8 integers, FP8 as torch's float8 types, FP4's
    E2M1 values in ``float8_e4m3fn`` (every E2M1 value is exact there)."""
    if spec.is_float:
        return torch.float8_e5m2 if spec.bit == "e5m2" else torch.float8_e4m3fn
    return torch.int8 if spec.symmetric else torch.uint8


def _stored_scale(scale: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``scale`` as the export format stores it (``spec.scale_dtype``), kept in float32; a
    negative (``signed_scale``) scale is rounded by its magnitude."""
    if getattr(spec, "scale_dtype", "float32") != "float16":
        return scale
    if getattr(spec, "signed_scale", False):
        return torch.where(scale < 0, -1.0, 1.0) * scale.abs().clamp(max=65504.0).to(torch.float16).float().clamp(min=2.0**-24)
    # Rounded before the zero point and the codes are computed, so fake == exported, bit for bit.
    return scale.clamp(max=65504.0).to(torch.float16).float().clamp(min=2.0**-24)


def quantize_grouped(wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec, out: torch.Tensor | None = None) -> torch.Tensor:
    """Codes (as float32 values) of ``wg`` for the given scale and zero point: integers for int
    formats, the element format's values for float ones; one new tensor, or ``out`` (of the
    result's shape) when given, for a loop that reuses its temporary."""
    if spec.is_float:
        from llmc_core.quant.floats import float_round

        q = float_round(torch.div(wg, scale, out=out), spec.bit)
        return q if out is None else out.copy_(q)
    if float_min(spec):
        return torch.sub(wg, zero, out=out).div_(scale).round_().clamp_(spec.qmin, spec.qmax)
    return torch.div(wg, scale, out=out).round_().add_(zero).clamp_(spec.qmin, spec.qmax)


def fake_quantize(w: torch.Tensor, spec: QuantSpec, max_val: torch.Tensor | None = None, min_val: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize then dequantize ``w`` (``[..., out, in]``); returns a tensor of ``w``'s shape and dtype.
    Without ``max_val``/``min_val`` the range follows ``spec.calib_algo`` (as :func:`quantize_weight`)."""
    wg = group_view(w.float(), spec)
    if max_val is None and min_val is None:
        max_val, min_val = weight_range(wg, spec)
    scale, zero = qparams(wg, spec, max_val, min_val)
    q = quantize_grouped(wg, scale, zero, spec)
    return ungroup(dequantize_codes(q, scale, zero, spec), w.shape, spec).to(w.dtype)


@dataclass
class QuantizedWeight:
    """The integer form of one linear layer's weight.

    ``codes`` is ``[out, in]`` (uint8 for asymmetric, int8 for symmetric specs); ``scales`` and
    ``zeros`` are ``[out, in // group]`` (one column for per-channel, one value for per-tensor).
    ``g_idx`` (``[in]`` int64, per-group only) names the group of each input column when groups are
    not consecutive columns (GPTQ's act-order: groups formed in a permuted column order); None means
    column ``j`` is in group ``j // group_size``, the layout packed formats need.
    Float formats: ``codes`` holds the element values (``float8_e4m3fn`` / ``float8_e5m2``; FP4's
    E2M1 values in ``float8_e4m3fn``), ``zeros`` are 0, ``scales`` are what the values multiply
    (``[out / r, in / c]`` for ``per_block``), and NVFP4 keeps its per-tensor ``global_scale``
    (``scales`` are then the FP8 group scales divided by it).
    ``dequantize()`` gives back exactly the fake-quantized weight.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    spec: QuantSpec
    g_idx: torch.Tensor | None = None
    global_scale: torch.Tensor | None = None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        codes = self.codes
        out_f, in_f = codes.shape
        if self.g_idx is not None:
            idx = self.g_idx.to(codes.device)
            w = dequantize_codes(codes.float(), self.scales.float()[:, idx], self.zeros.float()[:, idx], self.spec)
            return w.to(dtype)
        wg = group_view(codes.float(), self.spec)
        rows = wg.shape[-2]
        w = dequantize_codes(wg, self.scales.reshape(rows, 1).float(), self.zeros.reshape(rows, 1).float(), self.spec)
        return ungroup(w, (out_f, in_f), self.spec).to(dtype)


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
    wf = w.detach().float()
    wg = group_view(wf, spec)
    gs = global_scale(wf, spec)
    gmax = wf.abs().amax() if gs is not None else None
    max_val, min_val = weight_range(wg, spec)
    scale, zero = qparams(wg, spec, max_val, min_val, global_amax=gmax)
    q = quantize_grouped(wg, scale, zero, spec)
    shape = _param_shape(spec, out_f, in_f)
    codes = ungroup(q, (out_f, in_f), spec).to(codes_dtype(spec))
    return QuantizedWeight(codes, scale.reshape(shape), zero.reshape(shape), spec, global_scale=gs)


def _param_shape(spec: QuantSpec, out_f: int, in_f: int) -> tuple[int, int]:
    """The ``[rows, cols]`` of a layer's scales and zero points."""
    if spec.granularity == "per_tensor":
        return (1, 1)
    if spec.granularity == "per_block":
        return (out_f // spec.block_size[0], in_f // spec.block_size[1])
    if spec.granularity == "per_group":
        return (out_f, in_f // spec.group_size)
    return (out_f, 1)


def column_qparams(cols: torch.Tensor, spec: QuantSpec, importance: torch.Tensor | None = None, global_amax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zero points for a ``[out, k]`` slice of weight columns, for methods that quantize
    column by column (GPTQ): the slice is one group's columns (``per_group``), one column of
    tiles (``per_block``: each tile's parameters repeated over its rows, ``[out, 1]``), or the
    whole weight (``per_channel``: ``[out, 1]`` each; ``per_tensor``: ``[1, 1]``). Same rule as
    :func:`qparams`; ``importance`` (``[k]``) weights the columns in ``calib_algo: mse``'s search;
    ``global_amax``: NVFP4's whole-weight ``max |w|``."""
    if spec.granularity == "per_block":
        r = spec.block_size[0]
        tiles = cols.float().reshape(cols.shape[0] // r, r * cols.shape[1])
        imp = None if importance is None else importance.repeat(r)
        scale, zero = qparams(tiles, spec, *weight_range(tiles, spec, imp))
        return scale.repeat_interleave(r, dim=0), zero.repeat_interleave(r, dim=0)
    wg = cols.float().reshape(1, -1) if spec.granularity == "per_tensor" else cols.float()
    if importance is not None and spec.granularity == "per_tensor":
        importance = importance.repeat(cols.shape[0])
    return qparams(wg, spec, *weight_range(wg, spec, importance), global_amax=global_amax)


def quantize_columns(cols: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, dequantized)`` of ``[out, k]`` columns under ``scale``/``zero`` from
    :func:`column_qparams` (broadcast over the columns); the same operations as
    :func:`fake_quantize`, so equal inputs and parameters give bit-identical values."""
    q = quantize_grouped(cols.float(), scale, zero, spec)
    return q, dequantize_codes(q, scale, zero, spec)


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
    if spec.granularity == "per_block":  # tiles are a copy, not a view: write the result back
        w.copy_(fake_quantize(w, spec))
        return w
    wg = group_view(w, spec)
    scale, zero = qparams(wg, spec)
    q = quantize_grouped(wg, scale, zero, spec)
    wg.copy_(dequantize_codes(q, scale, zero, spec, inplace=True))
    return w


def fake_quantize_act(x: torch.Tensor, spec: QuantSpec, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize-dequantize activations ``x`` (``[..., in]``) under ``spec``: ``per_token`` and
    ``per_group`` scales from each token's values, a dynamic ``per_tensor`` scale from the whole
    input, or the calibrated ``scale`` of a ``static`` spec (NVFP4: the static *global* scale's
    ``max |x|``, with dynamic group scales under it). Computed in float32, returned in ``x``'s dtype."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).float()
    wg = group_view(x2, spec)
    if spec.static and spec.fp4_kind == "nvfp4":
        s, zero = qparams(wg, spec, global_amax=scale)
    elif spec.static:
        s, zero = scale.float().reshape(1, 1), torch.zeros(1, 1, device=x.device)
    else:
        s, zero = qparams(wg, spec)
    q = quantize_grouped(wg, s, zero, spec)
    return ungroup(dequantize_codes(q, s, zero, spec), x2.shape, spec).reshape(shape).to(x.dtype)


# ``calib_algo: mse`` for static activations: each observed input is searched on at most this many
# of its tokens (evenly strided, so outlier channels stay in), over MSE_ACT_STEPS shrink factors.
MSE_ACT_TOKENS, MSE_ACT_STEPS = 512, 40


def act_mse_threshold(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """The clipping threshold ``t`` (a ``max |x|`` stand-in, ``[1]`` float32) of a static per-tensor
    activation spec that minimises ``sum |x - q(x; static_scale(t))|^MSE_NORM`` over ``x``, for
    ``t = max|x| * (1 - i/MSE_GRID)``, ``i < MSE_ACT_STEPS`` (first minimum wins)."""
    x2 = x.detach().reshape(-1, x.shape[-1])
    if x2.shape[0] > MSE_ACT_TOKENS:
        x2 = x2[:: -(-x2.shape[0] // MSE_ACT_TOKENS)]
    x2 = x2.float()
    amax = x2.abs().amax().reshape(1)
    best, best_err = amax, float("inf")
    for i in range(MSE_ACT_STEPS):
        t = amax * (1 - i / MSE_GRID)
        err = float((fake_quantize_act(x2, spec, static_scale(t, spec)) - x2).abs_().pow_(MSE_NORM).sum())
        if err < best_err:
            best, best_err = t, err
    return best


def static_scale(amax: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """The calibrated scale of a ``static`` activation spec from the observed ``max |x|``: what
    :func:`fake_quantize_act` takes (for NVFP4 that is the ``max |x|`` itself, the global scale's
    source)."""
    if spec.fp4_kind == "nvfp4":
        return amax.float().reshape(1)
    s = amax.float().reshape(1) / spec.qmax
    return torch.where(s == 0, torch.finfo(torch.float32).eps, s)
