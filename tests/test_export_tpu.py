"""save_trans with the TPU check: allowed schemes, the sidecar, float weights, refusal before writing."""
from __future__ import annotations

import json

import pytest
import torch
from test_export_helpers import ckpt_name, fq_layers, logits, quantized_vlm
from transformers import AutoModelForImageTextToText

from llmc.export.trans_tpu import SIDECAR, check_tpu_constraints, export_trans
from llmc.plan import QuantPlan
from llmc.quant.fake_linear import set_fake_quant


def test_trans_folder_and_sidecar(tmp_path, tiny_model, calib_dir):
    adapter, batch, fq = quantized_vlm(tiny_model, calib_dir, "qwen2_vl")
    out = export_trans(adapter, tmp_path / "trans", tpu_check=True)
    side = json.loads((out / SIDECAR).read_text())
    assert side["llm_convert_args"] == "-q w4bf16 -g 32"
    layers = fq_layers(adapter.model)
    assert len(side["layers"]) == len(layers) == 22
    entries = {e["name"]: e for e in side["layers"]}  # the plan's serialisation (llmc.plan.QuantPlan.to_json)
    assert QuantPlan.from_json(side).settings() == {n: "w4ag32" for n in layers}
    for name in layers:
        assert side["checkpoint_names"][name] == ckpt_name("qwen2_vl", name)
        entry = entries[name]
        assert entry == {**entry, "bits": 4, "group_size": 32, "symmetric": False, "granularity": "per_group"}
        assert entry["part"] == ("vision" if name.startswith("model.visual.") else "language")
    # transformed float weights (RTN: the original weights), loadable, fake quant still on in memory
    reloaded = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32)
    torch.testing.assert_close(logits(adapter.model, batch), fq)
    set_fake_quant(adapter.model, False)
    torch.testing.assert_close(logits(reloaded, batch), logits(adapter.model, batch), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("weight, ok", [
    ({"bit": 4, "symmetric": True}, "-q w4bf16 -g 32 --symmetric"),
    ({"bit": 8, "symmetric": True, "granularity": "per_channel"}, "-q w8bf16"),
    ({"bit": 8, "symmetric": False}, None),
    ({"bit": 4, "symmetric": False, "granularity": "per_channel"}, None),
])
def test_allowed_combinations(tmp_path, tiny_model, calib_dir, weight, ok):
    adapter, _, _ = quantized_vlm(tiny_model, calib_dir, "qwen2_vl", objects=("language",), **weight)
    if ok:
        assert check_tpu_constraints(adapter) == ok
        return
    with pytest.raises(ValueError, match="Allowed: w4 per_group asymmetric.*w8 per_channel symmetric"):
        export_trans(adapter, tmp_path / "trans", tpu_check=True)
    assert not (tmp_path / "trans").exists()
    export_trans(adapter, tmp_path / "trans", tpu_check=False)  # without the check: written, sidecar too
    assert json.loads((tmp_path / "trans" / SIDECAR).read_text())["llm_convert_args"] is None


def test_one_language_spec(tmp_path, tiny_model, calib_dir):
    adapter, _, _ = quantized_vlm(tiny_model, calib_dir, "qwen2_vl", objects=("language",), extra_quant={
        "overrides": [{"pattern": "*.mlp.down_proj", "weight": {"bit": 8, "symmetric": True,
                                                               "granularity": "per_channel"}}]})
    with pytest.raises(ValueError, match="one --quantize"):
        check_tpu_constraints(adapter)
