"""The block loop reproduces the real model: chained block outputs equal the model's own."""
from __future__ import annotations

import pytest
import torch

from llmc.algorithms.base import Algorithm, NoOptions
from llmc.calib import load_samples
from llmc.config import QuantConfig, WeightConfig
from llmc.context import hidden_input
from llmc.data.mme_synth import generate
from llmc.models import load_adapter
from llmc.pipeline import capture, catch_block_inputs, process_blocks
from llmc.plan import build_plan


class Identity(Algorithm):
    """Touches nothing: the loop alone must reproduce the float model."""

    name = "identity-test"

    def process_block(self, ctx) -> None:
        return None


@pytest.fixture(scope="module")
def big_images(tmp_path_factory):
    # 112 px images: several attention windows per image in Qwen2.5-VL's tiny vision tower
    return generate(tmp_path_factory.mktemp("big") / "set", "calib", n_images=3, seed=1, size=112)


def model_outputs(adapter, part, batch) -> torch.Tensor:
    """The vision tower's last block output; the language model's final hidden state (after any
    addition that follows the last block, e.g. deepstack), i.e. the final norm's input."""
    out = {}
    if part == "language":
        h = adapter.final_norm().register_forward_pre_hook(lambda m, a: out.setdefault("x", a[0]))
    else:
        h = adapter.blocks(part)[-1].register_forward_hook(
            lambda m, a, o: out.setdefault("x", o if torch.is_tensor(o) else o[0]))
    try:
        with torch.no_grad():
            adapter.model(**batch, use_cache=False)
    finally:
        h.remove()
    return out["x"]


@pytest.mark.parametrize("family,mtype", [("qwen2_vl", "qwen2_vl"), ("qwen2_5_vl", "qwen2_5_vl"),
                                          ("llava_clip_llama", "llava"), ("llava_siglip_qwen2", "llava"),
                                          ("qwen3_vl", "qwen3_vl"), ("internvl", "internvl"),
                                          ("idefics3", "idefics3"), ("gemma3", "gemma3"),
                                          ("mllama", "mllama"), ("paligemma", "paligemma"),
                                          ("mistral3", "mistral3")])
def test_chained_blocks_equal_the_model(tiny_model, big_images, family, mtype):
    adapter = load_adapter(mtype, str(tiny_model(family)), dtype="float32", attn_implementation="eager")
    batch = adapter.batch_process(load_samples("custom_mm", big_images, 3), max_length=512)
    algo = Identity(NoOptions(), QuantConfig())
    plan = build_plan(QuantConfig(quant_objects=["vision", "language"], weight=WeightConfig(group_size=32)), adapter)
    for part in ("vision", "language"):
        ref = model_outputs(adapter, part, batch)
        calls = capture(adapter, part, [batch], torch.device("cpu"))
        (out,) = process_blocks(adapter, part, calls, algo, plan, torch.device("cpu"))
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_qwen25_full_attention_blocks_get_their_own_kwargs(tiny_model, big_images):
    adapter = load_adapter("qwen2_5_vl", str(tiny_model("qwen2_5_vl")), dtype="float32")
    full = adapter.model.config.vision_config.fullatt_block_indexes
    assert full and 0 not in full
    batch = adapter.batch_process(load_samples("custom_mm", big_images, 2), max_length=512)
    (call,) = capture(adapter, "vision", [batch], torch.device("cpu"))
    windowed = call.kwargs_for(adapter.kwargs_source("vision", 0))["cu_seqlens"]
    whole = call.kwargs_for(adapter.kwargs_source("vision", full[0]))["cu_seqlens"]
    assert len(windowed) > len(whole)  # several windows per image vs one sequence per image


def test_capture_restores_blocks_on_error(tiny_model):
    adapter = load_adapter("qwen2_vl", str(tiny_model("qwen2_vl")), dtype="float32")
    blocks = adapter.blocks("language")
    before = list(blocks)
    with pytest.raises(KeyError):
        with catch_block_inputs(blocks, (0, 1)):
            raise KeyError("boom")
    assert all(a is b for a, b in zip(blocks, before))


def test_vision_capture_without_images_is_a_clear_error(tiny_model, calib_dir):
    adapter = load_adapter("qwen2_vl", str(tiny_model("qwen2_vl")), dtype="float32")
    samples = [s.__class__(question=s.question, answer=s.answer) for s in load_samples("custom_mm", calib_dir, 2)]
    batch = adapter.batch_process(samples)
    with pytest.raises(RuntimeError, match="images for vision"):
        capture(adapter, "vision", [batch], torch.device("cpu"))


@pytest.mark.parametrize("conv,shape", [(torch.nn.Conv3d(3, 8, (2, 4, 4), (2, 4, 4)), (5, 3, 2, 4, 4)),
                                        (torch.nn.Conv2d(3, 8, 4, 4, bias=False), (2, 3, 4, 4))])
def test_patch_convs_run_as_a_matmul_with_the_conv_result(conv, shape):
    """A patch convolution on one-kernel input runs as a matmul (the conv itself is never called) with
    the conv's result; other inputs take the conv; the module's forward is restored afterwards."""
    from llmc.pipeline import patch_convs_as_matmul

    conv = conv.double()
    model = torch.nn.Sequential(conv, torch.nn.Conv2d(8, 8, 3, 1))  # overlapping: never patched
    x = torch.randn(*shape, dtype=torch.float64)
    bigger = torch.randn(*shape[:-2], 8, 8, dtype=torch.float64)  # 2x2 patches: the conv's own forward
    ref, ref_big = conv(x), conv(bigger)
    with patch_convs_as_matmul(model):
        assert "forward" in conv.__dict__ and "forward" not in model[1].__dict__
        torch.testing.assert_close(conv(bigger), ref_big, rtol=0, atol=0)
        conv._conv_forward = None  # the conv is not run for one-kernel input
        out = conv(x)
        del conv._conv_forward
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert "forward" not in conv.__dict__


def test_capture_runs_qwen2_vl_patch_embedding_as_a_matmul(tiny_model, calib_dir, monkeypatch):
    """Capturing the language inputs of Qwen2-VL (its Conv3d patch embedding sees one patch per row)
    calls no convolution, and the captured inputs equal those of the model's own forward."""
    adapter = load_adapter("qwen2_vl", str(tiny_model("qwen2_vl")), dtype="float32")
    batch = adapter.batch_process(load_samples("custom_mm", calib_dir, 2), max_length=512)
    seen = []
    hook = adapter.blocks("language")[0].register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(hidden_input(args, kwargs)), with_kwargs=True)
    with torch.no_grad():
        adapter.model(**batch, use_cache=False)
    hook.remove()
    monkeypatch.setattr(torch.nn.Conv3d, "_conv_forward", lambda *a: pytest.fail("Conv3d was run"))
    (call,) = capture(adapter, "language", [batch], torch.device("cpu"))
    torch.testing.assert_close(hidden_input(call.args, call.kwargs_for(0)), seen[0], rtol=1e-6, atol=1e-6)
