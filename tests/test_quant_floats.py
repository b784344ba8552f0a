"""llmc_core.quant.floats against references written here: code tables decoded by hand from the
sign / exponent / mantissa bits, brute-force nearest-with-ties-to-even rounding over them, the OCP
MX spec's scale formula in plain Python, and compressed-tensors' own scale computation and
decompression for the exported NVFP4 / MXFP4 tensors."""

from __future__ import annotations

import functools
import math
import random
from bisect import bisect_left
from fractions import Fraction

import pytest
import torch

from llmc_core.errors import LlmcError
from llmc_core.quant import floats
from llmc_core.quant.floats import (
    FORMATS,
    dynamic_scale,
    e8m0_to_float,
    effective_scale,
    float_format,
    float_round,
    mx_scale,
    mx_scale_code,
    nvfp4_global_scale,
    nvfp4_group_scales,
)

NAN = float("nan")
INF = float("inf")


# --- code tables, decoded by hand --------------------------------------------------------------


def decode_e4m3fn(code: int) -> float:
    """OCP E4M3FN: bias 7, subnormals at exponent 0, S.1111.111 NaN, no infinities."""
    s, e, m = code >> 7, (code >> 3) & 0xF, code & 0x7
    sign = -1.0 if s else 1.0
    if e == 0xF and m == 0x7:
        return NAN
    if e == 0:
        return sign * (m / 8) * 2.0 ** (1 - 7)
    return sign * (1 + m / 8) * 2.0 ** (e - 7)


def decode_e5m2(code: int) -> float:
    """IEEE-style E5M2: bias 15, subnormals at exponent 0, exponent 31 inf (m = 0) / NaN."""
    s, e, m = code >> 7, (code >> 2) & 0x1F, code & 0x3
    sign = -1.0 if s else 1.0
    if e == 0x1F:
        return sign * INF if m == 0 else NAN
    if e == 0:
        return sign * (m / 4) * 2.0 ** (1 - 15)
    return sign * (1 + m / 4) * 2.0 ** (e - 15)


def decode_e2m1(code: int) -> float:
    """FP4 E2M1: bias 1, subnormal at exponent 0, no inf / NaN."""
    s, e, m = code >> 3, (code >> 1) & 0x3, code & 0x1
    sign = -1.0 if s else 1.0
    if e == 0:
        return sign * (m / 2) * 2.0 ** (1 - 1)
    return sign * (1 + m / 2) * 2.0 ** (e - 1)


TABLES = {
    "e4m3": [decode_e4m3fn(c) for c in range(256)],
    "e5m2": [decode_e5m2(c) for c in range(256)],
    "e2m1": [decode_e2m1(c) for c in range(16)],
}
MAN_BITS = {"e4m3": 3, "e5m2": 2, "e2m1": 1}


@functools.cache
def grid(name: str) -> tuple[list[float], dict[float, bool]]:
    """The sorted finite values of a format and, for each, whether its mantissa LSB is even."""
    even: dict[float, bool] = {}
    for code, v in enumerate(TABLES[name]):
        if math.isfinite(v):
            v = 0.0 if v == 0 else v  # one zero
            even[v] = (code & 1) == 0
    return sorted(even), even


def ref_round(v: float, name: str) -> float:
    """Nearest finite value of the table, ties to the even code, saturating at ±max."""
    values, even = grid(name)
    if v >= values[-1]:
        return values[-1]
    if v <= values[0]:
        return values[0]
    i = bisect_left(values, v)
    if values[i] == v:
        return v
    lo, hi = values[i - 1], values[i]
    d_lo, d_hi = Fraction(v) - Fraction(lo), Fraction(hi) - Fraction(v)
    if d_lo != d_hi:
        return lo if d_lo < d_hi else hi
    return lo if even[lo] else hi


def f32(v: float) -> float:
    return torch.tensor(v, dtype=torch.float32).item()


def next_up(v: float) -> float:
    return torch.nextafter(torch.tensor(v, dtype=torch.float32), torch.tensor(INF)).item()


def next_down(v: float) -> float:
    return torch.nextafter(torch.tensor(v, dtype=torch.float32), torch.tensor(-INF)).item()


