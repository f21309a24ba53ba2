"""compressed-tensors export: exact integers/scales by an independent unpacker, transformers reload, ignore list."""
from __future__ import annotations

import pytest
import torch
from test_export_helpers import (
    ckpt_name,
    fq_layers,
    logits,
    quant_config,
    quantized_vlm,
    read_tensors,
    set_act_order,
)
from transformers import AutoModelForImageTextToText

from llmc.export.compressed import export_compressed_tensors
from llmc.export.formats import EXPORTERS, load_real_quant
from llmc.quant.primitives import dequantize


def ref_unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Reference: element ``c`` of a row sits at bits ``c*bits..`` of the row's little-endian int32 words."""
    per = 32 // bits
    words = packed.to(torch.int64) & 0xFFFFFFFF
    cols = [(words >> (bits * k)) & (2**bits - 1) for k in range(per)]  # each [rows, n_words]
    return torch.stack(cols, dim=-1).reshape(packed.shape[0], -1)  # word-major, then slot


def check_layer(t: dict, key: str, m, zero_point_dtype_signed: bool = True) -> None:
    bits = m.spec.bits
    q_signed = ref_unpack_rows(t[f"{key}.weight_packed"], bits) - 2 ** (bits - 1)
    expected = m.int_weight() - (0 if m.spec.symmetric else 2 ** (bits - 1))
    assert torch.equal(q_signed.to(torch.int32), expected), key
    assert torch.equal(t[f"{key}.weight_scale"], m.scale), key  # float32 model: scales bit-exact
    assert t[f"{key}.weight_shape"].tolist() == [m.out_features, m.in_features]
    assert f"{key}.weight" not in t
    if m.spec.symmetric:
        assert f"{key}.weight_zero_point" not in t
    else:  # packed along the output dim
        zp = ref_unpack_rows(t[f"{key}.weight_zero_point"].t().contiguous(), bits).t()
        assert torch.equal(zp.float(), m.zero), key


@pytest.mark.parametrize("symmetric", [False, True])
def test_packed_layout_recovers_fake_quant_integers(tmp_path, tiny_model, calib_dir, symmetric):
    adapter, _, _ = quantized_vlm(tiny_model, calib_dir, symmetric=symmetric)
    out = export_compressed_tensors(adapter, tmp_path / "ct")
    t = read_tensors(out)
    layers = fq_layers(adapter.model)
    assert len(layers) == 22
    for name, m in layers.items():
        check_layer(t, ckpt_name("qwen2_vl", name), m)
    qc = quant_config(out)
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["quantization_status"] == "compressed"
    (group,) = qc["config_groups"].values()
    assert group["targets"] == ["Linear"]
    assert group["weights"] == {**group["weights"], "num_bits": 4, "group_size": 32, "strategy": "group",
                                "symmetric": symmetric, "type": "int"}
    # both spellings of every float linear; no quantized layer is ignored
    for float_name in ("model.visual.merger.mlp.0", "model.visual.merger.mlp.2", "lm_head"):
        assert float_name in qc["ignore"] and ckpt_name("qwen2_vl", float_name) in qc["ignore"]
    assert not set(qc["ignore"]) & (set(layers) | {ckpt_name("qwen2_vl", n) for n in layers})
    assert torch.equal(t["visual.merger.mlp.0.weight"], adapter.model.get_submodule("model.visual.merger.mlp.0").weight)


def _schemes(model) -> dict[str, bool]:
    return {n: hasattr(m, "quantization_scheme") for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_clip_llama"])
@pytest.mark.parametrize("objects", [("vision", "language"), ("language",)])
def test_transformers_reload_matches_fake_quant(tmp_path, tiny_model, calib_dir, family, objects):
    adapter, batch, fq = quantized_vlm(tiny_model, calib_dir, family, objects, symmetric=True)
    out = EXPORTERS["save_vllm"](adapter, tmp_path / "vllm")
    torch.testing.assert_close(logits(adapter.model, batch), fq, atol=0, rtol=0)  # the export changed nothing
    reloaded = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32)
    # the loader put a quantization scheme on exactly the quantized layers (ignore matched in-memory names)
    quantized = set(fq_layers(adapter.model))
    assert {n for n, has in _schemes(reloaded).items() if has} == quantized
    torch.testing.assert_close(logits(reloaded, batch), fq, atol=1e-5, rtol=1e-5)


