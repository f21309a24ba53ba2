"""Layout builders shared by adapters: the common block shapes, as data."""
from __future__ import annotations

from dataclasses import replace

from torch import nn

from llmc.models.layout import BlockLayout, LayerGroup, Producer


def _out_in(block: nn.Module, name: str) -> tuple[int, int]:
    lin = block.get_submodule(name)
    return lin.out_features, lin.in_features


def _mlp(mlp: str, names: tuple[str, ...], gated: bool) -> tuple[tuple[str, ...], str, Producer | None]:
    """(input linears, down linear, producer of the down linear's input) of an MLP.

    Gated (``down(act(gate(x)) * up(x))``): ``up`` scales ``down``'s inputs linearly.
    Plain (``fc2(act(fc1(x)))``): nothing can absorb a scale through the non-linearity.
    """
    lin = [f"{mlp}.{n}" for n in names]
    if gated:
        gate, up, down = lin
        return (gate, up), down, Producer(up, "linear")
    fc1, down = lin
    return (fc1,), down, None


def decoder_layout(block: nn.Module, attn: str = "self_attn", mlp: str = "mlp",
                   in_norm: str = "input_layernorm", post_norm: str = "post_attention_layernorm",
                   norm_offset: float = 0.0, gated: bool = True,
                   names: tuple[str, str, str, str] = ("q_proj", "k_proj", "v_proj", "o_proj"),
                   mlp_names: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")) -> BlockLayout:
    """Pre-norm block with separate q/k/v/o and a (gated) MLP: Llama, Qwen2, Mistral, CLIP...

    The v->o pair is a scalable group only when v's outputs map one-to-one onto
    o's inputs (no grouped-query attention); otherwise o has no producer.
    Non-gated MLPs (``fc1 -> act -> fc2``) have no producer for the down linear.
    """
    q, k, v, o = (f"{attn}.{n}" for n in names)
    a = block.get_submodule(attn)
    v_out, _ = _out_in(block, v)
    _, o_in = _out_in(block, o)
    o_prod = Producer(v, "linear") if v_out == o_in else None
    mlp_in, down, down_prod = _mlp(mlp, mlp_names, gated)
    head_dim = getattr(a, "head_dim", None)
    cfg = getattr(a, "config", None)
    n_heads = getattr(cfg, "num_attention_heads", None) or getattr(a, "num_heads", None)
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    return BlockLayout(
        groups=(
            LayerGroup("attn_in", (q, k, v), inspect=attn, producer=Producer(in_norm, "norm", weight_offset=norm_offset)),
            LayerGroup("attn_out", (o,), inspect=o, producer=o_prod),
            LayerGroup("mlp_in", mlp_in, inspect=mlp, producer=Producer(post_norm, "norm", weight_offset=norm_offset)),
            LayerGroup("mlp_out", (down,), inspect=down, producer=down_prod),
        ),
        query_key=(q, k),
        residual_writers=(o, down),
        norms=(in_norm, post_norm),
        value=Producer(v, "linear"), attn_output=o,
        head_dim=head_dim, num_heads=n_heads, num_kv_heads=n_kv,
    )


def fused_qkv_layout(block: nn.Module, dim: int, num_heads: int, attn: str = "attn", qkv: str = "qkv",
                     proj: str = "proj", norm1: str = "norm1", norm2: str = "norm2", mlp: str = "mlp",
                     mlp_names: tuple[str, ...] = ("fc1", "fc2"), gated: bool = False) -> BlockLayout:
    """Block with a fused ``qkv`` linear laid out ``[3, heads, head_dim]`` (Qwen2-VL, InternViT).

    The value rows of the fused linear are ``[2*dim, 3*dim)``: the producer of
    the output projection's input channels.
    """
    q = f"{attn}.{qkv}"
    o = f"{attn}.{proj}"
    mlp_in, down, down_prod = _mlp(mlp, mlp_names, gated)
    return BlockLayout(
        groups=(
            LayerGroup("attn_in", (q,), inspect=attn, producer=Producer(norm1, "norm")),
            LayerGroup("attn_out", (o,), inspect=o, producer=Producer(q, "linear", rows=(2 * dim, 3 * dim))),
            LayerGroup("mlp_in", mlp_in, inspect=mlp, producer=Producer(norm2, "norm")),
            LayerGroup("mlp_out", (down,), inspect=down, producer=down_prod),
        ),
        residual_writers=(o, down),
        norms=(norm1, norm2),
        value=Producer(q, "linear", rows=(2 * dim, 3 * dim)), attn_output=o,
        head_dim=dim // num_heads, num_heads=num_heads, num_kv_heads=num_heads,
    )


def clip_encoder_layout(block: nn.Module) -> BlockLayout:
    """CLIP / SigLIP encoder layer: ``layer_norm1`` -> q/k/v/``out_proj``, ``layer_norm2`` -> fc1 -> act -> fc2."""
    return decoder_layout(block, in_norm="layer_norm1", post_norm="layer_norm2", gated=False,
                          names=("q_proj", "k_proj", "v_proj", "out_proj"), mlp_names=("fc1", "fc2"))


SANDWICH_NORMS = ("post_attention_layernorm", "post_feedforward_layernorm")


def sandwich_decoder_layout(block: nn.Module, norm_offset: float = 1.0) -> BlockLayout:
    """Gemma2/3 decoder layer: the MLP reads ``pre_feedforward_layernorm``, and the attention and MLP
    outputs are normalised again before the residual add (``writer_norms``: rotation must refuse)."""
    layout = decoder_layout(block, post_norm="pre_feedforward_layernorm", norm_offset=norm_offset)
    return replace(layout, writer_norms=SANDWICH_NORMS)
