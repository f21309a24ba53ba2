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
each quantized layer's bits, group size, symmetry and part, under its
checkpoint name, and the ``llm_convert.py`` arguments that match.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loguru import logger

from llmc.export.atomic import atomic_dir
from llmc.export.packing import Plan, checkpoint_names, describe, float_state_dict, plan_of, quantized_layers

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


def part_of(adapter: "ModelAdapter", name: str) -> str:
    vt = adapter.parts.vision_tower
    return "vision" if vt is not None and name.startswith(f"{vt}.") else "language"


def check_tpu_plan(plan: Plan, vision_prefix: str | None = None) -> str:
    """Raise a clear error unless TPU-MLIR can reproduce ``plan``; returns the matching llm_convert args."""
    bad = {n: describe(s, a) for n, (s, a) in plan.items()
           if (s.bits, s.symmetric, s.granularity) not in TPU_ALLOWED or a is not None}
    if bad:
        example = ", ".join(f"{n} ({d})" for n, d in list(bad.items())[:3])
        raise ValueError(f"save.tpu_check: {len(bad)} layers use a scheme TPU-MLIR cannot run, e.g. {example}. "
                         f"Allowed: {ALLOWED_TEXT}")
    vision = f"{vision_prefix}." if vision_prefix else None
    lang = {s for n, (s, _) in plan.items() if not (vision and n.startswith(vision))}
    if len(lang) > 1:
        raise ValueError(f"save.tpu_check: TPU-MLIR's llm_convert takes one --quantize/--q_group_size for the "
                         f"language model; layers use {sorted(s.describe() for s in lang)}. Use one spec")
    if not lang:
        return "-q bf16"
    spec = lang.pop()
    return TPU_ALLOWED[(spec.bits, spec.symmetric, spec.granularity)].format(g=spec.group_size)


def check_tpu_constraints(adapter: "ModelAdapter") -> str:
    """:func:`check_tpu_plan` on the quantized model."""
    return check_tpu_plan(plan_of(quantized_layers(adapter.model)), adapter.parts.vision_tower)


def quant_layers_sidecar(adapter: "ModelAdapter", llm_convert_args: str | None) -> dict[str, Any]:
    """``llmc_quant_layers.json``: every quantized layer under its checkpoint name."""
    layers = quantized_layers(adapter.model)
    names = checkpoint_names(adapter.model, layers)
    entries = {}
    for n, m in layers.items():
        entries[names[n]] = {
            "module": n, "part": part_of(adapter, n), "bits": m.spec.bits, "symmetric": m.spec.symmetric,
            "granularity": m.spec.granularity,
            "group_size": m.spec.group_size if m.spec.granularity == "per_group" else -1,
            "act_bits": m.act_bits, "act_order": m.g_idx is not None,
        }
    return {"format": "llmc_quant_layers", "version": 1, "weights": "transformed float (not rounded)",
            "llm_convert_args": llm_convert_args, "layers": entries}


def export_trans(adapter: "ModelAdapter", out_dir: str | Path, tpu_check: bool = False,
                 overwrite: bool = False) -> Path:
    """The transformed float folder (``save_trans``) + sidecar; ``tpu_check`` validates first."""
    args = check_tpu_constraints(adapter) if tpu_check else None
    sidecar = quant_layers_sidecar(adapter, args)
    with atomic_dir(out_dir, overwrite) as tmp:
        adapter.model.save_pretrained(tmp, state_dict=float_state_dict(adapter.model))
        adapter.processor.save_pretrained(tmp)
        (tmp / SIDECAR).write_text(json.dumps(sidecar, indent=1) + "\n")
    if args:
        logger.info(f"tpu: transformed float model at {out_dir}; compile with "
                    f"llm_convert.py -m {out_dir} -s <seq_length> {args} (see docs/export_tpu.md)")
    return Path(out_dir)