def probe_values(name: str, seed: int = 0) -> list[float]:
    """Every value, every midpoint (a tie), one float32 ulp either side of each, saturation,
    zeros, below the smallest subnormal, and random values over the whole range; both signs."""
    values, _ = grid(name)
    pos = [v for v in values if v >= 0]
    top = pos[-1]
    out = [0.0, -0.0]
    for v in pos:
        out += [v, next_up(v), next_down(v)]
    for lo, hi in zip(pos, pos[1:]):
        mid = f32((lo + hi) / 2)
        assert mid == (lo + hi) / 2  # exact in float32
        out += [mid, next_up(mid), next_down(mid)]
    # beyond max: the tie with the value the exponent would reach next, and far out
    step = top - pos[-2]
    out += [top + step / 2, top + step, top * 1.01, top * 2, 1e30, f32(3.0e38)]
    # below the smallest subnormal: its half is a tie with 0
    sub = pos[1]
    out += [sub / 2, next_up(sub / 2), next_down(sub / 2), sub / 4, 1e-30, 1e-45]
    rng = random.Random(seed)
    lo_exp, hi_exp = math.log2(sub) - 3, math.log2(top) + 2
    out += [f32(2.0 ** rng.uniform(lo_exp, hi_exp)) for _ in range(4000)]
    return out + [-v for v in out]


# --- the tables themselves ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["e4m3", "e5m2", "e2m1"])
def test_format_constants_match_the_tables(name):
    f = FORMATS[name]
    values, _ = grid(name)
    assert f.max == values[-1] == -values[0]
    assert f.emax == math.floor(math.log2(f.max))
    assert f.min_subnormal == min(v for v in values if v > 0)
    assert f.man_bits == MAN_BITS[name]
    assert float_format(name.upper()) is f


def test_table_spot_values():
    assert grid("e4m3")[0][-1] == 448.0 and grid("e5m2")[0][-1] == 57344.0
    assert [v for v in grid("e2m1")[0] if v >= 0] == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    assert math.isnan(TABLES["e4m3"][0x7F]) and math.isnan(TABLES["e4m3"][0xFF])
    assert TABLES["e4m3"][0x7E] == 448.0 and TABLES["e4m3"][0x01] == 2.0**-9
    assert TABLES["e5m2"][0x7C] == INF and math.isnan(TABLES["e5m2"][0x7D]) and TABLES["e5m2"][0x01] == 2.0**-16
    assert sum(math.isnan(v) for v in TABLES["e4m3"]) == 2 and sum(math.isnan(v) for v in TABLES["e5m2"]) == 6


@pytest.mark.parametrize("name", ["e4m3", "e5m2"])
def test_torch_float8_dtype_decodes_like_the_table(name):
    """Sanity of the dtype float_round casts to: torch decodes every byte as the table does."""
    decoded = torch.arange(256, dtype=torch.uint8).view(FORMATS[name].torch_dtype).to(torch.float32).tolist()
    for code, (got, want) in enumerate(zip(decoded, TABLES[name])):
        assert (math.isnan(got) and math.isnan(want)) or got == want, (name, hex(code), got, want)


def test_unknown_format_is_a_user_error():
    with pytest.raises(LlmcError, match="e4m3"):
        float_format("e4m4")


# --- float_round against brute force ------------------------------------------------------------


@pytest.mark.parametrize("name", ["e4m3", "e5m2", "e2m1"])
def test_float_round_equals_nearest_even_by_table(name):
    xs = probe_values(name)
    want = torch.tensor([ref_round(v, name) for v in xs], dtype=torch.float32)
    x = torch.tensor(xs, dtype=torch.float32)
    before = x.clone()
    got = float_round(x, name)
    assert got.dtype == torch.float32 and got.shape == x.shape
    assert torch.equal(x, before), "float_round wrote into its input"
    assert torch.isfinite(got).all()
    bad = (got != want).nonzero().flatten().tolist()
    assert not bad, [(xs[i], got[i].item(), want[i].item()) for i in bad[:10]]


