"""Qwen2-VL and Qwen2.5-VL: ViT with fused ``qkv`` ([3, heads, head_dim]), patch merger, Qwen2 text."""
from __future__ import annotations

from torch import nn

from llmc.models.base import ModelAdapter
from llmc.models.common import fused_qkv_layout
from llmc.models.layout import BlockLayout, vlm_parts
from llmc.models.registry import register_adapter

QWEN_VL_PARTS = vlm_parts(vision_tower="model.visual", vision_blocks="model.visual.blocks",
                          projector="model.visual.merger")


@register_adapter
class Qwen2VLAdapter(ModelAdapter):
    model_type = "qwen2_vl"
    aliases = ("Qwen2VL",)
    parts = QWEN_VL_PARTS
    projector_writers = ("model.visual.merger.mlp.2",)
    vision_mlp: tuple[str, ...] = ("fc1", "fc2")
    vision_gated = False

    def vision_layout(self, block: nn.Module) -> BlockLayout:
        return fused_qkv_layout(block, dim=block.attn.qkv.in_features, num_heads=block.attn.num_heads,
                                mlp_names=self.vision_mlp, gated=self.vision_gated)


@register_adapter
class Qwen25VLAdapter(Qwen2VLAdapter):
    model_type = "qwen2_5_vl"
    aliases = ("Qwen2_5VL", "Qwen2.5-VL")
    vision_mlp = ("gate_proj", "up_proj", "down_proj")
    vision_gated = True

    def block_kind(self, part: str, index: int) -> object:
        # Vision blocks in `fullatt_block_indexes` attend over whole images, the others over windows:
        # their `cu_seqlens` differ.
        if part != "vision":
            return super().block_kind(part, index)
        return index in self.model.config.vision_config.fullatt_block_indexes
