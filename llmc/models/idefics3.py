"""Idefics3 and SmolVLM (HF ``Idefics3ForConditionalGeneration`` / ``SmolVLMForConditionalGeneration``).

SigLIP-style vision blocks (``self_attn.q/k/v/out_proj``, ``layer_norm1/2``, ``fc1 -> act -> fc2``)
at ``model.vision_model.encoder.layers``; connector = pixel shuffle -> ``modality_projection.proj``
(one bias-free linear: the only writer into the language residual stream from outside the
blocks); Llama text under ``model.text_model`` (not ``language_model``).

Inputs: the processor splits each image into tiles plus a global view, so the number of
``<image>`` tokens per sample varies with the image size; ``pixel_values`` is
``[batch, max_tiles, 3, H, W]`` with all-zero padding tiles (plus ``pixel_attention_mask``).
"""
from __future__ import annotations

from torch import nn

from llmc.models.base import ModelAdapter
from llmc.models.common import clip_encoder_layout
from llmc.models.layout import BlockLayout, vlm_parts
from llmc.models.registry import register_adapter

IDEFICS3_PARTS = vlm_parts(vision_tower="model.vision_model", vision_blocks="model.vision_model.encoder.layers",
                           projector="model.connector", text_model="model.text_model")


@register_adapter
class Idefics3Adapter(ModelAdapter):
    model_type = "idefics3"
    aliases = ("Idefics3",)
    parts = IDEFICS3_PARTS
    projector_writers = ("model.connector.modality_projection.proj",)

    def vision_layout(self, block: nn.Module) -> BlockLayout:
        return clip_encoder_layout(block)


@register_adapter
class SmolVLMAdapter(Idefics3Adapter):
    model_type = "smolvlm"
    aliases = ("SmolVLM",)
