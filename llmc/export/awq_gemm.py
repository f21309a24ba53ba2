"""AutoAWQ GEMM checkpoints (``save_autoawq``) and their unpacking.

Layout of one linear ``[out, in]`` (AutoAWQ ``WQLinear_GEMM``, group size ``g``):

* ``qweight`` int32 ``[in, out / 8]``: the unsigned 4-bit weight, transposed to
  ``[in, out]`` and packed along the output dim, 8 per word in AutoAWQ's
  interleaved order: nibble ``i`` (bits ``4i..4i+3``) of word ``j`` holds output
  column ``8j + AWQ_ORDER[i]``, ``AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]``;
* ``qzeros`` int32 ``[in / g, out / 8]``: zero points, same packing, stored as
  is (no -1 offset);
* ``scales`` ``[in / g, out]`` (float16 by default, what the kernels use);
* ``bias`` ``[out]`` when the layer has one.

``w = (q - z) * s`` per group: llmc's asymmetric convention, so the integers are
``FakeQuantLinear.int_weight()`` unchanged. ``config.json`` gets
``{"quant_method": "awq", "bits": 4, "group_size": g, "zero_point": true,
"sym": false, "version": "gemm", "modules_to_not_convert": [...]}`` listing every float
linear in both spellings (in-memory and checkpoint names).
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

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
    spellings,
    unpack_int32,
)
from llmc.plan import Part
from llmc.quant.fake_linear import FakeQuantLinear

if TYPE_CHECKING:
    from llmc.models.base import ModelAdapter
    from llmc.plan import LayerPlan

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_BITS = 4


def pack_awq(q: torch.Tensor) -> torch.Tensor:
    """Unsigned 4-bit ``[rows, out]`` -> ``[rows, out / 8]`` int32 in AutoAWQ's interleaved order."""
    return pack_int32(q, AWQ_BITS, AWQ_ORDER)


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_awq`."""
    return unpack_int32(packed, AWQ_BITS, AWQ_ORDER)


def awq_layer_tensors(m: FakeQuantLinear, dtype: torch.dtype) -> StateDict:
    """``qweight``/``qzeros``/``scales`` (+ ``bias``) of one asymmetric 4-bit per-group layer."""
    q = m.int_weight()  # [out, in], 0..15
    out = {"qweight": pack_awq(q.t().contiguous()),
           "qzeros": pack_awq(m.zero.round().to(torch.int32).t().contiguous()),
           "scales": m.scale.detach().t().contiguous().to(dtype)}
    if m.bias is not None:
        out["bias"] = m.bias.detach().to(dtype)
    return out


def awq_dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """AutoAWQ GEMM tensors -> float weight ``[out, in]`` (computed in float32, returned in ``dtype``)."""
    q = unpack_awq(qweight).float()  # [in, out]
    z = unpack_awq(qzeros).float().repeat_interleave(group_size, dim=0)
    s = scales.float().repeat_interleave(group_size, dim=0)
    return ((q - z) * s).t().contiguous().to(dtype)


def check_awq_plan(layers: Iterable[LayerPlan]) -> int:
    """The common group size; a clear error when a layer is not 4-bit asymmetric per-group weight-only."""
    layers = [lp for lp in layers if lp.quantized]
    bad = {lp.name: lp.describe() for lp in layers
           if not (lp.spec.bits == AWQ_BITS and not lp.spec.symmetric and lp.spec.granularity == "per_group"
                   and lp.act_bits is None)}
    if bad:
        example = ", ".join(f"{n} ({d})" for n, d in list(bad.items())[:3])
        raise ValueError(f"save_autoawq: AutoAWQ GEMM holds only 4-bit asymmetric per-group weight-only layers "
                         f"(quant.weight: bit 4, symmetric false, granularity per_group, no quant.act); "
                         f"{len(bad)} layers differ, e.g. {example}. Use save_vllm (compressed-tensors) "
                         f"or save_gptq for other schemes")
    sizes = sorted({lp.spec.group_size for lp in layers})
    if len(sizes) > 1:
        raise ValueError(f"save_autoawq: AutoAWQ has one group_size per checkpoint; layers use {sizes}. "
                         f"Use one group size, or save_vllm (compressed-tensors) for mixed schemes")
    return sizes[0]


def why_not_awq(m: FakeQuantLinear) -> str | None:
    if m.out_features % (32 // AWQ_BITS):
        return f"out_features={m.out_features} is not divisible by the pack factor 8"
    if has_act_order(m):
        return "non-contiguous groups (g_idx) cannot be stored in AutoAWQ"
    return None


class AWQExport(Export):
    """``save_autoawq``: AutoAWQ GEMM, float weights and scales in ``dtype`` (float16: what AWQ kernels run).

    Tensors keep the model's in-memory names (``model.language_model.layers...``): GPTQModel looks
    tensors up by them (with the names ``save_pretrained`` writes it loaded nothing and generated NaN,
    docs/runtimes.md); vLLM and transformers read both spellings. Vision-tower layers are written as
    their fake-quant float weights unless ``pack_vision`` (GPTQModel builds vision towers float).
    """

    key, folder = "save_autoawq", "autoawq"
    checkpoint_names = False

    def __init__(self, adapter: "ModelAdapter", dtype: torch.dtype | None = torch.float16,
                 layers: list[LayerPlan] | None = None, pack_vision: bool = False) -> None:
        super().__init__(adapter, dtype)
        self.pack_vision = pack_vision
        layers = layers if layers is not None else [m.layer for m in quantized_layers(adapter.model).values()]
        if not layers:
            raise ValueError("save_autoawq: the model has no quantized layers; run quantization first")
        packed = [lp for lp in layers if pack_vision or lp.part is not Part.VISION]
        self.group_size = check_awq_plan(packed or layers)

    def why_not(self, name: str, m: FakeQuantLinear) -> str | None:
        if m.layer.part is Part.VISION and not self.pack_vision:
            return "vision tower: GPTQModel builds AWQ vision towers float (save.pack_vision: true packs it)"
        return why_not_awq(m)

    def layer(self, name: str, m: FakeQuantLinear) -> StateDict:
        return awq_layer_tensors(m, self.dtype or m.weight.dtype)

    def decode(self, tensors: StateDict, m: FakeQuantLinear) -> torch.Tensor:
        return awq_dequantize(tensors["qweight"], tensors["qzeros"], tensors["scales"], self.group_size)

    def quantization_config(self) -> dict:
        model = self.adapter.model
        float_names = float_weight_modules(model) + list(self.kept)
        name_map = checkpoint_names(model, float_names)
        logger.info(f"autoawq: {len(self.written)} layers packed (w4 g{self.group_size} asym), "
                    f"{len(float_names)} float modules not converted")
        return {"quant_method": "awq", "bits": AWQ_BITS, "group_size": self.group_size, "zero_point": True,
                "sym": False, "version": "gemm", "modules_to_not_convert": spellings(name_map, float_names)}


def export_autoawq(adapter: "ModelAdapter", out_dir: str | Path, overwrite: bool = False,
                   dtype: torch.dtype | None = torch.float16, pack_vision: bool = False) -> Path:
    """Write an AutoAWQ GEMM folder."""
    return AWQExport(adapter, dtype, pack_vision=pack_vision).write(out_dir, overwrite)
