"""Float element formats (FP8 e4m3 / e5m2, FP4 e2m1) and their shared scales (MX, NVFP4).

The one implementation of the float math: the quantizer (``fake.py``) divides a group by a scale
from here and rounds the quotient with :func:`float_round`; the savers store the scales these
functions return. Everything works on float32 and is vectorised (no Python loop over elements).

Element formats (:data:`FORMATS`, ModelTC's names)
    ``e4m3``: OCP FP8 E4M3FN (bias 7, max 448, subnormals down to 2**-9, no inf; torch's
    ``float8_e4m3fn``). ``e5m2``: FP8 E5M2 (bias 15, max 57344, subnormals down to 2**-16; torch's
    ``float8_e5m2``). ``e2m1``: FP4 (bias 1, values ±{0, 0.5, 1, 1.5, 2, 3, 4, 6}; 0.5 is its one
    subnormal). ``emax`` is the largest normal exponent, floor(log2(max)): 8, 15, 2.

:func:`float_round` rounds to nearest, ties to even, and saturates at ±max (never inf/NaN for a
finite input; the sign of zero is not kept meaningful). FP8 clamps to ±max and casts to torch's
float8 dtypes (their casts round to nearest even, subnormals included: checked against a table of
all 256 codes in ``tests/test_quant_floats.py``). FP4 clamps to 6 and rounds with the
add-and-subtract trick ``(a + c) - c`` with ``c = 2**22, 2**23, 2**24`` for ``|x|`` below 2, below
4, from 4 on: float32 addition rounds to the nearest multiple of the spacing 0.5 / 1 / 2 of that
range, ties to even, which is exactly round-to-nearest-even on the e2m1 grid (an even multiple is
a value with mantissa bit 0). compressed-tensors' ``cast_to_fp4`` (the thresholds 0.25, 0.75,
1.25, 1.75, 2.5, 3.5, 5 with alternating ``<=`` / ``<``) is the same function.

MX shared scales (OCP Microscaling spec v1.0 against compressed-tensors 0.20)
    The spec (section 6.3): ``X = 2**(floor(log2(amax)) - emax_elem)`` per block of 32, an E8M0
    value (2**-127 .. 2**127, bias 127, code 255 NaN), the elements quantized with saturation.
    compressed-tensors 0.20 (``quantization/utils/mxfp_utils.py``: ``generate_mx_scales`` ->
    ``round_to_power_2``) first rounds amax to a power of two by adding a quarter of the float's
    mantissa range before truncating it (``1 << (mantissa - 1 - 1)``, FP4's 1-bit mantissa, also
    for MXFP8): amax whose significand is >= 1.75 goes UP to the next power of two, so the block's
    exponent is ``floor(log2(amax)) + 1`` there. The spec's scale would make such a block's amax
    land in [7, 8) * X for FP4 and saturate to 6; compressed-tensors halves the resolution of the
    block instead. Everywhere else the two agree (powers of two, amax 0 -> code 0 = 2**-127).
    :func:`mx_scale` / :func:`mx_scale_code` take ``convention="compressed-tensors"`` (default)
    or ``"spec"``. Why the default: for WEIGHTS the exported file stores the code, so either
    convention loads bit for bit; but compressed-tensors' own forward computes DYNAMIC MX
    activation scales with its rule, so llmc's fake-quantized activations only equal the
    loader's with that rule, and llm-compressor's MXFP4 checkpoints use it too. ``"spec"`` is the
    reference the tests check the formula against. compressed-tensors has no e5m2 MX
    (``_MX_ELEM_OFFSET`` knows FP4, FP6 and FP8 e4m3), so e5m2 accepts only ``"spec"``.
    compressed-tensors stores the code as ``uint8`` (``weight_scale``, ``127 + log2(scale)``);
    :func:`e8m0_to_float` decodes it, as its ``decompress_mx_scale`` does.

NVFP4 (compressed-tensors 0.20's ``nvfp4-pack-quantized``; what it stores and how it decodes)
    ``weight_global_scale`` (float32, shape [1]) = ``448 * 6 / amax(tensor)``
    (``helpers.generate_gparam``: amax clamped below at float32's ``tiny``, an inf or NaN result
    replaced by 1.0; written ``2688.0 / tensor``, which torch evaluates as ``2688 *
    reciprocal(amax)``, one float32 ulp off a true division for ~1 amax in 4: llmc keeps that
    expression); :func:`nvfp4_global_scale`. ``weight_scale`` (float8_e4m3fn, one per 16
    inputs) = ``fp8(global_scale * (amax_g / 6))`` in that float32 order, clamped to ±448, an exact
    0 replaced by 0.125 (``calculate_qparams`` with ``scale_dtype=float8_e4m3fn``: its eps for fp8,
    so the quantizer never divides by 0); :func:`nvfp4_group_scales`. Quantize and dequantize
    both divide by ``scale / global_scale`` computed once in float32
    (``forward_helpers._quantize`` / ``_dequantize``: ``scale = scale / global_scale``; ``x /
    scale``; ``q * scale``), NOT ``q * scale / global_scale``; :func:`effective_scale` is that
    divisor, so ``float_round(w / eff, "e2m1") * eff`` is, in float32, compressed-tensors' own
    ``fake_quantize`` and its decompression. One more step on load: ``NVFP4PackedCompressor``
    (and ``MXFP4PackedCompressor``) 0.20 unpack the codes as **bfloat16** (the default ``dtype``
    of ``unpack_fp4_from_uint8``) and return the weight in bfloat16 whatever the model's dtype:
    the loaded NVFP4 weight is ``bf16(q * eff)``, so a float32 llmc model equals it only after
    ``w_hat.to(torch.bfloat16)`` (:data:`CT_FP4_DECOMPRESS_DTYPE`). MXFP4's ``q * 2**k`` is exact
    in bfloat16 (2 significant bits), so there it changes nothing.

Dynamic per-token activation scales (:func:`dynamic_scale`) follow compressed-tensors'
``calculate_qparams`` too: ``amax / (range / 2)`` in the activation's dtype, where the range is
``max - min`` of the type: ``fmt.max`` for floats (448 for e4m3) but ``(2**bits - 1) / 2 = 127.5``
for int8 (not 127); an all-zero row gets the dtype's eps.

torch is imported at module import (the file table marks it); no other llmc import but ``errors``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from llmc_core.errors import LlmcError, did_you_mean

__all__ = [
    "CT_FP4_DECOMPRESS_DTYPE",
    "FORMATS",
    "FloatFormat",
    "MxConvention",
    "dynamic_scale",
    "e8m0_to_float",
    "effective_scale",
    "float_format",
    "float_round",
    "mx_scale",
    "mx_scale_code",
    "nvfp4_global_scale",
    "nvfp4_group_scales",
]


@dataclass(frozen=True)
class FloatFormat:
    """One float element format: ``(-1)**s * 2**(e - bias) * 1.m``, subnormals at ``e == 0``."""

    name: str
    exp_bits: int
    man_bits: int
    bias: int
    max: float  # largest finite magnitude (saturation bound)
    emax: int  # largest normal exponent, floor(log2(max))
    torch_dtype: torch.dtype | None  # the torch dtype whose cast rounds to it (None: FP4)

    @property
    def emin(self) -> int:
        """Smallest normal exponent (1 - bias)."""
        return 1 - self.bias

    @property
    def min_subnormal(self) -> float:
        return 2.0 ** (self.emin - self.man_bits)


FORMATS: dict[str, FloatFormat] = {
    "e4m3": FloatFormat("e4m3", 4, 3, 7, 448.0, 8, torch.float8_e4m3fn),
    "e5m2": FloatFormat("e5m2", 5, 2, 15, 57344.0, 15, torch.float8_e5m2),
    "e2m1": FloatFormat("e2m1", 2, 1, 1, 6.0, 2, None),
}

MxConvention = Literal["compressed-tensors", "spec"]

#: compressed-tensors 0.20 decompresses nvfp4/mxfp4-pack-quantized weights to this dtype.
CT_FP4_DECOMPRESS_DTYPE = torch.bfloat16

_F32_TINY = torch.finfo(torch.float32).tiny


def float_format(fmt: str | FloatFormat) -> FloatFormat:
    """The :class:`FloatFormat` named ``fmt`` (``e4m3``, ``e5m2``, ``e2m1``; case-insensitive)."""
    if isinstance(fmt, FloatFormat):
        return fmt
    found = FORMATS.get(str(fmt).strip().lower())
    if found is None:
        raise LlmcError(f"Unknown float format '{fmt}'. Available: {', '.join(FORMATS)}.{did_you_mean(str(fmt), FORMATS)}")
    return found


def float_round(x: torch.Tensor, fmt: str | FloatFormat) -> torch.Tensor:
    """``x`` (already divided by its scale) rounded to the nearest value of ``fmt``.

    Ties to even, saturating at ±``fmt.max``, subnormals as the format has them; returns a new
    float32 tensor of ``x``'s shape (``x`` is read, never written).
    """
    f = float_format(fmt)
    x = x.to(torch.float32)
    if f.torch_dtype is not None:
        return x.clamp(-f.max, f.max).to(f.torch_dtype).to(torch.float32)
    # e2m1: RNE to a multiple of the local spacing (0.5 below 2, 1 below 4, 2 from 4 on) by
    # float32 addition of c = spacing * 2**23, whose ulp in [c, 2c) is that spacing.
    a = x.abs().clamp_(max=f.max)
    c = torch.where(a < 2.0, 4194304.0, 8388608.0)  # 2**22, 2**23
    c.masked_fill_(a >= 4.0, 16777216.0)  # 2**24
    return a.add_(c).sub_(c).copysign_(x)


# ---------------------------------------------------------------------------------------------
# MX (E8M0 power-of-two block scales)


def _mx_emax(f: FloatFormat, convention: str) -> int:
    if convention not in ("compressed-tensors", "spec"):
        raise ValueError(f"MX convention must be 'compressed-tensors' or 'spec', not {convention!r}")
    if convention == "compressed-tensors" and f.name == "e5m2":
        raise ValueError("compressed-tensors has no MX scale rule for e5m2 elements; use convention='spec'")
    return f.emax


def mx_scale_code(amax: torch.Tensor, fmt: str | FloatFormat, convention: MxConvention = "compressed-tensors") -> torch.Tensor:
    """The E8M0 code (biased exponent, ``uint8`` 0..254) of each block's scale; see the module doc.

    ``amax``: each block's largest magnitude (>= 0, any shape, any float dtype; computed in
    float32, where every bf16 / fp16 value is exact). ``spec``: ``127 + floor(log2(amax)) -
    emax``; ``compressed-tensors``: amax first rounded up to the next power of two when its
    significand is >= 1.75. Clamped to 0..254 (2**-127 .. 2**127); amax 0 gives 0.
    """
    emax = _mx_emax(float_format(fmt), convention)
    bits = amax.to(torch.float32).abs().view(torch.int32)
    if convention == "compressed-tensors":
        bits = bits + (1 << 21)  # a quarter of the 23-bit mantissa: significand >= 1.75 carries
    # the float32 exponent field is 127 + floor(log2(amax)) for normal amax, 0 for zero/subnormal
    exp_field = torch.bitwise_right_shift(bits, 23)
    return (exp_field - emax).clamp_(0, 254).to(torch.uint8)


def e8m0_to_float(code: torch.Tensor) -> torch.Tensor:
    """Decode E8M0 codes (``uint8``, bias 127) to float32 ``2**(code - 127)``, exactly."""
    c = code.to(torch.int32)
    # normal float32 2**(c-127) has exponent field c; code 0 is the subnormal 2**-127 = bit 22
    bits = torch.where(c > 0, torch.bitwise_left_shift(c, 23), 1 << 22)
    return bits.view(torch.float32)


def mx_scale(amax: torch.Tensor, fmt: str | FloatFormat, convention: MxConvention = "compressed-tensors") -> torch.Tensor:
    """Each block's power-of-two scale as float32 (an E8M0 value): ``e8m0_to_float(mx_scale_code(...))``.

    Divide the block by it and round with :func:`float_round`; an all-zero block gets 2**-127,
    whose use yields zeros.
    """
    return e8m0_to_float(mx_scale_code(amax, fmt, convention))


# ---------------------------------------------------------------------------------------------
# NVFP4 (per-tensor float32 global scale, per-16 fp8 e4m3 group scales)

_E4M3 = FORMATS["e4m3"]
_E2M1 = FORMATS["e2m1"]


def nvfp4_global_scale(amax: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' ``weight_global_scale``: ``448 * 6 / amax`` as float32, shape ``[1]``.

    ``amax``: the whole tensor's largest magnitude (a one-element tensor). Like
    ``generate_gparam``: amax clamped below at float32's tiny, an inf/NaN result becomes 1.0.
    """
    a = amax.to(torch.float32).abs().reshape([1]).clamp(min=_F32_TINY)
    # compressed-tensors' expression ``float / tensor``, which torch computes as
    # ``tensor.reciprocal() * 2688`` (not a correctly rounded 2688 / amax): kept as is to match it
    gs = (_E4M3.max * _E2M1.max) / a
    return torch.nan_to_num(gs, nan=1.0, posinf=1.0, neginf=1.0)


