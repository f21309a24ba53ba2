"""GGUF export: blocks bit for bit (independent decoder + gguf-py's dequantizer), names, metadata, refusals.

Expectations are written out here independently of ``llmc.export.gguf``: the block layouts from the ggml
format (fp16 d [, fp16 m], then 16 nibble bytes: element j low, j + 16 high; or 32 int8), the tensor
names from llama.cpp's conventions (cross-checked with gguf-py's own HF -> GGUF name map).
"""
from __future__ import annotations

import sys

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader
from test_export_helpers import fq_layers, quantized_vlm, set_act_order

from llmc.config import parse_config
from llmc.export.gguf import check_gguf_plan, export_gguf
from llmc.export.gguf_blocks import fp16_neighbours, pack_q4_0, q4_1_params
from llmc.models import load_adapter
from llmc.plan import single_layer
from llmc.quant.primitives import QuantSpec
from llmc.runner import quantize_model

LM = "model.language_model.layers"
TEXT = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down"}
QWEN_VIS = {"attn.proj": "attn_out", "mlp.fc1": "ffn_up", "mlp.fc2": "ffn_down"}


def fill_zeros(model) -> None:
    """Random tiny models have all-zero biases, Gemma norms and Gemma image projection; give them values so
    that a swapped or missing tensor shows (quantized weights are not touched: only all-zero tensors)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=gen))


def read(path) -> tuple[dict, dict]:
    r = GGUFReader(path)
    return {t.name: t for t in r.tensors}, {k: f.contents() for k, f in r.fields.items()}


def decode(t) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Independent block decoder: (integers [out, in] as stored, d [out, G], m [out, G] or None)."""
    raw = np.asarray(t.data, dtype=np.uint8)
    size = {QT.Q4_0: 18, QT.Q4_1: 20, QT.Q8_0: 34}[t.tensor_type]
    b = raw.reshape(raw.shape[0], -1, size)
    d = b[..., 0:2].copy().view("<f2")[..., 0].astype(np.float32)
    if t.tensor_type == QT.Q8_0:
        return b[..., 2:].copy().view(np.int8).reshape(raw.shape[0], -1).astype(np.int64), d, None
    m = b[..., 2:4].copy().view("<f2")[..., 0].astype(np.float32) if t.tensor_type == QT.Q4_1 else None
    qs = b[..., -16:]
    n = np.concatenate([qs & 0xF, qs >> 4], axis=-1)  # elements 0..15, then 16..31
    return n.reshape(raw.shape[0], -1).astype(np.int64), d, m


def check_layer(t, m, rows=slice(None)) -> float:
    """Integers exact; gguf-py's dequantization equals llmc's fake-quant weight up to fp16 d/m; returns the
    largest error in units of llmc's step ``s``."""
    q, s, z = m.int_weight()[rows].numpy(), m.scale[rows].numpy(), m.zero[rows].numpy()
    n, d, mm = decode(t)
    want = {QT.Q4_0: q + 8, QT.Q4_1: q, QT.Q8_0: q}[t.tensor_type]
    assert np.array_equal(n, want), t.name
    np.testing.assert_array_equal(d, s.astype(np.float16).astype(np.float32)) if mm is None else None
    deq = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(q.shape)
    fq = m.quantized_weight()[rows].detach().numpy()
    step = np.repeat(s, 32, axis=1)
    err = np.abs(deq - fq) / step
    if mm is None:  # Q4_0 / Q8_0: only d is rounded, error |q| |d - s|
        bound = np.abs(q) * (np.repeat(np.abs(d - s), 32, axis=1) / step + 1e-6)  # + float32 rounding
        assert (err <= bound).all(), t.name
    else:  # Q4_1: the chosen (d, m) is at least as close as the nearest-rounded pair (fp16(s), fp16(-z s))
        def g(a: np.ndarray) -> np.ndarray:
            return a.reshape(q.shape[0], -1, 32)

        naive = g(q) * s.astype(np.float16)[..., None] + (-z * s).astype(np.float16)[..., None]
        target = g((q - np.repeat(z, 32, axis=1)) * np.repeat(s, 32, axis=1))
        assert (((g(deq) - target) ** 2).sum(-1) <= ((naive - target) ** 2).sum(-1) * (1 + 1e-6) + 1e-20).all()
    return float(err.max())


