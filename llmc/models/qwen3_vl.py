"""Qwen3-VL (HF ``Qwen3VLForConditionalGeneration``): ViT with fused qkv, patch merger, deepstack.

Vision blocks: ``attn.qkv`` fused ``[3, heads, head_dim]`` + ``attn.proj``, LayerNorms ``norm1``/``norm2``,
plain MLP ``mlp.linear_fc1 -> GELU -> mlp.linear_fc2``. Merger: ``norm -> linear_fc1 -> GELU -> linear_fc2``.

Deepstack: the outputs of vision blocks ``deepstack_visual_indexes`` go through their own mergers
(``model.visual.deepstack_merger_list.{k}``) and are *added* to the image-token hidden states after
language block ``k`` (``Qwen3VLTextModel._deepstack_process``). Hence

* every ``deepstack_merger_list.{k}.linear_fc2`` writes into the language residual stream: a
  rotation target next to the main merger's ``linear_fc2``;
* a block-by-block pipeline must add ``deepstack[k]`` to the output of block ``k`` before it feeds
  block ``k + 1``. The model passes ``visual_pos_masks`` and ``deepstack_visual_embeds`` to the text
  model's ``forward``, not to its blocks: :meth:`capture_extras` reads them from the text model's
  call kwargs (hook :attr:`extras_module` with ``with_kwargs=True``) and :meth:`between_blocks`
  applies the addition; ``llmc.pipeline`` calls both (``capture`` records the extras, the block
  loop adds them after each block).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from llmc.models.base import ModelAdapter
from llmc.models.common import fused_qkv_layout
from llmc.models.layout import BlockLayout, RotationTargets
from llmc.models.qwen_vl import QWEN_VL_PARTS
from llmc.models.registry import register_adapter


@register_adapter
class Qwen3VLAdapter(ModelAdapter):
    model_type = "qwen3_vl"
    aliases = ("Qwen3VL", "Qwen3-VL")
    parts = QWEN_VL_PARTS  # same paths as Qwen2-VL
    extras_module = "model.language_model"  # whose forward kwargs carry the deepstack features

    def vision_layout(self, block: nn.Module) -> BlockLayout:
        return fused_qkv_layout(block, dim=block.attn.qkv.in_features, num_heads=block.attn.num_heads,
                                mlp_names=("linear_fc1", "linear_fc2"), gated=False)

    def deepstack_mergers(self) -> list[str]:
        n = len(self.module("model.visual.deepstack_merger_list"))
        return [f"model.visual.deepstack_merger_list.{k}" for k in range(n)]

    def rotation_targets(self) -> RotationTargets:
        writers = ("model.visual.merger.linear_fc2", *(f"{m}.linear_fc2" for m in self.deepstack_mergers()))
        return RotationTargets(embeddings=(self.model_parts.embed_tokens,), external_writers=writers,
                               final_norm=self.model_parts.final_norm, lm_head=self.model_parts.lm_head)

    # -------------------------------------------------- what a block-by-block pipeline must add
    @staticmethod
    def capture_extras(kwargs: dict[str, Any]) -> dict[str, Any]:
        """From the text model's call kwargs: what :meth:`between_blocks` needs for one batch."""
        embeds = kwargs.get("deepstack_visual_embeds")
        return {"visual_pos_masks": kwargs.get("visual_pos_masks"),
                "deepstack_visual_embeds": list(embeds) if embeds is not None else []}

    @staticmethod
    def between_blocks(part: str, index: int, hidden: torch.Tensor, extras: dict[str, Any]) -> torch.Tensor:
        """Output of block ``index`` -> input of block ``index + 1`` (deepstack addition)."""
        if not extras:
            return hidden
        embeds = extras.get("deepstack_visual_embeds") or []
        if part != "language" or index >= len(embeds) or extras.get("visual_pos_masks") is None:
            return hidden
        mask = extras["visual_pos_masks"].to(hidden.device)
        out = hidden.clone()
        out[mask, :] = out[mask, :] + embeds[index].to(hidden.device, hidden.dtype)
        return out