def nvfp4_group_scales(amax_groups: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' ``weight_scale`` (``float8_e4m3fn``, ``amax_groups``' shape).

    ``fp8(global_scale * (amax_g / 6))``, clamped to ±448, a 0 replaced by 0.125 (its fp8 eps), as
    ``calculate_qparams`` computes them in float32.
    """
    amax_groups = amax_groups.to(torch.float32).abs()
    # a tensor divisor, as compressed-tensors': CUDA divides by a Python scalar as x * (1 / 6)
    six = torch.tensor(_E2M1.max, dtype=torch.float32, device=amax_groups.device)
    s = global_scale.to(torch.float32) * (amax_groups / six)
    s = s.clamp_(-_E4M3.max, _E4M3.max).to(torch.float8_e4m3fn)
    return torch.where(s.to(torch.float32) == 0, 0.125, s.to(torch.float32)).to(torch.float8_e4m3fn)


def effective_scale(scale: torch.Tensor, global_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The float32 divisor the quantizer uses for stored scales, as compressed-tensors computes it.

    ``scale``: NVFP4 ``float8_e4m3fn`` group scales (with their ``global_scale``), MX ``uint8``
    E8M0 codes, or any float scale (e.g. :func:`mx_scale`'s). Returns ``scale / global_scale``
    in float32 (one division, as compressed-tensors' quantize and dequantize do), or the float32
    scale itself. Fake quantization is ``float_round(w / eff, fmt) * eff``.
    """
    s = e8m0_to_float(scale) if scale.dtype == torch.uint8 else scale.to(torch.float32)
    if global_scale is None:
        return s
    return s / global_scale.to(torch.float32)


