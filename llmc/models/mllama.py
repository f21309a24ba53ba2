"""Mllama / Llama-3.2-Vision (HF ``MllamaForConditionalGeneration``): cross-attention to the image.

Language blocks are of two kinds, interleaved (``text_config.cross_attention_layers``):

* self-attention blocks: a Llama decoder layer (``self_attn.q/k/v/o_proj``, gated MLP);
* cross-attention blocks::

      h = h + tanh(g_attn) * o_proj(attn(q_proj(input_layernorm(h)), k_proj(X), v_proj(X)))
      h = h + tanh(g_mlp) * row_mask * down(mlp(post_attention_layernorm(h)))

  where ``X`` = ``cross_attention_states``, the projected vision features. ``q_proj`` reads the
  residual stream (producer ``input_layernorm``); ``k_proj``/``v_proj`` read ``X``: they form their own
  group with no producer (``multi_modal_projector`` sits outside the block) and
  ``reads_hidden=False`` (their rows are vision tokens, not text tokens: per-token weights do not
  apply). q/k are RMS-normed per head after the projection (``q_norm``/``k_norm``): nothing for
  the groups. The tanh gates and the row mask are per-token scalars on the writers' outputs.

Every block is called with the same kwargs (the text model passes ``cross_attention_states``,
``cross_attention_mask`` and ``full_text_row_masked_out_mask`` to all of them); the kinds are
``"cross_attention"`` / ``"self_attention"``. Without an image the model *skips* the
cross-attention blocks; a block-by-block pipeline needs images in every batch.

Rotation is exact without touching the vision side: ``multi_modal_projector`` writes into the
cross-attention k/v inputs, *not* into the residual stream, so it is no rotation target (rotating
it as a writer would need ``W := W Q`` on every cross k/v, which cancels out). The residual readers
(q and the MLPs) and writers (o, down) of both block kinds rotate as usual; k/v stay as they are.

Vision: a local encoder (``vision_model.transformer.layers``, the block list processed here) and a
gated global encoder (``vision_model.global_transformer.layers``, after ``layernorm_post`` and the
post-tile embedding; not reachable as one chain with the local layers, so it stays in float).
Both use ``self_attn.q/k/v/o_proj``, LayerNorms ``input_layernorm``/``post_attention_layernorm``
and ``mlp.fc1 -> GELU -> mlp.fc2``.
"""
from __future__ import annotations

from torch import nn

from llmc.models.base import ModelAdapter
from llmc.models.common import decoder_layout
from llmc.models.layout import BlockLayout, LayerGroup, Producer, vlm_parts
from llmc.models.registry import register_adapter


def cross_attention_layout(block: nn.Module, attn: str = "cross_attn") -> BlockLayout:
    """A cross-attention block: q/o and the MLP read/write the residual stream, k/v read the vision features."""
    q, k, v, o = (f"{attn}.{n}" for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    a = block.get_submodule(attn)
    o_prod = Producer(v, "linear") if block.get_submodule(v).out_features == block.get_submodule(o).in_features else None
    return BlockLayout(
        groups=(
            LayerGroup("attn_q", (q,), inspect=attn, producer=Producer("input_layernorm", "norm")),
            LayerGroup("attn_kv", (k, v), inspect=attn, producer=None, reads_hidden=False),
            LayerGroup("attn_out", (o,), inspect=o, producer=o_prod),
            LayerGroup("mlp_in", ("mlp.gate_proj", "mlp.up_proj"), inspect="mlp",
                       producer=Producer("post_attention_layernorm", "norm")),
            LayerGroup("mlp_out", ("mlp.down_proj",), inspect="mlp.down_proj", producer=Producer("mlp.up_proj", "linear")),
        ),
        query_key=(q, k),
        residual_writers=(o, "mlp.down_proj"),
        norms=("input_layernorm", "post_attention_layernorm"),
        value=Producer(v, "linear"), attn_output=o,
        head_dim=a.head_dim, num_heads=a.num_heads, num_kv_heads=a.num_key_value_heads,
    )


@register_adapter
class MllamaAdapter(ModelAdapter):
    model_type = "mllama"
    aliases = ("Mllama", "llama-3.2-vision")
    parts = vlm_parts(vision_tower="model.vision_model", vision_blocks="model.vision_model.transformer.layers",
                      projector="model.multi_modal_projector")
    # The projector feeds cross-attention k/v only: no writer into the residual stream outside the
    # blocks, so `projector_writers` stays empty.

    def cross_attention_layers(self) -> list[int]:
        return list(self.model.config.get_text_config().cross_attention_layers)

    def block_kind(self, part: str, index: int) -> object:
        if part == "language":
            return "cross_attention" if index in self.cross_attention_layers() else "self_attention"
        return super().block_kind(part, index)

    def language_layout(self, block: nn.Module) -> BlockLayout:
        if hasattr(block, "cross_attn"):
            return cross_attention_layout(block)
        return decoder_layout(block)

    def vision_layout(self, block: nn.Module) -> BlockLayout:
        return decoder_layout(block, gated=False, mlp_names=("fc1", "fc2"))
