"""Every algorithm through the CLI on a tiny VLM, language only and vision + language."""
from __future__ import annotations

import pytest
import torch
import yaml
from transformers import AutoModelForImageTextToText

from llmc.algorithms.records import GPTQRecord
from llmc.calib import load_samples
from llmc.cli import main
from llmc.models import load_adapter
from llmc.plan import load_plan
from llmc.quant.primitives import QuantSpec, rtn_fake_quantize

METHODS = {
    "RTN": ({"method": "RTN"}, "w4ag32"),
    "AWQ": ({"method": "AWQ", "special": {"n_grid": 4, "clip_grid": 4}}, "w4ag32"),
    "GPTQ": ({"method": "GPTQ", "special": {"actorder": True}}, "w4ag32"),
    "Rotation+GPTQ": ({"method": ["Rotation", "GPTQ"]}, "w4ag32"),
    "SmoothQuant": ({"method": "SmoothQuant", "act": {"bit": 8},
                     "weight": {"bit": 8, "symmetric": True, "granularity": "per_channel"}}, "w8scha8"),
}


# relative logit error of the fake-quant model vs the float one on calibration samples, measured here:
# RTN 0.076, AWQ 0.064-0.068, GPTQ 0.022, Rotation+GPTQ 0.027-0.028, SmoothQuant W8A8 0.005; bounds at ~2x
ERR_BOUND = {"RTN": 0.15, "AWQ": 0.12, "GPTQ": 0.05, "Rotation+GPTQ": 0.06, "SmoothQuant": 0.012}


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
    layers = load_plan(tmp_path / "out" / "quant_layers.json").settings()
    assert set(layers.values()) == {desc}
    vision = [n for n in layers if n.startswith("model.visual.")]
    assert len(layers) == (22 if "vision" in objects else 14) and bool(vision) == ("vision" in objects)
    fake = AutoModelForImageTextToText.from_pretrained(tmp_path / "out" / "fake", dtype=torch.float32)
    float_model = load_adapter("qwen2_vl", str(tiny_model("qwen2_vl")), dtype="float32")
    levels, per = (256, None) if method == "SmoothQuant" else (16, 32)  # w8 per channel / w4 g32
    record = tmp_path / "out" / "gptq_records.pt"
    rec = GPTQRecord.load(record) if record.exists() else None
    g_idx = {n: rec.state(n).get("g_idx") for n in rec.layers} if rec is not None else {}
    for name in layers:
        w = fake.get_submodule(name).weight.detach()
        if g_idx.get(name) is not None:  # act order: a group is the columns with the same g_idx
            rows = [w[:, g_idx[name] == g] for g in g_idx[name].unique()]
            rows = [r for group in rows for r in group]
        else:
            rows = w.reshape(-1, per) if per else w
        assert max(len(torch.unique(r)) for r in rows) <= levels, name  # on the quantization grid
        if method == "RTN":  # RTN is min/max rounding of the float weight, nothing else
            ref = rtn_fake_quantize(float_model.module(name).weight.detach(), QuantSpec(4, False, "per_group", 32))
            assert torch.equal(w, ref), name
    batch = float_model.batch_process(load_samples("custom_mm", calib_dir, 2), max_length=256)
    with torch.no_grad():
        want, got = float_model.model(**batch).logits, fake(**batch).logits
    err = float((got - want).norm() / want.norm())
    assert torch.isfinite(got).all() and 1e-4 < err < ERR_BOUND[method], err
