"""Typed model knowledge: what an algorithm needs to know about a block or a model.

Adapters produce these; algorithms consume them. Module names are relative to
the block (``LayerGroup``) or to the whole model (``ModelParts``,
``RotationTargets``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ProducerKind = Literal["norm", "linear"]
EXTERNAL_WEIGHT_KINDS: tuple[str, ...] = ("in_out", "row")


@dataclass(frozen=True)
class Producer:
    """The op whose output is the input of a layer group, where scales can be folded.

    ``rows`` = ``(start, stop)`` selects the producer's output rows (and bias
    entries) that feed the group, for fused producers: the v-part of a fused
    ``qkv`` in ``[3, heads, head_dim]`` layout is ``(2 * dim, 3 * dim)``.
    ``weight_offset`` is 1.0 for norms that scale by ``(1 + weight)`` (Gemma).
    """

    name: str
    kind: ProducerKind
    rows: tuple[int, int] | None = None
    weight_offset: float = 0.0


@dataclass(frozen=True)
class LayerGroup:
    """Linears that read the same input.

    ``producer``: where AWQ/SmoothQuant fold ``1/s`` (None: nothing can absorb a
    scale, e.g. after a non-linearity; the group is still quantized).
    ``inspect``: the module whose output a search compares (the attention, the
    MLP, or the linears themselves). ``input_of``: the linear whose input is
    cached as the group's input (the first of ``linears``). ``kwargs_from_block``:
    ``inspect`` needs the block's call kwargs (attention masks, rotary
    embeddings) to run. ``reads_hidden`` False: the linears read something
    other than the block's token stream (cross-attention k/v read the vision
    features), so per-token weights ``[B, T]`` do not line up with their rows.
    """

    name: str
    linears: tuple[str, ...]
    inspect: str
    producer: Producer | None = None
    kwargs_from_block: bool = False
    reads_hidden: bool = True

    @property
    def input_of(self) -> str:
        return self.linears[0]


@dataclass(frozen=True)
class BlockLayout:
    """One transformer block: its layer groups, in execution order.

    ``residual_writers``: linears that write into the residual stream (attention
    output and MLP down projection), rotated on their output side.
    ``norms``: the norms that feed residual readers (folded into them by rotation).
    ``writer_norms``: norms applied to a writer's output *before* the residual
    add (Gemma's sandwich ``post_attention_layernorm``): a rotation of the
    residual stream cannot be folded through them.
    ``value``: the op producing the attention values (with its rows when fused)
    and ``attn_output`` the projection consuming them, for head-wise transforms,
    whatever the head grouping; ``head_dim``/``num_heads``/``num_kv_heads`` too.
    ``query_key``: the separate query and key projections (a fused qkv is none of them).
    """

    groups: tuple[LayerGroup, ...]
    query_key: tuple[str, ...] = ()
    residual_writers: tuple[str, ...] = ()
    norms: tuple[str, ...] = ()
    writer_norms: tuple[str, ...] = ()
    value: Producer | None = None
    attn_output: str | None = None
    head_dim: int | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None

    def linears(self) -> tuple[str, ...]:
        return tuple(name for g in self.groups for name in g.linears)


@dataclass(frozen=True)
class ModelParts:
    """Where the parts of a (vision-)language model live, as module paths."""

    language_blocks: str
    embed_tokens: str
    final_norm: str
    lm_head: str
    vision_tower: str | None = None
    vision_blocks: str | None = None
    projector: str | None = None


def vlm_parts(vision_tower: str, vision_blocks: str, projector: str, text_model: str = "model.language_model",
              lm_head: str = "lm_head") -> ModelParts:
    """``ModelParts`` of the usual transformers VLM layout: a text model with ``layers``,
    ``embed_tokens`` and ``norm``, and paths given relative to the model root."""
    return ModelParts(language_blocks=f"{text_model}.layers", embed_tokens=f"{text_model}.embed_tokens",
                      final_norm=f"{text_model}.norm", lm_head=lm_head, vision_tower=vision_tower,
                      vision_blocks=vision_blocks, projector=projector)


@dataclass(frozen=True)
class RotationTargets:
    """Everything rotation touches outside the blocks of the language model.

    ``embeddings``: embedding tables whose rows land in the residual stream.
    ``external_writers``: linears outside the language blocks whose outputs land
    in the residual stream (the projector's last linear; deepstack mergers) and
    are rotated on their output side. ``external_weights``: raw Parameters that
    write into the residual stream, as ``(path, how)``: ``"in_out"`` for a
    ``[in, hidden]`` matrix used as ``x @ W`` (rotated ``W := W Q``), ``"row"``
    for a ``[hidden]`` vector inserted as a token (``v := v Q``).
    ``final_norm`` is folded into ``lm_head``.
    """

    embeddings: tuple[str, ...]
    external_writers: tuple[str, ...]
    final_norm: str
    lm_head: str
    norm_weight_offset: float = 0.0
    external_weights: tuple[tuple[str, str], ...] = ()