@pytest.mark.parametrize(
    ("name", "cases"),
    [
        # ties between neighbours go to the even code; saturation; subnormal ties
        ("e2m1", [(0.25, 0.0), (0.75, 1.0), (1.25, 1.0), (1.75, 2.0), (2.5, 2.0), (3.5, 4.0), (5.0, 4.0), (6.5, 6.0), (7.0, 6.0), (100.0, 6.0), (-5.0, -4.0), (-0.25, 0.0)]),
        ("e4m3", [(464.0, 448.0), (1e6, 448.0), (-1e6, -448.0), (2.0**-10, 0.0), (3 * 2.0**-10, 2 * 2.0**-9), (5 * 2.0**-10, 2 * 2.0**-9), (17.0, 16.0), (19.0, 20.0), (-19.0, -20.0)]),
        ("e5m2", [(61440.0, 57344.0), (1e9, 57344.0), (2.0**-17, 0.0), (3 * 2.0**-17, 2 * 2.0**-16), (2.5, 2.5), (2.25 + 2.0**-6, 2.5), (2.25, 2.0), (2.75, 3.0)]),
    ],
)
def test_float_round_named_cases(name, cases):
    x = torch.tensor([c[0] for c in cases])
    want = torch.tensor([c[1] for c in cases])
    assert torch.equal(float_round(x, name), want)


@pytest.mark.parametrize("name", ["e4m3", "e5m2", "e2m1"])
def test_float_round_saturates_infinities_and_takes_bf16(name):
    m = FORMATS[name].max
    assert float_round(torch.tensor([INF, -INF]), name).tolist() == [m, -m]
    x = torch.randn(257, dtype=torch.bfloat16) * 4
    assert torch.equal(float_round(x, name), float_round(x.float(), name))


def test_float_round_large_tensor_equals_per_value_reference():
    """The vectorised e2m1 path over a large random tensor against the table's midpoints."""
    x = torch.randn(512, 1024, generator=torch.Generator().manual_seed(1)) * 3
    got = float_round(x, "e2m1")
    vals = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    d = (x.abs().unsqueeze(-1) - vals).abs()
    nearest = vals[d.argmin(-1)]  # no exact ties among random normals times 3 at this size
    assert torch.equal(got.abs(), nearest)
    assert torch.equal(got, nearest.copysign(x))


# --- MX scales ----------------------------------------------------------------------------------


def spec_scale(amax: float, emax: int) -> float:
    """OCP MX v1.0: 2**(floor(log2(amax)) - emax_elem), clamped to E8M0's 2**-127 .. 2**127."""
    if amax == 0:
        return 2.0**-127
    m, e = math.frexp(amax)  # amax = m * 2**e, 0.5 <= m < 1
    return 2.0 ** max(-127, min(127, (e - 1) - emax))


def ct_rule_scale(amax: float, emax: int) -> float:
    """compressed-tensors 0.20's rule in words: amax rounded up to the next power of two when its
    significand is >= 1.75, then the spec's formula."""
    if amax == 0:
        return 2.0**-127
    m, e = math.frexp(amax)
    exp = (e - 1) + (1 if 2 * m >= 1.75 else 0)
    return 2.0 ** max(-127, min(127, exp - emax))


def amax_probes() -> list[float]:
    out = [0.0, 2.0**-149, 2.0**-130, 1e-40, 2.0**-126, 1e-30, 1e-10, 3.0e38, f32(1.7e38)]
    for k in range(-126, 128, 3):
        p = 2.0**k
        out += [p, next_up(p), next_down(p) if k > -126 else p, f32(1.5 * p), f32(1.75 * p), next_down(f32(1.75 * p)), f32(1.999 * p)]
    rng = random.Random(3)
    out += [f32(2.0 ** rng.uniform(-60, 60)) for _ in range(2000)]
    return [v for v in out if v < 3.4e38]


