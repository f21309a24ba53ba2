"""Mistral3 / Mistral-Small-3.1 (HF ``Mistral3ForConditionalGeneration``): Pixtral tower, patch merger, Mistral.

Pixtral blocks (``model.vision_tower.transformer.layers``): ``attention.q/k/v/o_proj`` with 2D RoPE
and a block-diagonal mask per image, RMSNorms ``attention_norm``/``ffn_norm``, gated MLP
``feed_forward.gate/up/down_proj``. Projector: RMSNorm -> ``patch_merger.merging_layer``
(2x2 neighbouring patches concatenated) -> ``linear_1 -> GELU -> linear_2`` (the writer into the
language residual stream). Text: any Mistral/Llama decoder. Each image row ends with
``[IMG_BREAK]`` and the image with ``[IMG_END]`` (ordinary embeddings).
"""
from __future__ import annotations

import torch
from PIL import Image
from torch import nn

from llmc.calib.sample import Sample
from llmc.models.base import ModelAdapter
from llmc.models.common import decoder_layout
from llmc.models.layout import BlockLayout, ModelParts, RotationTargets
from llmc.models.registry import register_adapter


@register_adapter
class Mistral3Adapter(ModelAdapter):
    model_type = "mistral3"
    aliases = ("Mistral3", "mistral-small-3.1")
    parts = ModelParts(
        language_blocks="model.language_model.layers",
        embed_tokens="model.language_model.embed_tokens",
        final_norm="model.language_model.norm",
        lm_head="lm_head",
        vision_tower="model.vision_tower",
        vision_blocks="model.vision_tower.transformer.layers",
        projector="model.multi_modal_projector",
    )

    def language_layout(self, block: nn.Module) -> BlockLayout:
        return decoder_layout(block)

    def vision_layout(self, block: nn.Module) -> BlockLayout:
        return decoder_layout(block, attn="attention", mlp="feed_forward", in_norm="attention_norm",
                              post_norm="ffn_norm")

    def rotation_targets(self) -> RotationTargets:
        return RotationTargets(embeddings=(self.parts.embed_tokens,),
                               external_writers=("model.multi_modal_projector.linear_2",),
                               final_norm=self.parts.final_norm, lm_head=self.parts.lm_head)

    def encode(self, sample: Sample, with_answer: bool, chat_template: bool = True) -> dict[str, torch.Tensor]:
        """As the base, but the chat template already starts with ``<s>``: add no second one."""
        text = self.prompt_text(sample, with_answer, chat_template)
        images = [Image.open(p).convert("RGB") for p in sample.images]
        kwargs = {"images": images} if images else {}
        return dict(self.processor(text=[text], return_tensors="pt", add_special_tokens=not chat_template, **kwargs))