@pytest.mark.parametrize("symmetric", [True, False])
def test_qwen2_vl_blocks_bit_exact(tmp_path, tiny_model, calib_dir, symmetric):
    adapter, _, _ = quantized_vlm(tiny_model, calib_dir, "qwen2_vl", symmetric=symmetric)
    fill_zeros(adapter.model)
    out = export_gguf(adapter, tmp_path / "g")
    (t, kv), (vt, vkv) = read(out["model"]), read(out["mmproj"])
    layers, qt = fq_layers(adapter.model), QT.Q4_0 if symmetric else QT.Q4_1
    worst = 0.0
    for name, m in layers.items():
        if name.startswith(LM):
            i, rel = name[len(LM) + 1:].split(".", 1)
            assert t[f"blk.{i}.{TEXT[rel]}.weight"].tensor_type == qt
            worst = max(worst, check_layer(t[f"blk.{i}.{TEXT[rel]}.weight"], m))
            continue
        i, rel = name.removeprefix("model.visual.blocks.").split(".", 1)
        if rel == "attn.qkv":  # split row-wise into q, k, v
            for j, part in enumerate(("attn_q", "attn_k", "attn_v")):
                check_layer(vt[f"v.blk.{i}.{part}.weight"], m, slice(64 * j, 64 * (j + 1)))
                assert torch.equal(torch.from_numpy(vt[f"v.blk.{i}.{part}.bias"].data.copy()),
                                   m.bias[64 * j:64 * (j + 1)])
        else:
            check_layer(vt[f"v.blk.{i}.{QWEN_VIS[rel]}.weight"], m)
    # fp16 rounding: Q4_0 |q| |d - s| <= 8 * 2^-11 s; Q4_1 adds m's rounding (|m| up to 15 s): < 1/64 step
    assert worst <= (2 ** -8 if symmetric else 2 ** -6)
    emb = adapter.model.model.language_model.embed_tokens.weight
    assert np.array_equal(t["token_embd.weight"].data, emb.detach().numpy())
    assert "output.weight" not in t  # tied embeddings: llama.cpp reuses token_embd
    for i in range(2):
        for rel in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            bias = adapter.model.get_submodule(f"{LM}.{i}.{rel}").bias.detach().numpy()
            assert np.array_equal(t[f"blk.{i}.{TEXT[rel]}.bias"].data, bias), (i, rel)
    kernel = adapter.model.model.visual.patch_embed.proj.weight.detach().numpy()
    assert np.array_equal(vt["v.patch_embd.weight.1"].data, kernel[:, :, 1])
    assert kv["general.architecture"] == "qwen2vl" and kv["qwen2vl.rope.dimension_sections"] == [2, 3, 3, 0]
    assert kv["qwen2vl.block_count"] == 2 and kv["qwen2vl.attention.head_count_kv"] == 4
    assert kv["general.file_type"] == (2 if symmetric else 3)
    tok = adapter.processor.tokenizer
    assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == "qwen2"
    assert kv["tokenizer.ggml.tokens"][:len(tok)] == tok.convert_ids_to_tokens(list(range(len(tok))))
    assert len(kv["tokenizer.ggml.tokens"]) == emb.shape[0] and kv["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    assert kv["tokenizer.ggml.merges"][0] == "h e" and kv["tokenizer.chat_template"] == tok.chat_template
    assert vkv["clip.projector_type"] == "qwen2vl_merger" and vkv["clip.vision.block_count"] == 2
    assert vkv["clip.vision.projection_dim"] == 64 and set(vkv) >= {"clip.vision.image_mean", "clip.has_vision_encoder"}
    hf_names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2VL, 2)  # gguf-py's own HF -> GGUF map
    for name in layers:
        if name.startswith(LM):
            assert hf_names.get_name(name.replace("language_model.", "")) + ".weight" in t