def test_asymmetric_reload_with_load_time_dequantization(tmp_path, tiny_model, calib_dir):
    """Asymmetric pack-quantized: vLLM layout (zero points packed); ``load_real_quant`` reads it with
    transformers' load-time dequantization (the eval position ``real_quant``)."""
    adapter, batch, fq = quantized_vlm(tiny_model, calib_dir, "llava_clip_llama", symmetric=False)
    out = export_compressed_tensors(adapter, tmp_path / "ct")
    reloaded = load_real_quant(out, auto_class=adapter.auto_model_class())
    torch.testing.assert_close(logits(reloaded, batch), fq, atol=1e-5, rtol=1e-5)


def test_mixed_schemes_and_int8_channel(tmp_path, tiny_model, calib_dir):
    """Vision w8 per-channel, language w4 g32: two config groups, the minority targeted by name."""
    adapter, batch, fq = quantized_vlm(tiny_model, calib_dir, "llava_clip_llama", symmetric=True, extra_quant={
        "vision": {"weight": {"bit": 8, "symmetric": True, "granularity": "per_channel"}}})
    out = export_compressed_tensors(adapter, tmp_path / "ct")
    qc = quant_config(out)
    groups = sorted(qc["config_groups"].values(), key=lambda g: g["weights"]["num_bits"])
    assert [g["weights"]["num_bits"] for g in groups] == [4, 8]
    assert groups[0]["targets"] == ["Linear"] and groups[1]["weights"]["strategy"] == "channel"
    assert "model.vision_tower.encoder.layers.0.mlp.fc1" in groups[1]["targets"]
    assert "vision_tower.encoder.layers.0.mlp.fc1" in groups[1]["targets"]
    t = read_tensors(out)
    for name, m in fq_layers(adapter.model).items():
        check_layer(t, ckpt_name("llava", name), m)
    reloaded = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32)
    torch.testing.assert_close(logits(reloaded, batch), fq, atol=1e-5, rtol=1e-5)


def test_act_order_layer_is_kept_float(tmp_path, tiny_model, calib_dir):
    adapter, batch, _ = quantized_vlm(tiny_model, calib_dir, "qwen2_vl", symmetric=True)
    name = "model.language_model.layers.0.mlp.down_proj"
    m = set_act_order(adapter.model, name)
    fq = logits(adapter.model, batch)
    out = export_compressed_tensors(adapter, tmp_path / "ct")
    qc, t = quant_config(out), read_tensors(out)
    assert name in qc["ignore"] and "model.layers.0.mlp.down_proj" in qc["ignore"]
    written = t["model.layers.0.mlp.down_proj.weight"]
    assert torch.equal(written, dequantize(m.int_weight(), m.scale, m.zero, m.g_idx))
    assert not torch.equal(written, dequantize(m.int_weight(), m.scale, m.zero))  # the g_idx matters
    reloaded = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32)
    torch.testing.assert_close(logits(reloaded, batch), fq, atol=1e-5, rtol=1e-5)


def test_packed_size_vs_bf16(tmp_path, tiny_model, calib_dir):
    """4-bit g32 asymmetric language weights (int4 + bf16 scales + int4 zeros) vs the same weights in bf16."""
    adapter, _, _ = quantized_vlm(tiny_model, calib_dir, "qwen2_vl", objects=("language",))
    out = export_compressed_tensors(adapter, tmp_path / "ct", scale_dtype=torch.bfloat16)
    t = read_tensors(out)
    layers = fq_layers(adapter.model)
    packed = sum(t[f"{ckpt_name('qwen2_vl', n)}.{k}"].nbytes for n in layers
                 for k in ("weight_packed", "weight_scale", "weight_zero_point"))
    bf16 = sum(m.weight.numel() * 2 for m in layers.values())
    ratio = packed / bf16
    print(f"\n4-bit language weights: {packed} bytes vs bf16 {bf16} bytes: ratio {ratio:.4f}")
    assert ratio == pytest.approx((4 + 16 / 32 + 4 / 32) / 16)  # 0.2890625 for g32


def test_crash_mid_write_leaves_no_folder(tmp_path, tiny_model, calib_dir, monkeypatch):
    adapter, _, _ = quantized_vlm(tiny_model, calib_dir, "qwen2_vl", objects=("language",))

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(adapter.processor, "save_pretrained", boom)  # after the weights are written
    with pytest.raises(RuntimeError, match="disk full"):
        export_compressed_tensors(adapter, tmp_path / "ct")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "ct").mkdir()
    with pytest.raises(FileExistsError):
        export_compressed_tensors(adapter, tmp_path / "ct")
