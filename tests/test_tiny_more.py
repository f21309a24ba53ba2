"""Tiny checkpoints of the extra VLM families (llmc.testing.tiny_more), loaded the user's way."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from llmc.testing import tiny_more
from llmc.testing.tiny_models import build_tiny_model, ensure_tiny_model, tiny_image

NEEDS = {"smolvlm": "num2words"}  # the real SmolVLMProcessor imports num2words
QUESTIONS = ["Is there a red circle?", "How many squares are on the left of the picture?"]


def _families() -> list:
    out = []
    for fam in tiny_more.BUILDERS:
        missing = fam in NEEDS and importlib.util.find_spec(NEEDS[fam]) is None
        out.append(pytest.param(fam, marks=pytest.mark.skipif(missing, reason=f"needs {NEEDS.get(fam)}")))
    return out


FAMILIES = _families()


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Image.Image:
    return Image.open(tiny_image(tmp_path_factory.mktemp("img") / "a.png")).convert("RGB")


def _prompts(processor) -> list[str]:
    return [processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
        tokenize=False, add_generation_prompt=True) for q in QUESTIONS]


@pytest.mark.parametrize("family", FAMILIES)
def test_load_forward_generate(family: str, tiny_model, image: Image.Image) -> None:
    folder = tiny_model(family)
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    assert type(model).__name__ == tiny_more.MODEL_CLASSES[family]
    texts = _prompts(processor)
    assert all(QUESTIONS[0] in texts[0] for _ in texts)
    inputs = processor(text=texts, images=[[image], [image]], return_tensors="pt", padding=True,
                       add_special_tokens=False)
    image_id = getattr(model.config, "image_token_id", None) or model.config.image_token_index
    n_img = (inputs["input_ids"] == image_id).sum(dim=1)
    assert n_img.tolist() == [tiny_more.IMAGE_TOKENS[family]] * 2
    assert not bool(inputs["attention_mask"].all()), "the two prompts should need (left) padding"
    assert processor.tokenizer.padding_side == "left"
    vocab = model.config.get_text_config().vocab_size
    assert vocab == len(processor.tokenizer)
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (2, inputs["input_ids"].shape[1], vocab) and torch.isfinite(logits).all()
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert inputs["input_ids"].shape[1] < out.shape[1] <= inputs["input_ids"].shape[1] + 3


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_shapes(family: str, tiny_model) -> None:
    folder = tiny_model(family)
    assert (folder / "model.safetensors").stat().st_size < 4_000_000
    assert all(w.dtype == torch.float32 for w in load_file(folder / "model.safetensors").values())
    model = AutoModelForImageTextToText.from_pretrained(folder)
    text = model.config.get_text_config()
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads) == (64, 2, 4)
    assert text.hidden_size // text.num_attention_heads == 16
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    bad = [n for n, m in linears if m.in_features % 32]
    assert linears and not bad, f"in_features not divisible by 32: {bad}"


def test_same_seed_same_weights(tmp_path: Path) -> None:
    a = load_file(build_tiny_model("internvl", tmp_path / "a", seed=0) / "model.safetensors")
    b = load_file(build_tiny_model("internvl", tmp_path / "b", seed=0) / "model.safetensors")
    c = load_file(build_tiny_model("internvl", tmp_path / "c", seed=1) / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a) and any(not torch.equal(a[k], c[k]) for k in a)


def test_families_are_known_to_tiny_models(tmp_path: Path) -> None:
    assert set(tiny_more.ALL_FAMILIES) >= set(tiny_more.BUILDERS)
    with pytest.raises(ValueError, match="gemma3"):
        ensure_tiny_model("gpt17", cache_dir=tmp_path)


def _blockwise_logits(adapter, batch, with_deepstack: bool) -> torch.Tensor:
    """Run the language blocks one by one from block 0's captured inputs, as llmc.pipeline does."""
    blocks, rec = adapter.blocks("language"), {}

    def on_block(mod, args, kwargs) -> None:
        rec.setdefault("block", (args, kwargs))

    def on_text_model(mod, args, kwargs) -> None:
        rec.setdefault("extras", adapter.capture_extras(kwargs))

    h0 = blocks[0].register_forward_pre_hook(on_block, with_kwargs=True)
    h1 = adapter.module(adapter.extras_module).register_forward_pre_hook(on_text_model, with_kwargs=True)
    try:
        with torch.no_grad():
            adapter.model(**batch, use_cache=False)
    finally:
        h0.remove()
        h1.remove()
    args, kwargs = rec["block"]
    hidden, kwargs = (args[0], kwargs) if args else (kwargs["hidden_states"], dict(kwargs))
    kwargs.pop("hidden_states", None)
    assert len(rec["extras"]["deepstack_visual_embeds"]) == 2
    with torch.no_grad():
        for i, block in enumerate(blocks):
            hidden = block(hidden, **adapter.block_call_kwargs("language", i, kwargs))
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
            if with_deepstack:
                hidden = adapter.between_blocks("language", i, hidden, rec["extras"])
        return adapter.lm_head()(adapter.final_norm()(hidden))


def test_qwen3_vl_deepstack_between_blocks(tiny_model, calib_dir) -> None:
    """Block-by-block execution matches the model only with the deepstack additions between blocks."""
    from llmc.calib import load_samples
    from llmc.models import load_adapter

    adapter = load_adapter("qwen3_vl", str(tiny_model("qwen3_vl")), dtype="float32")
    batch = adapter.batch_process(load_samples("custom_mm", calib_dir, 2), with_answer=True)
    with torch.no_grad():
        ref = adapter.model(**batch, use_cache=False).logits
    good = _blockwise_logits(adapter, batch, with_deepstack=True)
    torch.testing.assert_close(good, ref, rtol=1e-4, atol=1e-4)
    missed = _blockwise_logits(adapter, batch, with_deepstack=False)
    assert (missed - ref).abs().max() > 1e-2, "without deepstack the block chain must differ"
