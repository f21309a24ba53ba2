"""The job calibrates on exactly ``calib.n_samples`` samples, in batches of ``calib.bs``, cut to ``calib.seq_len``;
``quant.token_weight`` weights GPTQ's Hessian and AWQ's loss as specified, weight 0 being the same as
leaving those tokens out."""
from __future__ import annotations

import json

import pytest
import torch

import llmc.runner as runner
from llmc.calib import load_samples
from llmc.config import parse_config
from llmc.context import BlockContext, flatten_rows, hidden_input
from llmc.models import load_adapter
from llmc.pipeline import capture


@pytest.fixture
def texts(tmp_path):
    """Nine long texts (each far over 24 tokens)."""
    data = tmp_path / "txt"
    data.mkdir()
    (data / "data.json").write_text(json.dumps([f"Sample {i}: " + "the quick brown fox jumps over the lazy dog " * 6
                                                for i in range(9)]))
    return data


@pytest.mark.parametrize("n, bs, seq_len", [(5, 2, 24), (9, 4, 16), (3, 1, 40)])
def test_job_uses_exactly_n_samples_bs_and_seq_len(tiny_model, texts, tmp_path, monkeypatch, n, bs, seq_len):
    cfg = parse_config({"model": {"type": "qwen2", "path": str(tiny_model("qwen2")), "dtype": "float32"},
                        "calib": {"name": "custom_txt", "path": str(texts), "n_samples": n, "bs": bs,
                                  "seq_len": seq_len},
                        "quant": {"method": "GPTQ", "weight": {"bit": 4, "group_size": 32}},
                        "save": {"save_path": str(tmp_path / "out")}})
    seen = []

    def spy(adapter, part, batches, device, weights=None):
        seen.append([tuple(b["input_ids"].shape) for b in batches])
        return capture(adapter, part, batches, device, weights)
    monkeypatch.setattr(runner, "capture", spy)
    adapter = load_adapter("qwen2", cfg.model.path, dtype="float32")
    runner.quantize_model(cfg, adapter, torch.device("cpu"))
    (shapes,) = seen
    sizes = [b for b, _ in shapes]
    assert sum(sizes) == n and sizes == [min(bs, n - i) for i in range(0, n, bs)]
    assert all(t == seq_len for _, t in shapes)  # every text is longer than seq_len: cut to it


def _first_block_context(adapter, calib_dir, weights):
    """Block 0 of the language model with its captured calls under token weights ``weights``."""
    batch = adapter.batch_process(load_samples("custom_mm", calib_dir, 2), max_length=512)
    calls = capture(adapter, "language", [batch], torch.device("cpu"), weights)
    image = adapter.image_token_mask(batch["input_ids"]) & batch["attention_mask"].bool()
    return calls, image


def _ctx(adapter, calls, plan):
    block = adapter.blocks("language")[0]
    return BlockContext("language", 0, f"{adapter.blocks_path('language')}.0", block,
                        adapter.block_layout("language", block), calls, torch.device("cpu"), plan)


def test_token_weights_in_the_gptq_hessian(tiny_model, calib_dir):
    from llmc.algorithms.hessian import HessianStats
    from llmc.config import QuantConfig, WeightConfig
    from llmc.plan import build_plan

    adapter = load_adapter("qwen2_vl", str(tiny_model("qwen2_vl")), dtype="float32")
    plan = build_plan(QuantConfig(weight=WeightConfig(group_size=32)), adapter)
    weighted, image = _first_block_context(adapter, calib_dir, {"image": 0.25, "text": 1.0})
    x = hidden_input(weighted[0].args, weighted[0].kwargs)
    ctx = _ctx(adapter, weighted, plan)
    (x_q,) = ctx.inputs(["self_attn.q_proj"])["self_attn.q_proj"]
    w = weighted[0].token_weight
    assert torch.equal(w[image], torch.full_like(w[image], 0.25)) and (w[~image] <= 1).all()
    stats = HessianStats(x_q.shape[-1])
    stats.add_batch(x_q, w)
    rows, rw = flatten_rows(x_q, w)
    want = 2.0 * (rows.double() * rw.double()[:, None]).t() @ rows.double() / rw.double().sum()
    torch.testing.assert_close(stats.H.double(), want, rtol=1e-5, atol=1e-6)
    # weight 0 == leaving the image tokens out
    zero, _ = _first_block_context(adapter, calib_dir, {"image": 0.0, "text": 1.0})
    h0 = HessianStats(x_q.shape[-1])
    h0.add_batch(x_q, zero[0].token_weight)
    text = x_q.reshape(-1, x_q.shape[-1])[(~image & (w > 0)).reshape(-1)]
    torch.testing.assert_close(h0.H.double(), 2.0 * text.double().t() @ text.double() / text.shape[0],
                               rtol=1e-5, atol=1e-6)
    assert x.shape[:2] == w.shape


