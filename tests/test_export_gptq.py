"""GPTQ export: reference unpacker (input-dim packing, v1 zero - 1), g_idx, vision handling, refusals."""
from __future__ import annotations

import re

import pytest
import torch
from test_export_helpers import (
    ckpt_name,
    fq_layers,
    quant_config,
    quantized_vlm,
    read_tensors,
    set_act_order,
)

from llmc.export.gptq_pack import export_gptq


def ref_unpack_gptq(t: dict, key: str, bits: int, v1: bool = True):
    """Reference: qweight ``[in/k, out]`` holds input row ``k*r + i`` in bits ``b*i..``; qzeros ``[G, out/k]``
    holds output column ``k*c + i``; v1 stores zero - 1. Returns unsigned q ``[out, in]``, zeros ``[out, G]``."""
    k, mask = 32 // bits, 2**bits - 1
    qw = t[f"{key}.qweight"].to(torch.int64) & 0xFFFFFFFF
    rows, out_f = qw.shape
    q = torch.zeros(rows * k, out_f, dtype=torch.int64)
    for r in range(rows):
        for i in range(k):
            q[k * r + i] = (qw[r] >> (bits * i)) & mask
    qz = t[f"{key}.qzeros"].to(torch.int64) & 0xFFFFFFFF
    z = torch.zeros(qz.shape[0], qz.shape[1] * k, dtype=torch.int64)
    for c in range(qz.shape[1]):
        for i in range(k):
            z[:, k * c + i] = (qz[:, c] >> (bits * i)) & mask
    return q.t(), (z + 1 if v1 else z).t()


@pytest.mark.parametrize("symmetric", [False, True])
def test_layout_recovers_fake_quant_integers(tmp_path, tiny_model, calib_dir, symmetric):
    adapter, _, _ = quantized_vlm(tiny_model, calib_dir, "qwen2_vl", symmetric=symmetric)
    out = export_gptq(adapter, tmp_path / "gptq", dtype=torch.float32)
    t = read_tensors(out)
    layers = fq_layers(adapter.model)
    packed = {n: m for n, m in layers.items() if n.startswith("model.language_model.")}
    assert len(packed) == 14
    for name, m in packed.items():
        key = name  # in-memory names: GPTQModel looks tensors up by them
        q, z = ref_unpack_gptq(t, key, 4, v1=symmetric)
        if symmetric:
            assert torch.equal(q - 8, m.int_weight().long()) and (z == 8).all(), key
        else:
            assert torch.equal(q, m.int_weight().long()) and torch.equal(z.float(), m.zero), key
        assert torch.equal(t[f"{key}.scales"], m.scale.t())
        assert torch.equal(t[f"{key}.g_idx"], (torch.arange(m.in_features) // 32).to(torch.int32))
        # dequantized by the reference equals the fake-quant weight
        deq = (q - z.repeat_interleave(32, dim=1)).float() * m.scale.repeat_interleave(32, dim=1)
        torch.testing.assert_close(deq, m.quantized_weight(), atol=0, rtol=0)
    # vision layers: kept float (fake-quant weights), excluded by `dynamic` rules
    qc = quant_config(out)
    assert qc == {**qc, "quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False,
                  "sym": symmetric, "checkpoint_format": "gptq" if symmetric else "gptq_v2"}
    for name, m in layers.items():
        if name.startswith("model.visual."):
            assert torch.equal(t[f"{name}.weight"], m.quantized_weight()) and f"{name}.qweight" not in t
            for runtime_name in ("prefix." + ckpt_name("qwen2_vl", name), name):  # vLLM / GPTQModel names
                assert any(re.match(p.removeprefix("-:"), runtime_name) for p in qc["dynamic"]), runtime_name
    for name in packed:
        for runtime_name in ("language_model." + ckpt_name("qwen2_vl", name), name):
            assert not any(re.match(p.removeprefix("-:"), runtime_name) for p in qc["dynamic"])


def test_quantized_vision_and_act_order(tmp_path, tiny_model, calib_dir):
    adapter, _, _ = quantized_vlm(tiny_model, calib_dir, "llava_clip_llama", symmetric=True)
    name = "model.language_model.layers.1.mlp.down_proj"
    m = set_act_order(adapter.model, name)
    g_idx = m.g_idx
    out = export_gptq(adapter, tmp_path / "gptq", dtype=torch.float32, quantize_vision=True)
    t, qc = read_tensors(out), quant_config(out)
    assert qc["desc_act"] is True
    key = name
    assert torch.equal(t[f"{key}.g_idx"], g_idx.to(torch.int32))
    q, z = ref_unpack_gptq(t, key, 4)
    deq = (q - z[:, g_idx]).float() * m.scale[:, g_idx]
    torch.testing.assert_close(deq, m.quantized_weight(), atol=0, rtol=0)
    for n, layer in fq_layers(adapter.model).items():
        q, _ = ref_unpack_gptq(t, n, 4)
        assert torch.equal(q - 8, layer.int_weight().long()), n


def test_asymmetric_v1_is_refused_and_v2_holds_zero_point_zero(tmp_path, tiny_model, calib_dir):
    adapter, _, _ = quantized_vlm(tiny_model, calib_dir, "qwen2_vl", objects=("language",))
    m = adapter.model.get_submodule("model.language_model.layers.0.mlp.up_proj")
    m.zero[0, 0] = 0.0
    with pytest.raises(ValueError, match="served by no runtime.*gptq_v2"):
        export_gptq(adapter, tmp_path / "v1", checkpoint_format="gptq")
    assert not (tmp_path / "v1").exists()
    out = export_gptq(adapter, tmp_path / "v2")  # auto: asymmetric weights are written as gptq_v2
    _, z = ref_unpack_gptq(read_tensors(out), "model.language_model.layers.0.mlp.up_proj", 4, v1=False)
    assert torch.equal(z.float(), m.zero) and quant_config(out)["checkpoint_format"] == "gptq_v2"


def test_refuses_mixed_specs_and_odd_bits(tmp_path, tiny_model, calib_dir):
    adapter, _, _ = quantized_vlm(tiny_model, calib_dir, "qwen2_vl", extra_quant={
        "vision": {"weight": {"bit": 8, "symmetric": True, "granularity": "per_channel"}}})
    export_gptq(adapter, tmp_path / "lang")  # the vision tower is kept float: one spec is packed
    with pytest.raises(ValueError, match="one bits/group_size/sym.*save_vllm"):
        export_gptq(adapter, tmp_path / "gptq", quantize_vision=True)
    adapter, _, _ = quantized_vlm(tiny_model, calib_dir, "qwen2_vl", objects=("language",), bit=3)
    with pytest.raises(ValueError, match="valid bits: \\[2, 4, 8\\]"):
        export_gptq(adapter, tmp_path / "gptq")
    assert not (tmp_path / "gptq").exists()


def test_int8_per_channel(tmp_path, tiny_model, calib_dir):
    adapter, _, _ = quantized_vlm(tiny_model, calib_dir, "qwen2_vl", objects=("language",), bit=8,
                                  symmetric=True, granularity="per_channel")
    out = export_gptq(adapter, tmp_path / "gptq", dtype=torch.float32)
    t, qc = read_tensors(out), quant_config(out)
    assert qc["bits"] == 8 and qc["group_size"] == -1
    for name, m in fq_layers(adapter.model).items():
        q, z = ref_unpack_gptq(t, name, 8)
        assert torch.equal(q - 128, m.int_weight().long()) and (z == 128).all()
        assert t[f"{name}.scales"].shape == (1, m.out_features)
