"""Tiny checkpoints of llmc.testing.tiny_more2 (Mllama, PaliGemma, Mistral3), loaded the user's way."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForImageTextToText

from llmc.calib import load_samples
from llmc.models import load_adapter
from llmc.pipeline import capture
from llmc.testing import tiny_more2


@pytest.mark.parametrize("family", list(tiny_more2.BUILDERS))
def test_checkpoint_shapes_and_image_tokens(family, tiny_model, calib_dir):
    model = AutoModelForImageTextToText.from_pretrained(tiny_model(family))
    assert type(model).__name__ == tiny_more2.MODEL_CLASSES[family]
    text = model.config.get_text_config()
    assert (text.hidden_size, text.num_attention_heads, text.hidden_size // text.num_attention_heads) == (64, 4, 16)
    bad = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m.in_features % 32]
    assert not bad, f"in_features not divisible by 32: {bad}"
    adapter = load_adapter(tiny_more2.MODEL_TYPES[family], str(tiny_model(family)), dtype="float32")
    batch = adapter.batch_process(load_samples("custom_mm", calib_dir, 2))
    assert adapter.image_token_mask(batch["input_ids"]).sum(dim=1).tolist() == [tiny_more2.IMAGE_TOKENS[family]] * 2


def test_mllama_cross_attention_blocks_get_vision_features(tiny_model, calib_dir):
    """Cross-attention blocks are their own kind; their captured kwargs carry the projected vision features."""
    adapter = load_adapter("mllama", str(tiny_model("mllama")), dtype="float32")
    cross = adapter.cross_attention_layers()
    assert cross == [1] and adapter.block_kind("language", 1) != adapter.block_kind("language", 0)
    assert adapter.kwargs_source("language", 2) == 0 and adapter.kwargs_source("language", 1) == 1
    layout = adapter.block_layout("language", adapter.blocks("language")[1])
    kv = next(g for g in layout.groups if "cross_attn.k_proj" in g.linears)
    assert kv.producer is None and not kv.reads_hidden
    assert all(g.reads_hidden for g in layout.groups if g is not kv)
    batch = adapter.batch_process(load_samples("custom_mm", calib_dir, 2))
    (call,) = capture(adapter, "language", [batch], torch.device("cpu"))
    states = call.kwargs_for(1)["cross_attention_states"]
    assert states.shape[-1] == 64 and states.shape[1] != batch["input_ids"].shape[1]
