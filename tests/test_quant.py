"""The one group-quantization implementation, checked against an independent loop."""

from __future__ import annotations

import pytest
import torch

from llmc_core.errors import LlmcError
from llmc_core.quant import QuantSpec, check_divisible, fake_quantize, quantize_weight


def reference_rtn(w: torch.Tensor, bit: int, group: int, symmetric: bool) -> torch.Tensor:
    """Row by row, group by group, the textbook formulas (llm-awq's pseudo_quantize_tensor)."""
    out = torch.empty_like(w)
    for r in range(w.shape[0]):
        for c in range(0, w.shape[1], group):
            g = w[r, c : c + group].double()
            if symmetric:
                qmax, qmin = 2 ** (bit - 1) - 1, -(2 ** (bit - 1))
                s = max(g.abs().max().item(), 1e-5) / qmax
                q = torch.clamp(torch.round(g / s), qmin, qmax)
                out[r, c : c + group] = (q * s).float()
            else:
                qmax = 2**bit - 1
                lo, hi = g.min().item(), g.max().item()
                s = max(hi - lo, 1e-5) / qmax
                z = min(max(round(-lo / s), 0), qmax)
                q = torch.clamp(torch.round(g / s) + z, 0, qmax)
                out[r, c : c + group] = ((q - z) * s).float()
    return out


