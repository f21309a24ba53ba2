"""GPTQ checkpoints (``save_gptq``): AutoGPTQ / GPTQModel layout, ``checkpoint_format`` ``gptq`` (v1) or
``gptq_v2`` (``save.gptq_format``; ``auto``: v1 when symmetric, v2 when asymmetric).

Layout of one linear ``[out, in]`` with ``b`` bits (``k = 32 / b`` per word), ``G`` groups:

* ``qweight`` int32 ``[in / k, out]``: unsigned integers packed along the
  *input* dim, sequential order: bits ``b*i..b*i+b-1`` of word ``(r, o)`` hold
  input row ``k*r + i`` of output ``o``;
* ``qzeros`` int32 ``[G, out / k]``: zero points packed along the output dim,
  sequential order. **v1 (``gptq``) stores ``zero - 1``** (the loader adds 1
  back); v2 (``gptq_v2``, GPTQModel) stores ``zero``. Symmetric layers have
  zero ``2^(b-1)``: ``0x77777777`` words at 4 bits in v1;
* ``scales`` ``[G, out]`` (float16 by default); ``g_idx`` int32 ``[in]``: the
  group of every input channel (``i // group_size`` unless act-order);
* ``bias`` ``[out]`` when the layer has one.

``w = (q_u - z_u) * s[g_idx]`` with unsigned ``q_u`` (llmc's symmetric integers
shifted by ``2^(b-1)``). Config: ``{"quant_method": "gptq", "bits", "group_size"
(-1 = per channel), "desc_act", "sym", "checkpoint_format", "dynamic"}``;
``dynamic`` holds a negative rule (``"-:regex"``) for each float layer.
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from loguru import logger

from llmc.export.base import Export
from llmc.export.packing import (
    StateDict,
    checkpoint_names,
    float_weight_modules,
    has_act_order,
    pack_int32,
    quantized_layers,
    unpack_int32,
)
from llmc.plan import Part
from llmc.quant.fake_linear import FakeQuantLinear
from llmc.quant.primitives import QuantSpec

if TYPE_CHECKING:
    from llmc.models.base import ModelAdapter
    from llmc.plan import LayerPlan

GPTQ_BITS = (2, 4, 8)
CheckpointFormat = Literal["gptq", "gptq_v2"]


def unsigned(m: FakeQuantLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer weight ``[out, in]`` and zero points ``[out, G]`` on the unsigned grid ``0..2^b-1``."""
    b = m.spec.bits
    q, z = m.int_weight(), m.zero.detach().round().to(torch.int32)
    if m.spec.symmetric:
        return q + 2 ** (b - 1), torch.full_like(z, 2 ** (b - 1))
    return q, z


def gptq_layer_tensors(m: FakeQuantLinear, dtype: torch.dtype, fmt: CheckpointFormat = "gptq") -> StateDict:
    """``qweight``/``qzeros``/``scales``/``g_idx`` (+ ``bias``) of one layer."""
    b = m.spec.bits
    q, z = unsigned(m)
    stored = z - 1 if fmt == "gptq" else z
    if stored.min() < 0:
        raise ValueError("checkpoint_format 'gptq' (v1) stores zero - 1 and cannot hold a zero point of 0 "
                         "(an all-positive group of an asymmetric layer); use checkpoint_format='gptq_v2'")
    gl = m.spec.group_len(m.in_features)
    g_idx = m.g_idx if m.g_idx is not None else torch.arange(m.in_features, device=q.device) // gl
    out = {"qweight": pack_int32(q, b).t().contiguous(),
           "qzeros": pack_int32(stored.t().contiguous(), b),
           "scales": m.scale.detach().t().contiguous().to(dtype),
           "g_idx": g_idx.to(torch.int32)}
    if m.bias is not None:
        out["bias"] = m.bias.detach().to(dtype)
    return out


def gptq_dequantize(t: StateDict, bits: int, fmt: CheckpointFormat) -> torch.Tensor:
    """``qweight``/``qzeros``/``scales``/``g_idx`` -> float weight ``[out, in]``: ``(q - z[g]) * s[g]``."""
    q = unpack_int32(t["qweight"].t().contiguous(), bits).float()  # [out, in]
    z = unpack_int32(t["qzeros"], bits).float().t() + (1 if fmt == "gptq" else 0)  # v1 stores zero - 1
    g = t["g_idx"].long()
    s = t["scales"].float().t()
    return (q - z[:, g]) * s[:, g]


def check_gptq_plan(layers: Iterable[LayerPlan]) -> QuantSpec:
    """The one spec GPTQ can describe (bits in 2/4/8, weight-only); a clear error otherwise."""
    layers = [lp for lp in layers if lp.quantized]
    specs = {lp.spec for lp in layers}
    acts = {lp.act_bits for lp in layers} - {None}
    if acts:
        raise ValueError(f"save_gptq: GPTQ is weight-only; quant.act (a{sorted(acts)}) cannot be stored. "
                         f"Use save_vllm (compressed-tensors) for W8A8")
    if len(specs) > 1:
        raise ValueError(f"save_gptq: GPTQ has one bits/group_size/sym per checkpoint; layers use "
                         f"{sorted(s.describe() for s in specs)}. Use save_vllm for mixed schemes")
    spec = specs.pop()
    if spec.bits not in GPTQ_BITS:
        raise ValueError(f"save_gptq: {spec.bits}-bit does not tile int32 words; valid bits: {list(GPTQ_BITS)}")
    return spec


