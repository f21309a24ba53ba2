"""Rotation of raw-weight writers (Gemma3 projector, LLaVA-NeXT image_newline), Mllama's projector, sandwich norms."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from test_rotation import CPU, batch_of, load, logits, rel_err, rotation, samples  # noqa: F401  (fixture)
from torch import nn

from llmc.algorithms.rotation import rotate_raw_weight
from llmc.quant.hadamard import rotation_matrix


def test_rotate_raw_weight_in_out_and_row():
    """``x @ W`` with ``W := W Q`` equals ``(x @ W) Q``; a row ``v := v Q``; shapes are checked by kind."""
    g = torch.Generator().manual_seed(0)
    w, v, x = torch.randn(32, 8, generator=g), torch.randn(8, generator=g), torch.randn(5, 32, generator=g)
    q = rotation_matrix(8, "random", 3)
    pw, pv = nn.Parameter(w.clone(), requires_grad=False), nn.Parameter(v.clone(), requires_grad=False)
    rotate_raw_weight(pw, "in_out", q, CPU)
    rotate_raw_weight(pv, "row", q, CPU)
    assert torch.allclose(x @ pw, (x.double() @ w.double() @ q).float(), atol=1e-5)
    assert torch.allclose(pv, (v.double() @ q).float(), atol=1e-6)
    with pytest.raises(ValueError, match="valid"):
        rotate_raw_weight(pv, "out_in", q, CPU)


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
def test_image_newline_not_rotated_breaks_images(family, tiny_model, samples, monkeypatch):
    """Control: without the raw ``image_newline`` row the rotated model differs on images."""
    adapter = load(tiny_model, family)
    batch = batch_of(adapter, samples)
    ref = logits(adapter, batch)
    targets = adapter.rotation_targets()
    assert [n for n, _ in targets.external_weights] == ["model.image_newline"]
    monkeypatch.setattr(adapter, "rotation_targets", lambda: replace(targets, external_weights=()))
    rotation().prepare_model(adapter, CPU)
    assert rel_err(logits(adapter, batch), ref) > 1e-3


def test_mllama_projector_is_not_a_residual_writer(tiny_model, samples, monkeypatch):
    """Control: the projector feeds cross-attention k/v only; rotating it as a writer breaks the model."""
    adapter = load(tiny_model, "mllama")
    batch = batch_of(adapter, samples)
    ref = logits(adapter, batch)
    targets = adapter.rotation_targets()
    assert not targets.external_writers and not targets.external_weights
    wrong = replace(targets, external_writers=("model.multi_modal_projector",))
    monkeypatch.setattr(adapter, "rotation_targets", lambda: wrong)
    rotation().prepare_model(adapter, CPU)
    assert rel_err(logits(adapter, batch), ref) > 1e-3


def test_sandwich_norms_refused_before_any_change(tiny_model):
    adapter = load(tiny_model, "gemma3")
    layout = adapter.block_layout("language", adapter.blocks("language")[0])
    assert "post_attention_layernorm" in layout.writer_norms
    emb = adapter.embed_tokens().weight.detach().clone()
    proj = adapter.model.get_parameter("model.multi_modal_projector.mm_input_projection_weight").detach().clone()
    with pytest.raises(ValueError, match="post_attention_layernorm"):
        rotation().prepare_model(adapter, CPU)
    assert torch.equal(adapter.embed_tokens().weight, emb)
    assert torch.equal(adapter.model.get_parameter("model.multi_modal_projector.mm_input_projection_weight"), proj)