def test_token_weights_in_the_awq_loss(tiny_model, calib_dir):
    from llmc.algorithms.awq import _group_loss
    from llmc.config import QuantConfig, WeightConfig
    from llmc.plan import build_plan

    adapter = load_adapter("qwen2_vl", str(tiny_model("qwen2_vl")), dtype="float32")
    plan = build_plan(QuantConfig(weight=WeightConfig(group_size=32)), adapter)
    losses = {}
    for name, tw in {"half": {"image": 0.5, "text": 1.0}, "zero": {"image": 0.0, "text": 1.0},
                     "one": {"image": 1.0, "text": 1.0}}.items():
        calls, image = _first_block_context(adapter, calib_dir, tw)
        ctx = _ctx(adapter, calls, plan)
        group = ctx.layout.groups[2]  # mlp_in: inspect = the MLP, rows are tokens
        rec = ctx.record_calls([group.inspect])
        losses[name] = _group_loss(ctx, group, rec[group.inspect], ctx.weights_for(group.input_of))
        s = torch.full((ctx.get(group.input_of).in_features,), 1.3)
        losses[name] = losses[name](s)
    # the per-token errors e_i are the same; the loss is sum(w_i e_i) / sum(w_i)
    calls, image = _first_block_context(adapter, calib_dir, {"image": 1.0, "text": 1.0})
    ctx = _ctx(adapter, calls, plan)
    group = ctx.layout.groups[2]
    rec = ctx.record_calls([group.inspect])
    mask = calls[0].token_weight > 0
    e_img = _group_loss(ctx, group, rec[group.inspect], [(image & mask).float()])(torch.full((ctx.get(group.input_of).in_features,), 1.3))
    e_txt = _group_loss(ctx, group, rec[group.inspect], [(~image & mask).float()])(torch.full((ctx.get(group.input_of).in_features,), 1.3))
    n_img, n_txt = float((image & mask).sum()), float((~image & mask).sum())
    assert losses["zero"] == pytest.approx(e_txt, rel=1e-5)  # weight 0 == the image tokens left out
    assert losses["half"] == pytest.approx((0.5 * n_img * e_img + n_txt * e_txt) / (0.5 * n_img + n_txt), rel=1e-5)
    assert losses["one"] == pytest.approx((n_img * e_img + n_txt * e_txt) / (n_img + n_txt), rel=1e-5)
    assert e_img != pytest.approx(e_txt, rel=1e-3)  # the test can tell the weights apart


def test_token_weight_changes_the_gptq_result(tiny_model, calib_dir, tmp_path):
    results = []
    for tw in ({"image": 1.0, "text": 1.0}, {"image": 0.0, "text": 1.0}):
        cfg = parse_config({"model": {"type": "qwen2_vl", "path": str(tiny_model("qwen2_vl")), "dtype": "float32"},
                            "calib": {"name": "custom_mm", "path": str(calib_dir), "n_samples": 2, "bs": 2},
                            "quant": {"method": "GPTQ", "weight": {"bit": 3, "group_size": 32}, "token_weight": tw},
                            "save": {"save_path": str(tmp_path / "out")}})
        adapter = load_adapter("qwen2_vl", cfg.model.path, dtype="float32")
        runner.quantize_model(cfg, adapter, torch.device("cpu"))
        results.append(adapter.model.get_submodule("model.language_model.layers.0.mlp.down_proj").quantized_weight())
    assert not torch.equal(*results)


def test_calibration_inputs_are_freed_after_the_last_capture(tiny_model, calib_dir, tmp_path, monkeypatch):
    """The job's model inputs (images included) are needed by each part's capture only: after the last
    part's capture they are released, before that part's block loop (their memory: 616 MiB of
    pixel values for 128 images of 448 px), and kept until then (the vision part's loop sees them)."""
    import gc
    import weakref

    cfg = parse_config({"model": {"type": "qwen2_vl", "path": str(tiny_model("qwen2_vl")), "dtype": "float32"},
                        "calib": {"name": "custom_mm", "path": str(calib_dir), "n_samples": 4, "bs": 2},
                        "quant": {"method": "GPTQ", "quant_objects": ["vision", "language"],
                                  "weight": {"bit": 4, "group_size": 32}},
                        "save": {"save_path": str(tmp_path / "out")}})
    adapter = load_adapter("qwen2_vl", cfg.model.path, dtype="float32")
    pixels: list[weakref.ref] = []
    made = runner.calibration_batches

    def tracked(cfg, adapter):
        batches = made(cfg, adapter)
        pixels.extend(weakref.ref(b["pixel_values"]) for b in batches)
        return batches

    alive_in_loop = []
    loop = runner.process_blocks

    def spy(adapter, part, *args, **kwargs):
        gc.collect()
        alive_in_loop.append((part, sum(r() is not None for r in pixels)))
        return loop(adapter, part, *args, **kwargs)
    monkeypatch.setattr(runner, "calibration_batches", tracked)
    monkeypatch.setattr(runner, "process_blocks", spy)
    runner.quantize_model(cfg, adapter, torch.device("cpu"))
    assert len(pixels) == 2
    assert alive_in_loop == [("vision", 2), ("language", 0)]
