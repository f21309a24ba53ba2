"""AWQ and GPTQ end to end on every VLM family: vision and language quantized, outputs stay close."""
from __future__ import annotations

import pytest
import torch

from llmc.calib import load_samples
from llmc.config import parse_config
from llmc.models import load_adapter
from llmc.quant.fake_linear import FakeQuantLinear
from llmc.runner import quantize_model
from llmc.testing import vlm_families

FAMILIES = vlm_families()


@pytest.mark.parametrize("method", ["AWQ", "GPTQ"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_vision_and_language_quantized(tiny_model, calib_dir, tmp_path, family, method):
    mtype = FAMILIES[family]
    cfg = parse_config({
        "model": {"type": mtype, "path": str(tiny_model(family)), "dtype": "float32"},
        "calib": {"name": "custom_mm", "path": str(calib_dir), "n_samples": 2, "bs": 2, "seq_len": 512},
        "quant": {"method": method, "quant_objects": ["vision", "language"],
                  "weight": {"bit": 8, "group_size": 32}, "special": {"n_grid": 4} if method == "AWQ" else {}},
        "save": {"save_path": str(tmp_path / "out")},
    })
    adapter = load_adapter(mtype, cfg.model.path, dtype="float32")
    batch = adapter.batch_process(load_samples("custom_mm", calib_dir, 2), max_length=512)
    with torch.no_grad():
        ref = adapter.model(**batch).logits
    layers = quantize_model(cfg, adapter, torch.device("cpu"))
    parts = {p: adapter.blocks_path(p) for p in adapter.available_parts()}
    for part, prefix in parts.items():
        assert any(n.startswith(prefix) for n in layers), f"no {part} layer quantized"
    assert sum(isinstance(m, FakeQuantLinear) for m in adapter.model.modules()) == len(layers)
    with torch.no_grad():
        out = adapter.model(**batch).logits
    # W8: the quantized model stays close to the float one
    err = (out - ref).abs().max() / ref.abs().max()
    assert torch.isfinite(out).all() and err < 0.05, float(err)
