"""PaliGemma (HF ``PaliGemmaForConditionalGeneration``): SigLIP tower, one linear projector, Gemma text.

Parts as LLaVA (``model.vision_tower`` SigLIP blocks, ``model.multi_modal_projector``) but the
projector is a single ``linear`` (the writer into the language residual stream; its output is
divided by ``sqrt(hidden)``, a scalar that commutes with rotations) and the text model is Gemma:
RMSNorms scaling by ``(1 + weight)`` (``Producer.weight_offset`` / ``norm_weight_offset`` 1.0), the
embedding scaled by ``sqrt(hidden)``. Gemma (v1, PaliGemma 1) has plain pre-norm blocks, so rotation
is exact; PaliGemma 2's Gemma2 text has sandwich norms (``post_feedforward_layernorm``), which the
layout reports as ``writer_norms`` so that rotation refuses.

Inputs: the processor needs an image with every prompt, puts ``image_seq_length`` ``<image>``
tokens then ``<bos>`` before the text and returns ``token_type_ids`` (0 on the prefix; with
``labels`` the prefix attends bidirectionally); the ``labels`` it may add are dropped.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from llmc.calib.sample import Sample
from llmc.models.common import sandwich_decoder_layout
from llmc.models.layout import BlockLayout
from llmc.models.llava import LlavaAdapter
from llmc.models.registry import register_adapter


@register_adapter
class PaliGemmaAdapter(LlavaAdapter):
    model_type = "paligemma"
    aliases = ("PaliGemma",)
    norm_offset = 1.0
    projector_writers = ("model.multi_modal_projector.linear",)

    def language_layout(self, block: nn.Module) -> BlockLayout:
        if hasattr(block, "pre_feedforward_layernorm"):  # Gemma2 (PaliGemma 2): sandwich norms
            return sandwich_decoder_layout(block, self.norm_offset)
        return super().language_layout(block)

    def encode(self, sample: Sample, with_answer: bool, chat_template: bool = True) -> dict[str, torch.Tensor]:
        enc: dict[str, Any] = super().encode(sample, with_answer, chat_template)
        enc.pop("labels", None)
        return enc
