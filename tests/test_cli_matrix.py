"""Every algorithm through the CLI on a tiny VLM, language only and vision + language."""
from __future__ import annotations

import json

import pytest
import torch
import yaml
from transformers import AutoModelForImageTextToText

from llmc.cli import main

METHODS = {
    "RTN": ({"method": "RTN"}, "w4ag32"),
    "AWQ": ({"method": "AWQ", "special": {"n_grid": 4, "clip_grid": 4}}, "w4ag32"),
    "GPTQ": ({"method": "GPTQ", "special": {"actorder": True}}, "w4ag32"),
    "Rotation+GPTQ": ({"method": ["Rotation", "GPTQ"]}, "w4ag32"),
    "SmoothQuant": ({"method": "SmoothQuant", "act": {"bit": 8},
                     "weight": {"bit": 8, "symmetric": True, "granularity": "per_channel"}}, "w8sch"),
}


@pytest.mark.parametrize("objects", [["language"], ["vision", "language"]], ids=["language", "vision+language"])
@pytest.mark.parametrize("method", list(METHODS))
def test_cli(tmp_path, tiny_model, calib_dir, method, objects):
    quant, desc = METHODS[method]
    cfg = {
        "model": {"type": "qwen2_vl", "path": str(tiny_model("qwen2_vl")), "dtype": "float32"},
        "calib": {"name": "custom_mm", "path": str(calib_dir), "n_samples": 2, "bs": 2, "seq_len": 256},
        "quant": {"quant_objects": objects, "weight": {"bit": 4, "group_size": 32}, **quant},
        "save": {"save_path": str(tmp_path / "out"), "save_fake": True},
    }
    f = tmp_path / "job.yml"
    f.write_text(yaml.safe_dump(cfg))
    assert main([str(f)]) == 0
    layers = json.loads((tmp_path / "out" / "quant_layers.json").read_text())
    assert set(layers.values()) == {desc}
    vision = [n for n in layers if n.startswith("model.visual.")]
    assert len(layers) == (22 if "vision" in objects else 14) and bool(vision) == ("vision" in objects)
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "out" / "fake", dtype=torch.float32)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()
