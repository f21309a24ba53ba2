"""LLaVA-NeXT (1.6) and LLaVA-OneVision: LLaVA with anyres image tiling and an ``image_newline``.

Same parts as :class:`~llmc.models.llava.LlavaAdapter` (CLIP/SigLIP tower, ``linear_1 -> act ->
linear_2`` projector, any decoder). Each image is cut into a grid of tiles (``image_grid_pinpoints``)
plus a base view, so image-token counts vary per sample with the image size, and
``pixel_values`` is ``[batch, tiles, 3, H, W]`` (per-sample tile counts differ for different sizes).

``model.image_newline`` is a raw ``[hidden]`` Parameter inserted as an *embedding* after each row
of tile features: it lands in the language residual stream and must be rotated like an
embedding row (``v := v Q``): ``RotationTargets.external_weights`` kind ``"row"``.
"""
from __future__ import annotations

from llmc.models.llava import LlavaAdapter
from llmc.models.registry import register_adapter

IMAGE_NEWLINE = "model.image_newline"


@register_adapter
class LlavaNextAdapter(LlavaAdapter):
    model_type = "llava_next"
    aliases = ("LlavaNext", "llava-1.6")
    projector_weights = ((IMAGE_NEWLINE, "row"),)  # a raw row added as a token: v := v Q


@register_adapter
class LlavaOnevisionAdapter(LlavaNextAdapter):
    model_type = "llava_onevision"
    aliases = ("LlavaOnevision",)