# ---------------------------------------------------------------------------------------------
# Dynamic per-token activation scales


def dynamic_scale(x: torch.Tensor, fmt_or_bits: str | FloatFormat | int, symmetric: bool = True) -> torch.Tensor:
    """Per-token (last dimension) symmetric scales, in ``x``'s dtype, shape ``[..., 1]``.

    ``amax / (range / 2)`` as compressed-tensors' ``calculate_qparams``: ``fmt.max`` for a float
    format, ``(2**bits - 1) / 2`` (127.5 for int8) for an int bit width; an all-zero row gets
    ``finfo(x.dtype).eps``. Asymmetric (zero-point) scales are not provided here.
    """
    if not symmetric:
        raise ValueError("dynamic_scale computes symmetric scales only")
    if isinstance(fmt_or_bits, int) and not isinstance(fmt_or_bits, bool):
        half_range = (2.0**fmt_or_bits - 1.0) / 2.0
    else:
        half_range = float_format(fmt_or_bits).max
    amax = x.abs().amax(dim=-1, keepdim=True)
    scale = amax / torch.tensor(half_range, dtype=x.dtype, device=x.device)
    return torch.where(scale == 0, torch.tensor(torch.finfo(x.dtype).eps, dtype=x.dtype, device=x.device), scale)
