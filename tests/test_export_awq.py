"""AutoAWQ GEMM export and the dequant tool: reference unpacker, skip lists, float reload, atomic writes."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_export_helpers import (
    ckpt_name,
    fq_layers,
    logits,
    quant_config,
    quantized_vlm,
    read_tensors,
    snapshot,
)
from torch import nn
from transformers import AutoModelForImageTextToText
from transformers.quantizers.quantizers_utils import should_convert_module

import llmc.export.dequant as dequant_mod
from llmc.config import parse_config
from llmc.export.awq_gemm import export_autoawq, why_not_awq
from llmc.export.dequant import dequantize_awq_folder
from llmc.export.formats import check_save_plan
from llmc.models import load_adapter
from llmc.plan import build_plan, single_layer
from llmc.quant.fake_linear import FakeQuantLinear
from llmc.quant.primitives import QuantSpec

ROOT = Path(__file__).resolve().parent.parent
ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ: nibble i of a word holds column ORDER[i] of its 8 columns


def ref_unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """Reference AutoAWQ unpacking, ``[rows, cols/8]`` int32 -> ``[rows, cols]``, one nibble at a time."""
    rows, words = packed.shape
    w = packed.to(torch.int64) & 0xFFFFFFFF
    out = torch.zeros(rows, words * 8, dtype=torch.int64)
    for j in range(words):
        for i in range(8):
            out[:, 8 * j + ORDER[i]] = (w[:, j] >> (4 * i)) & 0xF
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_layout_recovers_fake_quant_integers(tmp_path, tiny_model, calib_dir, dtype):
    adapter, _, _ = quantized_vlm(tiny_model, calib_dir, "qwen2_vl")
    out = export_autoawq(adapter, tmp_path / "awq", dtype=dtype, pack_vision=True)
    t = read_tensors(out)
    layers = fq_layers(adapter.model)
    assert len(layers) == 22
    for name, m in layers.items():
        k = name  # in-memory names: GPTQModel looks tensors up by them (vLLM and transformers map both)
        assert t[f"{k}.qweight"].shape == (m.in_features, m.out_features // 8)
        assert torch.equal(ref_unpack_awq(t[f"{k}.qweight"]).t(), m.int_weight().long()), k
        assert torch.equal(ref_unpack_awq(t[f"{k}.qzeros"]).t().float(), m.zero), k
        assert t[f"{k}.scales"].dtype == dtype
        assert torch.equal(t[f"{k}.scales"], m.scale.t().to(dtype)), k
        if m.bias is not None:
            assert torch.equal(t[f"{k}.bias"], m.bias.to(dtype))
        assert f"{k}.weight" not in t
    qc = quant_config(out)
    assert qc == {**qc, "quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm"}
    assert json.loads((out / "config.json").read_text())["dtype"] == str(dtype).removeprefix("torch.")


def test_skip_list_matches_loaders(tmp_path, tiny_model, calib_dir):
    """transformers (prefix/regex/suffix on in-memory names) and vLLM (substring of its prefixed names) skip
    exactly the float linears."""
    adapter, _, _ = quantized_vlm(tiny_model, calib_dir, "llava_clip_llama", objects=("language",))
    skip = quant_config(export_autoawq(adapter, tmp_path / "awq"))["modules_to_not_convert"]
    linears = [n for n, m in adapter.model.named_modules() if isinstance(m, nn.Linear)]
    quantized = set(fq_layers(adapter.model))
    assert {n for n in linears if not should_convert_module(n, skip)} == set(linears) - quantized
    vllm_names = {n: "prefix." + ckpt_name("llava", n) for n in linears}  # vLLM maps checkpoint names
    assert {n for n, v in vllm_names.items() if any(s in v for s in skip)} == set(linears) - quantized


def test_refuses_other_schemes(tmp_path, tiny_model, calib_dir):
    adapter, _, _ = quantized_vlm(tiny_model, calib_dir, "qwen2_vl", objects=("language",), symmetric=True)
    with pytest.raises(ValueError, match="4-bit asymmetric per-group.*save_vllm"):
        export_autoawq(adapter, tmp_path / "awq")
    assert not (tmp_path / "awq").exists()


def test_plan_is_checked_before_quantization(tiny_model):
    """The runner can refuse an impossible save.* request from the resolved specs, before quantizing."""
    cfg = parse_config({"model": {"type": "qwen2_vl", "path": str(tiny_model("qwen2_vl")), "dtype": "float32"},
                        "quant": {"method": "RTN", "quant_objects": ["vision", "language"],
                                  "weight": {"bit": 4, "group_size": 32},
                                  "vision": {"weight": {"bit": 4, "group_size": 64}}},
                        "save": {"save_path": "unused"}})
    adapter = load_adapter("qwen2_vl", cfg.model.path, dtype="float32")
    plan = build_plan(cfg.quant, adapter).quantized()
    check_save_plan(["save_vllm", "save_sgl", "tpu_check", "save_autoawq", "save_gptq"], plan)  # vision kept float
    with pytest.raises(ValueError, match="one group_size per checkpoint; layers use \\[32, 64\\]"):
        check_save_plan(["save_autoawq"], plan, pack_vision=True)
    with pytest.raises(ValueError, match="save_gptq: GPTQ has one"):
        check_save_plan(["save_gptq"], plan, pack_vision=True)
    assert not fq_layers(adapter.model)


def test_unpackable_shape_is_kept_float():
    lin = nn.Linear(32, 12)
    m = FakeQuantLinear.from_linear(lin, single_layer(lin, QuantSpec(4, False, "per_group", 32)))
    assert "divisible by the pack factor 8" in why_not_awq(m)


def _load_cli():
    spec = importlib.util.spec_from_file_location("llm_dequant", ROOT / "tpu" / "llm_dequant.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_dequant_tool_gives_fake_quant_float_folder(tmp_path, tiny_model, calib_dir):
    adapter, batch, fq = quantized_vlm(tiny_model, calib_dir, "qwen2_vl")
    awq = export_autoawq(adapter, tmp_path / "awq", dtype=torch.float32)
    before = snapshot(awq)
    cli = _load_cli()
    assert cli.main(["--input", str(awq), "--output", str(tmp_path / "float")]) == 0
    assert snapshot(awq) == before  # the input is byte-identical
    cfg = json.loads((tmp_path / "float" / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["dtype"] == "float32"
    t = read_tensors(tmp_path / "float")
    for name, m in fq_layers(adapter.model).items():
        key = f"{name}.weight" if f"{name}.weight" in t else f"{ckpt_name('qwen2_vl', name)}.weight"
        assert torch.equal(t[key], m.quantized_weight())
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "float", dtype=torch.float32)
    torch.testing.assert_close(logits(reloaded, batch), fq, atol=1e-5, rtol=1e-5)
    # an existing output is refused and left alone
    again = snapshot(tmp_path / "float")
    assert cli.main(["--input", str(awq), "--output", str(tmp_path / "float")]) == 2
    assert snapshot(tmp_path / "float") == again


def test_dequant_sharded_published_layout(tmp_path, tiny_model, calib_dir):
    """A sharded AutoAWQ folder (index.json, a module's tensors split across shards) -> sharded float output."""
    adapter, batch, fq = quantized_vlm(tiny_model, calib_dir, "qwen2_vl")
    awq = export_autoawq(adapter, tmp_path / "awq", dtype=torch.float32)
    t = read_tensors(awq)
    (awq / "model.safetensors").unlink()
    keys = sorted(t)
    parts = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for f, ks in parts.items():
        save_file({k: t[k] for k in ks}, str(awq / f), metadata={"format": "pt"})
    (awq / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, ks in parts.items() for k in ks}}))
    out = dequantize_awq_folder(awq, tmp_path / "float", max_shard_bytes=64 * 1024)
    assert len(list(out.glob("model-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").exists()
    reloaded = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32)
    torch.testing.assert_close(logits(reloaded, batch), fq, atol=1e-5, rtol=1e-5)


def test_crash_mid_write_leaves_no_folder(tmp_path, tiny_model, calib_dir, monkeypatch):
    adapter, _, _ = quantized_vlm(tiny_model, calib_dir, "qwen2_vl", objects=("language",))
    awq = export_autoawq(adapter, tmp_path / "awq")
    calls = []

    def boom(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return save_file(*args, **kwargs)

    monkeypatch.setattr(dequant_mod, "save_file", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        dequantize_awq_folder(awq, tmp_path / "float", max_shard_bytes=16 * 1024)
    assert len(calls) == 2  # the first shard had been written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["awq"]
    with pytest.raises(ValueError, match="overlaps"):
        dequantize_awq_folder(awq, awq / "inside")


def test_vision_tower_is_float_unless_packed(tmp_path, tiny_model, calib_dir):
    """GPTQModel builds AutoAWQ vision towers float (packed ones gave NaN there): kept as fake-quant floats."""
    adapter, _, _ = quantized_vlm(tiny_model, calib_dir, "qwen2_vl")
    t = read_tensors(export_autoawq(adapter, tmp_path / "awq", dtype=torch.float32))
    for name, m in fq_layers(adapter.model).items():
        vision = name.startswith("model.visual.")
        assert (f"{name}.qweight" in t) != vision, name
        if vision:
            assert torch.equal(t[f"{name}.weight"], m.quantized_weight())
