"""Helpers shared by the exporter tests (no tests here): a quantized tiny VLM and checkpoint readers.

The checkpoint-name rules below are written out by hand from the transformers 5
checkpoint layouts, independently of ``llmc.export.packing.checkpoint_names``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from llmc.calib import load_samples
from llmc.config import parse_config
from llmc.models import load_adapter
from llmc.quant.fake_linear import FakeQuantLinear
from llmc.runner import quantize_model

# in-memory prefix -> checkpoint prefix, per family (first match wins)
CKPT_PREFIX = {
    "qwen2_vl": [("model.language_model.", "model."), ("model.visual.", "visual."), ("lm_head", "lm_head")],
    "llava": [("model.language_model.", "language_model.model."), ("model.vision_tower.", "vision_tower."),
              ("model.multi_modal_projector.", "multi_modal_projector."), ("lm_head", "language_model.lm_head")],
}


def model_type(family: str) -> str:
    return "llava" if family.startswith("llava") else family


def ckpt_name(family: str, name: str) -> str:
    for mem, ck in CKPT_PREFIX[model_type(family)]:
        if name.startswith(mem):
            return ck + name[len(mem):]
    raise KeyError(name)


def quantized_vlm(tiny_model, calib_dir, family: str = "qwen2_vl", objects=("vision", "language"),
                  bit: int = 4, symmetric: bool = False, group_size: int = 32, granularity: str = "per_group",
                  extra_quant: dict | None = None):
    """(adapter with fake-quant layers, an image batch, the fake-quant logits)."""
    cfg = parse_config({
        "model": {"type": model_type(family), "path": str(tiny_model(family)), "dtype": "float32"},
        "quant": {"method": "RTN", "quant_objects": list(objects),
                  "weight": {"bit": bit, "symmetric": symmetric, "group_size": group_size,
                             "granularity": granularity}, **(extra_quant or {})},
        "save": {"save_path": "unused"},
    })
    adapter = load_adapter(model_type(family), cfg.model.path, dtype="float32")
    batch = adapter.batch_process(load_samples("custom_mm", calib_dir, 2), max_length=256)
    assert "pixel_values" in batch
    quantize_model(cfg, adapter, torch.device("cpu"))
    return adapter, batch, logits(adapter.model, batch)


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def fq_layers(model) -> dict[str, FakeQuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)}


def set_act_order(model, name: str, seed: int = 0) -> FakeQuantLinear:
    """Give layer ``name`` non-contiguous groups (GPTQ act-order ``g_idx``): a fresh module, same weight/params."""
    m = model.get_submodule(name)
    g_idx = torch.randperm(m.in_features, generator=torch.Generator().manual_seed(seed)) // m.spec.group_size
    new = FakeQuantLinear.from_linear(m, m.layer, m.scale, m.zero, g_idx)
    parent, child = name.rsplit(".", 1)
    setattr(model.get_submodule(parent), child, new)
    return new


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a (possibly sharded) safetensors folder."""
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def quant_config(folder: Path) -> dict:
    return json.loads((Path(folder) / "config.json").read_text())["quantization_config"]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}