def why_not_gptq(m: FakeQuantLinear, quantize_vision: bool) -> str | None:
    if m.layer.part is Part.VISION and not quantize_vision:
        return "vision tower: GPTQModel builds GPTQ vision towers float (save.pack_vision: true packs it; vLLM serves both)"
    k = 32 // m.spec.bits
    if m.out_features % k or m.in_features % k:
        return f"shape [{m.out_features}, {m.in_features}] is not divisible by the pack factor {k}"
    return None


def negative_rules(name_map: dict[str, str]) -> dict[str, dict]:
    """GPTQModel/vLLM ``dynamic`` rules that keep each float layer unquantized, under any name prefix."""
    rules = {}
    for mem, ckpt in name_map.items():
        alts = "|".join(re.escape(s) for s in dict.fromkeys((ckpt, mem)))
        rules[f"-:(?:.*\\.)?(?:{alts})$"] = {}
    return rules


class GPTQExport(Export):
    """``save_gptq``: GPTQ, float weights and scales in ``dtype``; vision layers kept float unless
    ``quantize_vision``. Tensors keep the in-memory names (GPTQModel looks them up by them).

    ``checkpoint_format`` ``auto``: ``gptq`` (v1) for symmetric weights, what vLLM serves;
    ``gptq_v2`` for asymmetric ones (GPTQModel refuses asymmetric v1 it did not write; vLLM serves no
    asymmetric GPTQ at all: for vLLM, save_vllm or save_autoawq hold asymmetric weights).
    """

    key, folder = "save_gptq", "gptq"
    checkpoint_names = False

    def __init__(self, adapter: "ModelAdapter", dtype: torch.dtype | None = torch.float16,
                 checkpoint_format: str = "auto", quantize_vision: bool = False,
                 layers: list[LayerPlan] | None = None) -> None:
        super().__init__(adapter, dtype)
        layers = layers if layers is not None else [m.layer for m in quantized_layers(adapter.model).values()]
        if not layers:
            raise ValueError("save_gptq: the model has no quantized layers; run quantization first")
        self.spec = check_gptq_plan([lp for lp in layers if quantize_vision or lp.part is not Part.VISION] or layers)
        if checkpoint_format == "auto":
            checkpoint_format = "gptq" if self.spec.symmetric else "gptq_v2"
        if checkpoint_format not in ("gptq", "gptq_v2"):
            raise ValueError(f"save.gptq_format: {checkpoint_format!r}; valid: ['auto', 'gptq', 'gptq_v2']")
        if checkpoint_format == "gptq" and not self.spec.symmetric:
            raise ValueError("save_gptq: asymmetric GPTQ in the v1 layout (gptq_format: gptq) is served by no runtime "
                             "(vLLM serves symmetric GPTQ only; GPTQModel loads asymmetric v1 only if it wrote it); "
                             "use gptq_format: auto or gptq_v2 (GPTQModel, transformers), or save_vllm / save_autoawq")
        if not self.spec.symmetric:
            logger.warning("gptq: asymmetric GPTQ is served by GPTQModel and transformers, not by vLLM; "
                           "for vLLM write save_vllm (compressed-tensors) or save_autoawq")
        self.checkpoint_format, self.quantize_vision = checkpoint_format, quantize_vision
        self.act_order: list[str] = []  # layers written with non-contiguous groups (desc_act)

    def why_not(self, name: str, m: FakeQuantLinear) -> str | None:
        return why_not_gptq(m, self.quantize_vision)

    def layer(self, name: str, m: FakeQuantLinear) -> StateDict:
        if has_act_order(m):
            self.act_order.append(name)
        return gptq_layer_tensors(m, self.dtype or m.weight.dtype, self.checkpoint_format)

    def decode(self, tensors: StateDict, m: FakeQuantLinear) -> torch.Tensor:
        return gptq_dequantize(tensors, m.spec.bits, self.checkpoint_format)

    def quantization_config(self) -> dict:
        model = self.adapter.model
        float_names = [n for n in float_weight_modules(model) + list(self.kept) if n != self.adapter.model_parts.lm_head]
        name_map = checkpoint_names(model, float_names)
        spec = self.spec
        logger.info(f"gptq: {len(self.written)} layers packed ({spec.describe()}, {self.checkpoint_format}), "
                    f"{len(float_names)} float modules excluded by `dynamic` rules")
        return {"quant_method": "gptq", "bits": spec.bits,
                "group_size": spec.group_size if spec.granularity == "per_group" else -1,
                "desc_act": bool(self.act_order), "sym": spec.symmetric,
                "checkpoint_format": self.checkpoint_format, "lm_head": False, "true_sequential": True,
                "dynamic": negative_rules(name_map), "meta": {"quantizer": ["llmc"]}}


def export_gptq(adapter: "ModelAdapter", out_dir: str | Path, overwrite: bool = False,
                dtype: torch.dtype | None = torch.float16, checkpoint_format: str = "auto",
                quantize_vision: bool = False) -> Path:
    """Write a GPTQ folder."""
    return GPTQExport(adapter, dtype, checkpoint_format, quantize_vision).write(out_dir, overwrite)
