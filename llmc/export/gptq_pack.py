"""GPTQ checkpoints (``save_gptq``): AutoGPTQ / GPTQModel layout, ``checkpoint_format`` ``gptq`` (v1).

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

from llmc.export.packing import (
    StateDict,
    checkpoint_names,
    float_weight_modules,
    has_act_order,
    log_kept_float,
    pack_int32,
    packed_state_dict,
    quantized_layers,
    write_folder,
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
        return "vision tower: vLLM loads GPTQ vision towers unquantized (pass quantize_vision=True to pack it)"
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


def export_gptq(adapter: "ModelAdapter", out_dir: str | Path, overwrite: bool = False,
                dtype: torch.dtype | None = torch.float16, checkpoint_format: CheckpointFormat = "gptq",
                quantize_vision: bool = False) -> Path:
    """Write a GPTQ folder. Vision-tower layers are kept float unless ``quantize_vision``."""
    model = adapter.model
    layers = quantized_layers(model)
    if not layers:
        raise ValueError("save_gptq: the model has no quantized layers; run quantization first")
    spec = check_gptq_plan(m.layer for m in layers.values())
    kept = {n: why for n, m in layers.items() if (why := why_not_gptq(m, quantize_vision)) is not None}
    log_kept_float("gptq", kept)
    float_names = [n for n in float_weight_modules(model) + list(kept) if n != adapter.model_parts.lm_head]
    name_map = checkpoint_names(model, float_names)
    sd = packed_state_dict(model, layers, kept, dtype,
                           lambda m, dt: gptq_layer_tensors(m, dt, checkpoint_format))
    packed = [m for n, m in layers.items() if n not in kept]
    config = {"quant_method": "gptq", "bits": spec.bits,
              "group_size": spec.group_size if spec.granularity == "per_group" else -1,
              "desc_act": any(has_act_order(m) for m in packed), "sym": spec.symmetric,
              "checkpoint_format": checkpoint_format, "lm_head": False, "true_sequential": True,
              "dynamic": negative_rules(name_map), "meta": {"quantizer": ["llmc"]}}
    logger.info(f"gptq: {len(packed)} layers packed ({spec.describe()}, {checkpoint_format}), "
                f"{len(float_names)} float modules excluded by `dynamic` rules")
    return write_folder(adapter, out_dir, sd, config, dtype=dtype, overwrite=overwrite)
