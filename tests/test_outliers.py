"""Planted weight-outlier columns: the float model is unchanged, the columns are there, RTN feels them."""
from __future__ import annotations

import pytest
import torch
from test_rotation import CPU, batch_of, load, logits, rel_err, samples  # noqa: F401  (fixture)

from llmc.quant.primitives import QuantSpec, rtn_fake_quantize
from llmc.testing.outliers import plant_outlier_columns

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "llava_clip_llama", "gemma3", "internvl"]  # fused qkv, CLIP fc1->fc2, Gemma (1 + w) norms


def _weights(adapter) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().clone() for n, m in adapter.model.named_modules() if isinstance(m, torch.nn.Linear)}


@pytest.mark.parametrize("family", FAMILIES)
def test_planting_keeps_the_function(family, tiny_model, samples):
    adapter = load(tiny_model, family)
    batch = batch_of(adapter, samples)
    before, w0 = logits(adapter, batch), _weights(adapter)
    planted = plant_outlier_columns(adapter, scale=16.0, channels=2, seed=3)
    assert planted and all(len(ch) == 2 for ch in planted.values())
    assert rel_err(logits(adapter, batch), before) < 1e-5
    changed = {n for n, w in _weights(adapter).items() if not torch.equal(w, w0[n])}
    assert any(".visual." in n or "vision" in n for n in changed) and any("language_model" in n for n in changed)
    # a consumer column is exactly 16x its old self, the others are untouched
    block = adapter.blocks("language")[0]
    group = adapter.block_layout("language", block).groups[0]
    ch = planted["language.0." + group.name]
    name = f"{adapter.blocks_path('language')}.0.{group.linears[0]}"
    new, old = _weights(adapter)[name], w0[name]
    assert torch.equal(new[:, ch], old[:, ch] * 16)
    rest = [c for c in range(old.shape[1]) if c not in ch]
    assert torch.equal(new[:, rest], old[:, rest])


def test_outlier_columns_hurt_rtn_not_the_float_weights():
    """Per-group RTN error of the other weights grows when a group holds an outlier column."""
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    spec = QuantSpec(bits=3, symmetric=False, granularity="per_group", group_size=32)
    w_out = w.clone()
    w_out[:, 5] *= 16
    same_group = [c for c in range(32) if c != 5]
    base = (rtn_fake_quantize(w, spec) - w)[:, same_group].pow(2).mean()
    err = (rtn_fake_quantize(w_out, spec) - w_out)[:, same_group].pow(2).mean()
    assert err > 10 * base
    other_groups = slice(32, 128)  # groups without the outlier are untouched
    assert torch.equal(rtn_fake_quantize(w_out, spec)[:, other_groups], rtn_fake_quantize(w, spec)[:, other_groups])


def test_bad_arguments(tiny_model):
    adapter = load(tiny_model, "qwen2_vl")
    with pytest.raises(ValueError, match="scale must be > 0"):
        plant_outlier_columns(adapter, scale=0)
    with pytest.raises(ValueError, match="outlier channels asked"):
        plant_outlier_columns(adapter, channels=10_000)