@pytest.mark.parametrize("name", ["e4m3", "e5m2", "e2m1"])
def test_mx_scale_spec_equals_the_formula(name):
    amax = amax_probes()
    want = torch.tensor([spec_scale(a, FORMATS[name].emax) for a in amax], dtype=torch.float32)
    got = mx_scale(torch.tensor(amax, dtype=torch.float32), name, convention="spec")
    assert got.dtype == torch.float32
    bad = (got != want).nonzero().flatten().tolist()
    assert not bad, [(amax[i], got[i].item(), want[i].item()) for i in bad[:10]]
    # the block's largest element lands in the format's top binade unless the clamp hits
    a = torch.tensor([1.0, 3.0, 5.9, 7.99, 448.0, 1e5])
    q = a / mx_scale(a, name, convention="spec")
    assert ((q >= 2.0 ** FORMATS[name].emax) & (q < 2.0 ** (FORMATS[name].emax + 1))).all()


@pytest.mark.parametrize("name", ["e4m3", "e2m1"])
def test_mx_scale_compressed_tensors_rule(name):
    amax = amax_probes()
    emax = FORMATS[name].emax
    want = torch.tensor([ct_rule_scale(a, emax) for a in amax], dtype=torch.float32)
    got = mx_scale(torch.tensor(amax, dtype=torch.float32), name)
    bad = (got != want).nonzero().flatten().tolist()
    assert not bad, [(amax[i], got[i].item(), want[i].item()) for i in bad[:10]]
    # where the two conventions differ: significand in [1.75, 2)
    assert mx_scale(torch.tensor([7.0]), "e2m1").item() == 2.0 and mx_scale(torch.tensor([7.0]), "e2m1", convention="spec").item() == 1.0
    assert mx_scale(torch.tensor([6.0]), "e2m1").item() == 1.0 == mx_scale(torch.tensor([6.0]), "e2m1", convention="spec").item()


def test_mx_scale_codes_and_zero_block():
    assert mx_scale_code(torch.tensor([0.0, 1.0, 6.0, 7.0, 2.0**127]), "e2m1").tolist() == [0, 125, 127, 128, 252]
    assert mx_scale_code(torch.tensor([0.0, 2.0**127, 2.0**-140]), "e2m1", convention="spec").tolist() == [0, 252, 0]
    assert mx_scale_code(torch.tensor([1.0]), "e2m1").dtype == torch.uint8
    assert e8m0_to_float(torch.tensor([0, 1, 126, 127, 128, 254], dtype=torch.uint8)).tolist() == [2.0**-127, 2.0**-126, 0.5, 1.0, 2.0, 2.0**127]
    assert torch.equal(e8m0_to_float(torch.arange(255, dtype=torch.uint8)), torch.tensor([2.0 ** (c - 127) for c in range(255)]))
    zeros = torch.zeros(4, 32)
    s = mx_scale(zeros.abs().amax(-1, keepdim=True), "e2m1")
    assert (float_round(zeros / s, "e2m1") * s == 0).all()
    with pytest.raises(ValueError, match="e5m2"):
        mx_scale(torch.tensor([1.0]), "e5m2")
    with pytest.raises(ValueError, match="convention"):
        mx_scale(torch.tensor([1.0]), "e2m1", convention="ocp")  # type: ignore[arg-type]


# --- NVFP4 formulas in plain Python -------------------------------------------------------------


def test_nvfp4_scales_equal_the_formula():
    rng = random.Random(5)
    amax_t = 3.7
    groups = [0.0, amax_t, 1e-9, 1e-6, 2.5e-3] + [rng.uniform(0, amax_t) for _ in range(300)]
    gs = nvfp4_global_scale(torch.tensor(amax_t))
    assert gs.dtype == torch.float32 and gs.shape == (1,)
    assert gs.item() == f32(2688.0 * f32(1.0 / f32(amax_t)))
    got = nvfp4_group_scales(torch.tensor(groups), gs)
    assert got.dtype == torch.float8_e4m3fn
    for a, s in zip(groups, got.float().tolist()):
        raw = f32(gs.item() * f32(f32(a) / 6.0))
        want = ref_round(raw, "e4m3")
        assert s == (want if want != 0 else 0.125), (a, s, want)
    # ``2688.0 / tensor`` in torch (compressed-tensors' expression) is ``tensor.reciprocal() * 2688``
    amaxes = [f32(2.0 ** rng.uniform(-30, 30)) for _ in range(2000)] + [1.0, 448.0, 6.0, 3.7, 1e-30, 3e38]
    got_gs = torch.cat([nvfp4_global_scale(torch.tensor(a)) for a in amaxes])
    assert got_gs.tolist() == [f32(2688.0 * f32(1.0 / a)) for a in amaxes]
    assert nvfp4_global_scale(torch.tensor(0.0)).item() == 1.0
    assert nvfp4_global_scale(torch.tensor(1e-45)).item() == 1.0


