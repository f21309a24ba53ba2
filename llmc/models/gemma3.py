"""Gemma 3 (HF ``Gemma3ForConditionalGeneration``): SigLIP tower, pooled projector, Gemma3 text.

Language blocks are "sandwich" blocks::

    h = h + post_attention_layernorm(o_proj(attn(input_layernorm(h))))
    h = h + post_feedforward_layernorm(down(mlp(pre_feedforward_layernorm(h))))

All four norms are RMSNorms scaling by ``(1 + weight)`` (``Producer.weight_offset = 1.0``,
``RotationTargets.norm_weight_offset = 1.0``); the readers' producers are ``input_layernorm``
and ``pre_feedforward_layernorm``. The embedding multiplies by ``sqrt(hidden)`` (a scalar: it
commutes with any rotation). The projector is ``mm_soft_emb_norm`` (RMSNorm, 1 + w) then
``x @ mm_input_projection_weight``: a raw ``[vision_hidden, text_hidden]`` Parameter, not a Linear.

Rotation (QuaRot-style) is refused by the algorithm, not here: ``o_proj``/``down_proj`` are
followed by ``post_*_layernorm`` *before* the residual add, so rotating their output rows is not
exact (``diag(1 + w) y / rms(y)`` does not commute with ``Q``; an online ``Q^T`` after each
post-norm would be needed). The layout says so in ``BlockLayout.writer_norms``. The targets are
complete otherwise: the projector writes through the raw weight ``mm_input_projection_weight``
(``[in, out]``, used as ``x @ W``: ``RotationTargets.external_weights`` kind ``"in_out"``).
"""
from __future__ import annotations

from torch import nn

from llmc.models.base import ModelAdapter
from llmc.models.common import clip_encoder_layout, sandwich_decoder_layout
from llmc.models.layout import BlockLayout, vlm_parts
from llmc.models.registry import register_adapter

PROJECTOR_WEIGHT = "model.multi_modal_projector.mm_input_projection_weight"  # [in, out]: y = x @ W


@register_adapter
class Gemma3Adapter(ModelAdapter):
    model_type = "gemma3"
    aliases = ("Gemma3",)
    parts = vlm_parts(vision_tower="model.vision_tower", vision_blocks="model.vision_tower.encoder.layers",
                      projector="model.multi_modal_projector")
    norm_offset = 1.0
    vision_blocks_candidates = ("model.vision_tower.encoder.layers",
                                "model.vision_tower.vision_model.encoder.layers")
    projector_weights = ((PROJECTOR_WEIGHT, "in_out"),)  # used as x @ W: rotated W := W Q
    template_has_bos = True  # the chat template starts with <bos>

    def language_layout(self, block: nn.Module) -> BlockLayout:
        return sandwich_decoder_layout(block, self.norm_offset)

    def vision_layout(self, block: nn.Module) -> BlockLayout:
        return clip_encoder_layout(block)