def test_llava_llama_rope_rows_and_projector(tmp_path, tiny_model, calib_dir):
    adapter, _, _ = quantized_vlm(tiny_model, calib_dir, "llava_clip_llama", symmetric=True)
    fill_zeros(adapter.model)
    out = export_gguf(adapter, tmp_path / "g")
    (t, kv), (vt, vkv) = read(out["model"]), read(out["mmproj"])
    heads, hd = 4, 16  # llama.cpp's LLaMA rope pairs (i, i + hd/2) -> rows (2i, 2i + 1) of each head
    perm = torch.tensor([h * hd + half * hd // 2 + i for h in range(heads) for i in range(hd // 2) for half in (0, 1)])
    q_proj = adapter.model.get_submodule(f"{LM}.0.self_attn.q_proj")
    check_layer(t["blk.0.attn_q.weight"], q_proj, perm)
    check_layer(t["blk.0.attn_v.weight"], adapter.model.get_submodule(f"{LM}.0.self_attn.v_proj"))
    assert np.array_equal(t["output.weight"].data, adapter.model.lm_head.weight.detach().numpy())
    assert kv["tokenizer.ggml.model"] == "llama" and kv["tokenizer.ggml.add_bos_token"] is True
    types = kv["tokenizer.ggml.token_type"]
    assert types[0] == gguf.TokenType.UNKNOWN and types[3] == gguf.TokenType.BYTE  # <unk>, <0x00>
    assert vkv["clip.projector_type"] == "mlp" and vkv["clip.vision.feature_layer"] == [1]  # HF -2 of 2 layers
    proj = adapter.model.model.multi_modal_projector
    assert np.array_equal(vt["mm.2.weight"].data, proj.linear_2.weight.detach().numpy())
    assert np.array_equal(vt["mm.0.bias"].data, proj.linear_1.bias.detach().numpy())
    tower = adapter.model.model.vision_tower
    assert np.array_equal(vt["v.blk.1.attn_k.bias"].data, tower.encoder.layers[1].self_attn.k_proj.bias.detach().numpy())
    assert np.array_equal(vt["v.class_embd"].data, tower.embeddings.class_embedding.detach().numpy())
    assert "v.class_embd" in vt and "v.pre_ln.weight" in vt and "v.post_ln.weight" not in vt


def test_gemma3_norms_and_sliding_window(tmp_path, tiny_model, calib_dir):
    adapter, _, _ = quantized_vlm(tiny_model, calib_dir, "gemma3", objects=("language",))
    fill_zeros(adapter.model)
    out = export_gguf(adapter, tmp_path / "g")
    (t, kv), (vt, vkv) = read(out["model"]), read(out["mmproj"])
    blk = adapter.model.get_submodule(f"{LM}.0")
    for name, mod in (("attn_norm", blk.input_layernorm), ("post_attention_norm", blk.post_attention_layernorm),
                      ("ffn_norm", blk.pre_feedforward_layernorm), ("attn_k_norm", blk.self_attn.k_norm)):
        assert np.array_equal(t[f"blk.0.{name}.weight"].data, mod.weight.detach().numpy() + 1), name
    check_layer(t["blk.1.ffn_down.weight"], adapter.model.get_submodule(f"{LM}.1.mlp.down_proj"))
    assert kv["gemma3.attention.sliding_window_pattern"] == [True, False] and kv["gemma3.rope.freq_base_swa"] == 1e4
    assert kv["tokenizer.ggml.model"] == "llama" and kv["tokenizer.ggml.add_space_prefix"] is False
    assert vkv["clip.projector_type"] == "gemma3" and vkv["clip.vision.projector.scale_factor"] == 2
    proj = adapter.model.model.multi_modal_projector
    assert np.array_equal(vt["mm.soft_emb_norm.weight"].data, proj.mm_soft_emb_norm.weight.detach().numpy() + 1)
    assert np.array_equal(vt["mm.input_projection.weight"].data, proj.mm_input_projection_weight.detach().numpy())
    assert "v.post_ln.weight" in vt


def text_model(tiny_model, family: str, bit: int, symmetric: bool):
    cfg = parse_config({"model": {"type": family, "path": str(tiny_model(family)), "dtype": "float32"},
                        "quant": {"method": "RTN", "quant_objects": ["language"],
                                  "weight": {"bit": bit, "symmetric": symmetric, "group_size": 32}},
                        "save": {"save_path": "unused"}})
    adapter = load_adapter(family, cfg.model.path, dtype="float32")
    quantize_model(cfg, adapter, torch.device("cpu"))
    return adapter


def test_text_only_q8_0(tmp_path, tiny_model):
    adapter = text_model(tiny_model, "qwen2", 8, True)
    out = export_gguf(adapter, tmp_path / "g")
    assert set(out) == {"model"}
    t, kv = read(out["model"])
    for name, m in fq_layers(adapter.model).items():
        i, rel = name.removeprefix("model.layers.").split(".", 1)
        assert t[f"blk.{i}.{TEXT[rel]}.weight"].tensor_type == QT.Q8_0
        check_layer(t[f"blk.{i}.{TEXT[rel]}.weight"], m)
    assert kv["general.architecture"] == "qwen2" and kv["general.file_type"] == 7
    t16, _ = read(export_gguf(adapter, tmp_path / "g16", float_type="f16")["model"])
    emb = adapter.model.model.embed_tokens.weight.detach().numpy()
    assert t16["token_embd.weight"].tensor_type == QT.F16 and t16["output_norm.weight"].tensor_type == QT.F32
    assert np.array_equal(t16["token_embd.weight"].data, emb.astype(np.float16))
    with pytest.raises(ValueError, match="float_type='bf16'; valid: \\['f32', 'f16'\\]"):
        export_gguf(adapter, tmp_path / "g8", float_type="bf16")


def test_refusals_name_what_gguf_holds(tmp_path, tiny_model, calib_dir):
    ok = QuantSpec(4, True, "per_group", 32)
    lin = torch.nn.Linear(64, 64)

    def plan(specs: dict) -> list:
        return [single_layer(lin, spec, act, name=n) for n, (spec, act) in specs.items()]
    assert check_gguf_plan(plan({"a": (ok, None), "b": (QuantSpec(4, False, "per_group", 32), None),
                                 "c": (QuantSpec(8, True, "per_group", 32), None)})) == {"a": QT.Q4_0, "b": QT.Q4_1,
                                                                                      "c": QT.Q8_0}
    for spec, act, shown in [(QuantSpec(4, False, "per_group", 128), None, "w4ag128"),
                             (ok, 8, "w4sg32a8"), (QuantSpec(3, True, "per_group", 32), None, "w3sg32"),
                             (QuantSpec(8, False, "per_group", 32), None, "w8ag32"),
                             (QuantSpec(4, True, "per_channel"), None, "w4sch")]:
        with pytest.raises(ValueError, match=f"GGUF holds w4 g32 symmetric \\(Q4_0\\), w4 g32 asymmetric "
                                             f"\\(Q4_1\\), w8 g32 symmetric \\(Q8_0\\).*layer x is {shown}"):
            check_gguf_plan(plan({"ok": (ok, None), "x": (spec, act)}))
    adapter, _, _ = quantized_vlm(tiny_model, calib_dir, "qwen2_vl", objects=("language",), symmetric=True)
    set_act_order(adapter.model, f"{LM}.0.mlp.up_proj")
    with pytest.raises(ValueError, match="act-order"):
        export_gguf(adapter, tmp_path / "g")
    assert not (tmp_path / "g").exists()
    adapter.model.config.model_type = "mllama"
    with pytest.raises(ValueError, match="supported families: qwen2_vl, qwen2_5_vl, llava, gemma3, qwen2, llama"):
        export_gguf(adapter, tmp_path / "g")
    assert not (tmp_path / "g").exists()


def test_fp16_parameters():
    s = np.array([0.1, 1e-3, 2.0 ** -20], dtype=np.float64)
    lo, hi = fp16_neighbours(s)
    assert (lo <= s).all() and (hi >= s).all() and lo[0] < hi[0]
    with pytest.raises(ValueError, match="overflows fp16"):
        pack_q4_0(torch.zeros(1, 32, dtype=torch.int32), torch.tensor([[1e6]]))
    q = torch.randint(0, 16, (8, 64))
    scale, zero = torch.rand(8, 2) * 0.01 + 1e-3, torch.randint(0, 16, (8, 2)).float()
    d, _ = q4_1_params(q, scale, zero)
    assert d.dtype == np.float16 and (np.abs(d - scale.numpy()) <= scale.numpy() * 2 ** -10).all()


def test_job_writes_gguf_and_refuses_other_group_sizes_before_quantizing(tmp_path, tiny_model, calib_dir):
    """``save.save_gguf: true`` in a job: the text model and the mmproj file; a group size GGUF cannot hold is
    refused at the plan step, before any quantization."""
    import yaml
    from loguru import logger

    from llmc.cli import main

    job = {"model": {"type": "qwen2_vl", "path": str(tiny_model("qwen2_vl")), "dtype": "float32"},
           "quant": {"method": "RTN", "quant_objects": ["vision", "language"],
                     "weight": {"bit": 4, "symmetric": True, "group_size": 32}},
           "save": {"save_path": str(tmp_path / "out"), "save_gguf": True}}
    (tmp_path / "job.yml").write_text(yaml.safe_dump(job))
    try:
        assert main([str(tmp_path / "job.yml")]) == 0
        reader = gguf.GGUFReader(tmp_path / "out" / "gguf" / "model.gguf")
        types = {t.name: t.tensor_type for t in reader.tensors}
        assert types["blk.0.attn_q.weight"] == QT.Q4_0 and (tmp_path / "out" / "gguf" / "mmproj.gguf").is_file()
        job["quant"]["weight"]["group_size"] = 64
        job["save"]["save_path"] = str(tmp_path / "out2")
        (tmp_path / "job.yml").write_text(yaml.safe_dump(job))
        assert main([str(tmp_path / "job.yml")]) == 2
        log = (tmp_path / "out2.failed.log").read_text()
        assert "save_gguf: GGUF holds w4 g32 symmetric" in log and "RTN on language" not in log
    finally:
        logger.remove()
        logger.add(sys.stderr, level="INFO")
