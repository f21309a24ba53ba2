"""Mistral3 / Mistral-Small-3.1 (HF ``Mistral3ForConditionalGeneration``): Pixtral tower, patch merger, Mistral.

Pixtral blocks (``model.vision_tower.transformer.layers``): ``attention.q/k/v/o_proj`` with 2D RoPE
and a block-diagonal mask per image, RMSNorms ``attention_norm``/``ffn_norm``, gated MLP
``feed_forward.gate/up/down_proj``. Projector: RMSNorm -> ``patch_merger.merging_layer``
(2x2 neighbouring patches concatenated) -> ``linear_1 -> GELU -> linear_2`` (the writer into the
language residual stream). Text: any Mistral/Llama decoder. Each image row ends with
``[IMG_BREAK]`` and the image with ``[IMG_END]`` (ordinary embeddings).
"""
from __future__ import annotations

from torch import nn

from llmc.models.base import ModelAdapter
from llmc.models.common import decoder_layout
from llmc.models.layout import BlockLayout, vlm_parts
from llmc.models.registry import register_adapter


@register_adapter
class Mistral3Adapter(ModelAdapter):
    model_type = "mistral3"
    aliases = ("Mistral3", "mistral-small-3.1")
    parts = vlm_parts(vision_tower="model.vision_tower", vision_blocks="model.vision_tower.transformer.layers",
                      projector="model.multi_modal_projector")
    projector_writers = ("model.multi_modal_projector.linear_2",)
    template_has_bos = True  # the chat template starts with <s>

    def vision_layout(self, block: nn.Module) -> BlockLayout:
        return decoder_layout(block, attn="attention", mlp="feed_forward", in_norm="attention_norm",
                              post_norm="ffn_norm")