def test_effective_scale_is_one_division_in_float32():
    s = torch.tensor([0.125, 448.0, 3.0 * 2**-9]).to(torch.float8_e4m3fn)
    gs = torch.tensor([2688.0 / 3.7])
    assert torch.equal(effective_scale(s, gs), s.float() / gs)
    assert torch.equal(effective_scale(torch.tensor([0, 127, 130], dtype=torch.uint8)), torch.tensor([2.0**-127, 1.0, 8.0]))
    assert torch.equal(effective_scale(torch.tensor([0.5], dtype=torch.bfloat16)), torch.tensor([0.5]))


def test_dynamic_scale_per_token():
    x = torch.tensor([[[1.0, -4.48, 2.0], [0.0, 0.0, 0.0]]])
    s = dynamic_scale(x, "e4m3")
    assert s.shape == (1, 2, 1)
    assert s[0, 0, 0].item() == f32(f32(4.48) / 448.0) and s[0, 1, 0].item() == torch.finfo(torch.float32).eps
    assert dynamic_scale(torch.tensor([[-255.0, 1.0]]), 8).item() == 2.0  # int8: amax / 127.5
    xb = torch.tensor([[3.0, -1.0]], dtype=torch.bfloat16)
    assert dynamic_scale(xb, "e4m3").dtype == torch.bfloat16
    with pytest.raises(ValueError):
        dynamic_scale(x, "e4m3", symmetric=False)


# --- compressed-tensors: its scales, its quantizer, its decompression of llmc's tensors ----------


