"""InternVL (HF ``InternVLForConditionalGeneration``, InternVL2.5/3 "-hf" checkpoints).

InternViT blocks live at ``model.vision_tower.encoder.layer`` with *split* q/k/v
(``attention.q_proj/k_proj/v_proj``) and ``attention.projection_layer`` as output,
pre-norms ``layernorm_before``/``layernorm_after`` and a plain ``fc1 -> act -> fc2`` MLP.
Each residual branch is multiplied by a per-channel layer scale (``lambda_1``/``lambda_2``)
after its writer; scaling v -> projection_layer is still exact (the layer scale acts on
the output side). Optional q/k RMSNorms (``use_qk_norm``, InternViT-6B) act on the outputs
of q/k over the whole width and do not affect the ``attn_in`` group.
Projector: pixel shuffle -> ``layer_norm`` -> ``linear_1`` -> GELU -> ``linear_2`` (the writer
into the language residual stream). Text: Qwen2 (InternVL3) or any Llama-like decoder.
"""
from __future__ import annotations

from torch import nn

from llmc.models.base import ModelAdapter
from llmc.models.common import decoder_layout
from llmc.models.layout import BlockLayout, vlm_parts
from llmc.models.registry import register_adapter


@register_adapter
class InternVLAdapter(ModelAdapter):
    model_type = "internvl"
    aliases = ("InternVL", "InternVLChat")
    parts = vlm_parts(vision_tower="model.vision_tower", vision_blocks="model.vision_tower.encoder.layer",
                      projector="model.multi_modal_projector")
    projector_writers = ("model.multi_modal_projector.linear_2",)

    def vision_layout(self, block: nn.Module) -> BlockLayout:
        return decoder_layout(block, attn="attention", mlp="mlp", in_norm="layernorm_before",
                              post_norm="layernorm_after", gated=False,
                              names=("q_proj", "k_proj", "v_proj", "projection_layer"), mlp_names=("fc1", "fc2"))
