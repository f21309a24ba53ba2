"""bench/awq_rounding.py: its emulation reproduces compressed-tensors' RTN arithmetic step for step."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import awq_rounding as ar


def _weights() -> torch.Tensor:
    torch.manual_seed(0)
    w = torch.randn(64, 512) * 0.02
    w[:, 7] *= 30  # an AWQ-scaled outlier column: large codes, where bf16 steps are coarse
    return w.to(torch.bfloat16)


def test_emulation_matches_the_library_in_bf16_and_float32():
    w = _weights()
    assert torch.equal(ar.emulated_rtn("SZQA")(w), ar.ct_rtn(torch.bfloat16)(w))
    assert torch.equal(ar.emulated_rtn("")(w), ar.ct_rtn(torch.float32)(w))


def test_bf16_arithmetic_changes_codes_and_llmc_matches_float32():
    w = _weights()
    bf16, f32, llmc = ar.ct_rtn(torch.bfloat16)(w), ar.ct_rtn(torch.float32)(w), ar.llmc_rtn(w)
    assert not torch.equal(bf16, f32)
    assert (llmc != f32).float().mean() < 1e-2  # one formula; float32 sums near ties round apart
    err = lambda q: float(((q.float() - w.float()) ** 2).sum())
    assert err(llmc) <= err(bf16) * 1.01