@pytest.mark.parametrize("bit", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_per_group_matches_reference(bit, symmetric):
    torch.manual_seed(bit)
    w = torch.randn(8, 64)
    spec = QuantSpec(bit=bit, symmetric=symmetric, granularity="per_group", group_size=16)
    ours = fake_quantize(w, spec)
    ref = reference_rtn(w, bit, 16, symmetric)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


def test_levels_per_group_are_bounded():
    w = torch.randn(4, 128)
    spec = QuantSpec(bit=3, granularity="per_group", group_size=32)
    fq = fake_quantize(w, spec)
    for row in fq.reshape(-1, 32):
        assert row.unique().numel() <= 2**3


def test_per_channel_and_per_tensor():
    w = torch.randn(6, 40)
    ch = fake_quantize(w, QuantSpec(bit=4, granularity="per_channel"))
    torch.testing.assert_close(ch, reference_rtn(w, 4, 40, False), rtol=0, atol=1e-5)
    t = fake_quantize(w, QuantSpec(bit=4, granularity="per_tensor"))
    assert t.unique().numel() <= 16


@pytest.mark.parametrize("gran", ["per_group", "per_channel", "per_tensor"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_quantized_weight_dequantizes_to_fake_quant(gran, symmetric):
    w = torch.randn(16, 64)
    spec = QuantSpec(bit=4, symmetric=symmetric, granularity=gran, group_size=16 if gran == "per_group" else None)
    qw = quantize_weight(w, spec)
    assert qw.codes.dtype == (torch.int8 if symmetric else torch.uint8)
    assert int(qw.codes.min()) >= spec.qmin and int(qw.codes.max()) <= spec.qmax
    torch.testing.assert_close(qw.dequantize(), fake_quantize(w, spec), rtol=0, atol=0)


def test_batched_leading_dims_quantize_independently():
    w = torch.randn(3, 8, 32)
    spec = QuantSpec(bit=4, granularity="per_group", group_size=16)
    batched = fake_quantize(w, spec)
    for i in range(3):
        torch.testing.assert_close(batched[i], fake_quantize(w[i], spec))


def test_group_size_that_does_not_divide_names_layer_and_fits():
    class Lin:
        def __init__(self, k):
            self.in_features = k

    spec = QuantSpec(bit=4, granularity="per_group", group_size=128)
    with pytest.raises(LlmcError) as exc:
        check_divisible(spec, {"model.layers.0.self_attn.q_proj": Lin(576), "model.layers.0.mlp.down_proj": Lin(1536)})
    (line,) = exc.value.problems
    assert "group_size: 128 does not divide the input size 576 of layer model.layers.0.self_attn.q_proj" in line
    assert "Group sizes that fit every layer: 16, 32, 64." in line


def test_spec_rejects_group_size_with_per_channel():
    with pytest.raises(ValueError):
        QuantSpec(bit=4, granularity="per_channel", group_size=64)


# -- calib_algo: mse ------------------------------------------------------------------------------


def reference_mse(w: torch.Tensor, bit: int, group: int, symmetric: bool) -> torch.Tensor:
    """Group by group, every shrink factor 1, 0.99, ..., 0.21 of the min-max range, keeping the
    first with the smallest sum |w - q(w)|^2.4 (the GPTQ reference quantizer's mse search)."""
    out = torch.empty_like(w)
    for r in range(w.shape[0]):
        for c in range(0, w.shape[1], group):
            g = w[r, c : c + group]
            best, best_q = float("inf"), None
            for i in range(80):
                p = 1 - i / 100
                if symmetric:
                    qmax, qmin = 2 ** (bit - 1) - 1, -(2 ** (bit - 1))
                    s = max(float(g.abs().max()) * p, 1e-5) / qmax
                    q = torch.clamp(torch.round(g / s), qmin, qmax) * s
                else:
                    qmax = 2**bit - 1
                    lo, hi = float(g.min()) * p, float(g.max()) * p
                    s = max(hi - lo, 1e-5) / qmax
                    z = min(max(round(-lo / s), 0), qmax)
                    q = (torch.clamp(torch.round(g / s) + z, 0, qmax) - z) * s
                err = float((q - g).abs().pow(2.4).sum())
                if err < best:
                    best, best_q = err, q
            out[r, c : c + group] = best_q
    return out


@pytest.mark.parametrize("symmetric", [False, True])
def test_mse_range_matches_an_independent_search(symmetric):
    w = torch.randn(6, 64, generator=torch.Generator().manual_seed(3))
    w[0, 5] = 9.0  # an outlier: the full range wastes most levels of that group
    spec = QuantSpec(bit=3, symmetric=symmetric, group_size=16, calib_algo="mse")
    got = fake_quantize(w, spec)
    assert torch.allclose(got, reference_mse(w, 3, 16, symmetric), atol=1e-5)
    assert torch.equal(quantize_weight(w, spec).dequantize(), got)


def test_mse_never_loses_to_minmax_per_group_and_wins_overall():
    w = torch.randn(8, 128, generator=torch.Generator().manual_seed(4))
    minmax, mse = (fake_quantize(w, QuantSpec(bit=4, group_size=32, calib_algo=a)) for a in ("minmax", "mse"))
    err = lambda q: (q - w).abs().pow(2.4).reshape(8, 4, 32).sum(-1)  # noqa: E731
    assert (err(mse) <= err(minmax) + 1e-6).all()
    assert err(mse).sum() < 0.97 * err(minmax).sum()  # Gaussian groups: a shrunk range fits better
    assert torch.equal(minmax, fake_quantize(w, QuantSpec(bit=4, group_size=32)))  # minmax is the default


def test_mse_importance_weights_each_column_error():
    """A column that matters most (a massive input channel) is rounded as well as the full range
    rounds it, where the unweighted search trades it for the others; equal weights change
    nothing; per-element weights ([rows, k]) give the per-column ones' result."""
    from llmc_core.quant.fake import qparams, quantize_grouped, weight_range

    spec = QuantSpec(bit=3, symmetric=True, group_size=16, calib_algo="mse")
    wg = torch.randn(4, 16, generator=torch.Generator().manual_seed(2))
    wg[:, 0] = 6.0  # each row's outlier, in column 0: exact on the full symmetric range

    def col0_error(rng):
        scale, zero = qparams(wg, spec, *rng)
        return ((quantize_grouped(wg, scale, zero, spec) - zero) * scale - wg)[:, 0].abs()

    plain = weight_range(wg, spec)
    heavy = torch.ones(16)
    heavy[0] = 1e4
    weighted = weight_range(wg, spec, heavy)
    full = col0_error((None, None))
    assert (col0_error(plain) > full + 0.1).all()  # the unweighted search clips the outlier
    assert (col0_error(weighted) <= full + 1e-6).all()
    assert torch.equal(weight_range(wg, spec, torch.full((16,), 3.0))[0], plain[0])
    assert torch.equal(weight_range(wg, spec, heavy.expand(4, 16))[0], weighted[0])


def test_calib_algo_learnable_and_unknown_values_are_refused():
    with pytest.raises(ValueError, match="learnable .* is not implemented; use minmax or mse"):
        QuantSpec(bit=4, group_size=64, calib_algo="learnable")
    with pytest.raises(ValueError, match="minmax"):
        QuantSpec(bit=4, group_size=64, calib_algo="kl")


@pytest.mark.parametrize("bit,symmetric", [(2, True), (3, False), (4, False), (4, True), (5, False), (8, True)])
def test_codes_are_held_two_to_a_byte_when_they_fit_and_read_back_exactly(bit, symmetric):
    """Codes wait in memory for the whole run: those of 4 bits or fewer are held packed (half the
    bytes), and every read gives back the very codes, of every value and in their columns."""
    from llmc_core.quant.fake import QuantizedWeight, _Nibbles

    spec = QuantSpec(bit=bit, symmetric=symmetric, granularity="per_group", group_size=16)
    dtype = torch.int8 if symmetric else torch.uint8
    gen = torch.Generator().manual_seed(bit)
    codes = torch.randint(spec.qmin, spec.qmax + 1, (24, 64), generator=gen).to(dtype)
    codes[0, :2] = torch.tensor([spec.qmin, spec.qmax], dtype=dtype)  # both ends of the range
    qw = QuantizedWeight(codes.clone(), torch.ones(24, 4), torch.zeros(24, 4), spec)
    held = qw.__dict__["_codes"]
    assert isinstance(held, _Nibbles) == (bit <= 4)
    assert (held.data if bit <= 4 else held).numel() == codes.numel() // (2 if bit <= 4 else 1)
    assert qw.codes.dtype == dtype and torch.equal(qw.codes, codes)
    qw.codes = codes.flip(1)  # assigning packs again
    assert torch.equal(qw.codes, codes.flip(1))
    odd = QuantizedWeight(codes[:, :63].clone(), torch.ones(24, 4), torch.zeros(24, 4), spec)
    assert torch.equal(odd.codes, codes[:, :63])  # an odd width is held as it is
