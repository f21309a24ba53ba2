"""Text-only decoders (Llama, Qwen2): the language half of most VLMs, on its own."""
from __future__ import annotations

from llmc.models.base import ModelAdapter
from llmc.models.layout import ModelParts
from llmc.models.registry import register_adapter

CAUSAL_LM_PARTS = ModelParts(language_blocks="model.layers", embed_tokens="model.embed_tokens",
                             final_norm="model.norm", lm_head="lm_head")


@register_adapter
class LlamaAdapter(ModelAdapter):
    model_type = "llama"
    aliases = ("Llama",)
    parts = CAUSAL_LM_PARTS
    is_vlm = False


@register_adapter
class Qwen2Adapter(LlamaAdapter):
    model_type = "qwen2"
    aliases = ("Qwen2",)
