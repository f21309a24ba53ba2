"""Transformed float folder for TPU-MLIR (``save_trans`` with ``save.tpu_check: true``).

TPU-MLIR's ``llm_convert.py`` re-quantizes the float weights itself with one
``--quantize`` mode and one ``--q_group_size`` for the whole language model, so
the quantization llmc simulated must be one the TPU can reproduce:

* ``w4`` per-group, asymmetric (``-q w4bf16 -g G``; TPU-MLIR's default),
* ``w4`` per-group, symmetric (``-q w4bf16 -g G --symmetric``),
* ``w8`` per-channel, symmetric (``-q w8bf16``),

weight-only, the same spec for every quantized language layer. The check runs
before anything is written. The folder holds the transformed float weights
(AWQ scales / rotations folded in, not rounded) plus ``llmc_quant_layers.json``:
the quantization plan of the quantized layers (:meth:`llmc.plan.QuantPlan.to_json`: bits,
group size, symmetry, part, roles per layer), each layer's checkpoint name, and the
``llm_convert.py`` arguments that match.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loguru import logger

from llmc.export.hf import FloatExport
from llmc.export.packing import checkpoint_names, quantized_layers
from llmc.export.writer import FolderWriter
from llmc.plan import LayerPlan, Part, QuantPlan

if TYPE_CHECKING:
    from llmc.models.base import ModelAdapter

SIDECAR = "llmc_quant_layers.json"
TPU_ALLOWED: dict[tuple[int, bool, str], str] = {
    (4, False, "per_group"): "-q w4bf16 -g {g}",
    (4, True, "per_group"): "-q w4bf16 -g {g} --symmetric",
    (8, True, "per_channel"): "-q w8bf16",
}
ALLOWED_TEXT = ("w4 per_group asymmetric (-q w4bf16 -g G), w4 per_group symmetric (--symmetric), "
                "w8 per_channel symmetric (-q w8bf16); weight-only (no quant.act)")


def check_tpu_plan(layers: Iterable[LayerPlan]) -> str:
    """Raise a clear error unless TPU-MLIR can reproduce the layers' plan; returns the matching llm_convert args."""
    layers = [lp for lp in layers if lp.quantized]
    bad = {lp.name: lp.describe() for lp in layers
           if (lp.spec.bits, lp.spec.symmetric, lp.spec.granularity) not in TPU_ALLOWED or lp.act_bits is not None}
    if bad:
        example = ", ".join(f"{n} ({d})" for n, d in list(bad.items())[:3])
        raise ValueError(f"save.tpu_check: {len(bad)} layers use a scheme TPU-MLIR cannot run, e.g. {example}. "
                         f"Allowed: {ALLOWED_TEXT}")
    lang = {lp.spec for lp in layers if lp.part is Part.LANGUAGE}
    if len(lang) > 1:
        raise ValueError(f"save.tpu_check: TPU-MLIR's llm_convert takes one --quantize/--q_group_size for the "
                         f"language model; layers use {sorted(s.describe() for s in lang)}. Use one spec")
    if not lang:
        return "-q bf16"
    spec = lang.pop()
    return TPU_ALLOWED[(spec.bits, spec.symmetric, spec.granularity)].format(g=spec.group_size)


def check_tpu_constraints(adapter: "ModelAdapter") -> str:
    """:func:`check_tpu_plan` on the quantized model's layers."""
    return check_tpu_plan(m.layer for m in quantized_layers(adapter.model).values())


def quant_layers_sidecar(adapter: "ModelAdapter", llm_convert_args: str | None) -> dict[str, Any]:
    """``llmc_quant_layers.json``: the plan of the quantized layers, with their checkpoint names."""
    layers = quantized_layers(adapter.model)
    names = checkpoint_names(adapter.model, layers)
    plan = QuantPlan(tuple(m.layer for m in layers.values()), tuple(dict.fromkeys(m.layer.part for m in layers.values())))
    return plan.to_json(weights="transformed float (not rounded)", llm_convert_args=llm_convert_args,
                        checkpoint_names=names, act_order=[n for n, m in layers.items() if m.g_idx is not None])


class TransExport(FloatExport):
    """``save_trans``: the transformed float weights, and ``llmc_quant_layers.json`` (checked for TPU-MLIR
    when ``tpu_check``)."""

    def __init__(self, adapter: "ModelAdapter", tpu_check: bool = False,
                 layers: list[LayerPlan] | None = None) -> None:
        super().__init__(adapter)
        if tpu_check:
            self.args = check_tpu_plan(layers) if layers is not None else check_tpu_constraints(adapter)
        else:
            self.args = None

    def finish(self, writer: FolderWriter) -> Path:
        folder = super().finish(writer)
        (folder / SIDECAR).write_text(json.dumps(quant_layers_sidecar(self.adapter, self.args), indent=1) + "\n")
        if self.args:
            logger.info(f"tpu: transformed float model written; compile with llm_convert.py -m <save_path>/trans "
                        f"-s <seq_length> {self.args} (see docs/export_tpu.md)")
        return folder


def export_trans(adapter: "ModelAdapter", out_dir: str | Path, tpu_check: bool = False,
                 overwrite: bool = False) -> Path:
    """The transformed float folder (``save_trans``) + sidecar; ``tpu_check`` validates first."""
    return TransExport(adapter, tpu_check).write(out_dir, overwrite)
