"""Quantization primitives against hand-computed values."""
import pytest
import torch

from llmc.quant.primitives import (
    QuantSpec,
    compute_qparams,
    dequantize,
    fake_quantize,
    qrange,
    quantize,
    rtn_fake_quantize,
)


def test_asymmetric_per_group_by_hand():
    # one row, two groups of 4; 2-bit asymmetric -> 4 levels
    w = torch.tensor([[0.0, 1.0, 2.0, 3.0, -1.0, -0.5, 0.0, 0.5]])
    spec = QuantSpec(bits=2, symmetric=False, granularity="per_group", group_size=4)
    scale, zero = compute_qparams(w, spec)
    # group 0: min=0, max=3 -> s = 3/3 = 1, z = 0 ; group 1: min=-1, max=.5 -> s = 1.5/3 = .5, z = 2
    assert torch.allclose(scale, torch.tensor([[1.0, 0.5]]))
    assert torch.equal(zero, torch.tensor([[0.0, 2.0]]))
    q = quantize(w, scale, zero, spec)
    assert torch.equal(q, torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]], dtype=torch.int32))
    assert torch.allclose(dequantize(q, scale, zero), w)


def test_range_always_contains_zero():
    w = torch.tensor([[2.0, 3.0, 4.0, 5.0]])  # all positive: min widened to 0
    spec = QuantSpec(bits=2, symmetric=False, granularity="per_channel")
    scale, zero = compute_qparams(w, spec)
    assert torch.allclose(scale, torch.tensor([[5.0 / 3]])) and zero.item() == 0
    assert fake_quantize(torch.zeros(1, 4), scale, zero, spec).abs().max() == 0


def test_symmetric_grid_by_hand():
    w = torch.tensor([[-7.5, -3.0, 0.0, 1.0, 7.5, 2.2, -1.1, 4.0]])
    spec = QuantSpec(bits=4, symmetric=True, granularity="per_channel")
    scale, zero = compute_qparams(w, spec)
    assert torch.allclose(scale, torch.tensor([[1.0]])) and zero.item() == 0  # 7.5 / ((16-1)/2)
    q = quantize(w, scale, zero, spec)
    assert torch.equal(q, torch.tensor([[-8, -3, 0, 1, 7, 2, -1, 4]], dtype=torch.int32))  # 7.5 clamps to 7
    assert qrange(4, True) == (-8, 7) and qrange(4, False) == (0, 15)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_at_most_2_pow_bits_values_per_group(bits, symmetric):
    torch.manual_seed(0)
    w = torch.randn(16, 256) * torch.rand(16, 1) * 3
    spec = QuantSpec(bits=bits, symmetric=symmetric, granularity="per_group", group_size=64)
    wq = rtn_fake_quantize(w, spec)
    for g in wq.reshape(16, 4, 64).reshape(-1, 64):
        assert g.unique().numel() <= 2**bits
    # error bounded by half a step per element
    scale, _ = compute_qparams(w, spec)
    step = scale.repeat_interleave(64, dim=1)
    assert ((wq - w).abs() <= step / 2 + 1e-5).all()  # symmetric: +absmax clamps to 7s, still half a step


def test_fake_quantize_is_idempotent_and_keeps_dtype():
    w = torch.randn(8, 64, dtype=torch.bfloat16)
    spec = QuantSpec(bits=4, group_size=32)
    s, z = compute_qparams(w, spec)
    once = fake_quantize(w, s, z, spec)
    assert once.dtype == torch.bfloat16
    assert torch.equal(fake_quantize(once, s, z, spec), once)


def test_g_idx_matches_contiguous_groups():
    w = torch.randn(4, 64)
    spec = QuantSpec(bits=4, group_size=16)
    s, z = compute_qparams(w, spec)
    g_idx = torch.arange(64) // 16
    assert torch.equal(quantize(w, s, z, spec, g_idx), quantize(w, s, z, spec))


def test_bad_spec_messages():
    with pytest.raises(ValueError, match="bits=5|valid"):
        QuantSpec(bits=1)
    with pytest.raises(ValueError, match="group_size=0"):
        QuantSpec(group_size=0)
    with pytest.raises(ValueError, match="not divisible by group_size=128"):
        compute_qparams(torch.randn(2, 96), QuantSpec(group_size=128))
