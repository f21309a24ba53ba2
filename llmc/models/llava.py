"""LLaVA (HF ``LlavaForConditionalGeneration``): CLIP or SigLIP vision, 2-layer MLP projector, any decoder."""
from __future__ import annotations

from torch import nn

from llmc.models.base import ModelAdapter
from llmc.models.common import clip_encoder_layout
from llmc.models.layout import BlockLayout, vlm_parts
from llmc.models.registry import register_adapter


@register_adapter
class LlavaAdapter(ModelAdapter):
    model_type = "llava"
    aliases = ("Llava",)
    parts = vlm_parts(vision_tower="model.vision_tower", vision_blocks="model.vision_tower.encoder.layers",
                      projector="model.multi_modal_projector")
    # transformers 5 flattens CLIP/SigLIP towers; older or remote towers keep `vision_model`.
    vision_blocks_candidates = ("model.vision_tower.encoder.layers",
                                "model.vision_tower.vision_model.encoder.layers")
    projector_writers = ("model.multi_modal_projector.linear_2",)

    def vision_layout(self, block: nn.Module) -> BlockLayout:
        return clip_encoder_layout(block)
