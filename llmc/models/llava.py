"""LLaVA (HF ``LlavaForConditionalGeneration``): CLIP or SigLIP vision, 2-layer MLP projector, any decoder."""
from __future__ import annotations

from dataclasses import replace

from torch import nn

from llmc.models.base import ModelAdapter
from llmc.models.common import decoder_layout
from llmc.models.layout import BlockLayout, ModelParts, RotationTargets
from llmc.models.registry import register_adapter


@register_adapter
class LlavaAdapter(ModelAdapter):
    model_type = "llava"
    aliases = ("Llava",)
    parts = ModelParts(
        language_blocks="model.language_model.layers",
        embed_tokens="model.language_model.embed_tokens",
        final_norm="model.language_model.norm",
        lm_head="lm_head",
        vision_tower="model.vision_tower",
        vision_blocks="model.vision_tower.encoder.layers",
        projector="model.multi_modal_projector",
    )

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # transformers 5 flattens CLIP/SigLIP towers; older or remote towers keep `vision_model`.
        for candidate in ("model.vision_tower.encoder.layers", "model.vision_tower.vision_model.encoder.layers"):
            try:
                self.model.get_submodule(candidate)
            except AttributeError:
                continue
            self.parts = replace(self.parts, vision_blocks=candidate)
            break

    def language_layout(self, block: nn.Module) -> BlockLayout:
        return decoder_layout(block)

    def vision_layout(self, block: nn.Module) -> BlockLayout:
        # CLIP / SigLIP encoder layer: q/k/v/out_proj, fc1 -> act -> fc2.
        return decoder_layout(block, attn="self_attn", mlp="mlp", in_norm="layer_norm1",
                              post_norm="layer_norm2", gated=False,
                              names=("q_proj", "k_proj", "v_proj", "out_proj"), mlp_names=("fc1", "fc2"))

    def rotation_targets(self) -> RotationTargets:
        return RotationTargets(embeddings=(self.parts.embed_tokens,),
                               external_writers=("model.multi_modal_projector.linear_2",),
                               final_norm=self.parts.final_norm, lm_head=self.parts.lm_head)