def _weight(rows: int, cols: int, group: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    w[3, 5] = 0.7  # an outlier: the global amax
    w[1, :group] = 0.0  # an all-zero group
    w[2, group : 2 * group] *= 1e-7  # a group whose fp8 scale underflows
    return w


def _fp4_args(ct, group: int, scale_dtype):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationStrategy, QuantizationType

    strategy = QuantizationStrategy.TENSOR_GROUP if group == 16 else QuantizationStrategy.GROUP
    return QuantizationArgs(num_bits=4, type=QuantizationType.FLOAT, strategy=strategy, symmetric=True, group_size=group, scale_dtype=scale_dtype, zp_dtype=scale_dtype)


def test_nvfp4_export_roundtrip_equals_compressed_tensors():
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam

    rows, cols, group = 32, 256, 16
    w = _weight(rows, cols, group, seed=0)
    wg = w.reshape(rows, cols // group, group)
    # llmc's side
    gs = nvfp4_global_scale(w.abs().amax())
    scale = nvfp4_group_scales(wg.abs().amax(-1), gs)
    eff = effective_scale(scale, gs).unsqueeze(-1)
    q = float_round(wg / eff, "e2m1")
    w_hat = (q * eff).reshape(rows, cols)

    args = _fp4_args(ct, group, torch.float8_e4m3fn)
    # the scales compressed-tensors computes itself (llm-compressor's path)
    ct_gs = generate_gparam(w.min(), w.max())
    assert torch.equal(ct_gs, gs)
    ct_scale, _ = calculate_qparams(wg.amin(-1), wg.amax(-1), args, global_scale=ct_gs)
    assert torch.equal(ct_scale, scale.float())
    # its quantizer (float32) gives llmc's fake-quantized weight
    assert torch.equal(fake_quantize(w, scale.float(), torch.zeros_like(scale.float()), args, global_scale=gs), w_hat)
    # export llmc's tensors with its compressor, decompress them with it
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    stored = NVFP4PackedCompressor.compress({"weight": w, "weight_scale": scale.float(), "weight_global_scale": gs}, scheme)
    assert stored["weight_scale"].dtype == torch.float8_e4m3fn and torch.equal(stored["weight_scale"].float(), scale.float())
    back = NVFP4PackedCompressor.decompress(dict(stored), scheme)["weight"]
    assert back.dtype == floats.CT_FP4_DECOMPRESS_DTYPE
    assert torch.equal(back, w_hat.to(floats.CT_FP4_DECOMPRESS_DTYPE))
    assert (w_hat[1, :group] == 0).all() and torch.isfinite(w_hat).all()


def test_mxfp4_export_roundtrip_equals_compressed_tensors():
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.mxfp4.base import MXFP4PackedCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    rows, cols, group = 32, 256, 32
    w = _weight(rows, cols, group, seed=1)
    wg = w.reshape(rows, cols // group, group)
    # rows 5..8: blocks of amax 6 * 2**-8 (scale 2**-8 by either rule) holding exact fp4 ties
    k = 2.0**-8
    wg[5:9] = wg[5:9].clamp(-5 * k, 5 * k)
    wg[5:9, :, 0] = 6.0 * k
    for j, tie in enumerate([2.5, -0.25, 5.0, 1.75, -0.75, 3.5, 1.25], start=1):
        wg[5:9, :, j] = tie * k
    assert (mx_scale(wg.abs().amax(-1), "e2m1")[5:9] == k).all()
    amax = wg.abs().amax(-1)
    args = _fp4_args(ct, group, torch.uint8)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    ct_scale, _ = calculate_qparams(wg.amin(-1), wg.amax(-1), args)
    for convention in ("compressed-tensors", "spec"):
        s = mx_scale(amax, "e2m1", convention=convention)
        code = mx_scale_code(amax, "e2m1", convention=convention)
        if convention == "compressed-tensors":
            assert torch.equal(ct_scale, s)  # compressed-tensors' own MX rule
        q = float_round(wg / s.unsqueeze(-1), "e2m1")
        w_hat = (q * s.unsqueeze(-1)).reshape(rows, cols)
        stored = MXFP4PackedCompressor.compress({"weight": w, "weight_scale": s}, scheme)
        assert torch.equal(stored["weight_scale"], code)
        back = MXFP4PackedCompressor.decompress(dict(stored), scheme)["weight"]
        assert torch.equal(back.float(), w_hat)  # exact: q * 2**k needs 2 significant bits


@pytest.mark.parametrize("bits", [4, 8])
def test_mx_scale_equals_compressed_tensors_calculate_qparams(bits):
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationArgs, QuantizationStrategy, QuantizationType
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    args = QuantizationArgs(num_bits=bits, type=QuantizationType.FLOAT, strategy=QuantizationStrategy.GROUP, symmetric=True, group_size=32, scale_dtype=torch.uint8, zp_dtype=torch.uint8)
    amax = torch.tensor([a for a in amax_probes() if a < 1.0e38], dtype=torch.float32)
    ct_scale, _ = calculate_qparams(-amax, amax, args)
    ours = mx_scale(amax, "e2m1" if bits == 4 else "e4m3")
    bad = (ct_scale != ours).nonzero().flatten().tolist()
    assert not bad, [(amax[i].item(), ct_scale[i].item(), ours[i].item()) for i in bad[:10]]


def test_dynamic_scale_equals_compressed_tensors():
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationArgs, QuantizationStrategy, QuantizationType
    from compressed_tensors.quantization.utils.helpers import compute_dynamic_scales_and_zp

    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(2))
    x[0, 1] = 0.0
    for dtype in (torch.float32, torch.bfloat16):
        xd = x.to(dtype)
        for qtype, bits, fmt in ((QuantizationType.FLOAT, 8, "e4m3"), (QuantizationType.INT, 8, 8)):
            args = QuantizationArgs(num_bits=bits, type=qtype, strategy=QuantizationStrategy.TOKEN, symmetric=True, dynamic=True)
            ct_scale, _ = compute_dynamic_scales_and_zp(xd, args, module=None)
            assert torch.equal(ct_scale, dynamic_scale(xd, fmt)), (dtype, fmt)
