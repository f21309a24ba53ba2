"""Real-quant exporters by ``save.*`` key: ``EXPORTERS[key](adapter, out_dir) -> Path``.

The runner writes ``save_path/<folder>`` for every key set to true:

=============  ==========  =========================================================
key            folder      format
=============  ==========  =========================================================
save_vllm      vllm        compressed-tensors (pack-quantized / int-quantized)
save_sgl       sgl         compressed-tensors (same files; SGLang reads them)
save_autoawq   autoawq     AutoAWQ GEMM (w4 asymmetric per-group only)
save_gptq      gptq        GPTQ (``save.gptq_format``: auto = v1 sym / v2 asym)
save_gguf      gguf        GGUF for llama.cpp: ``model.gguf`` + ``mmproj.gguf`` (Q4_0/Q4_1/Q8_0)
=============  ==========  =========================================================

``save_trans`` (with ``save.tpu_check``) is :func:`llmc.export.trans_tpu.export_trans`.
:func:`check_save_plan` runs the formats' refusals on the resolved layer specs
*before* quantization, so a job that cannot be exported fails in seconds.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

from llmc.export.awq_gemm import check_awq_plan, export_autoawq
from llmc.export.compressed import (
    export_compressed_tensors,
    export_sgl,
    export_vllm,
    load_real_quant,
)
from llmc.export.gguf import check_gguf_plan, export_gguf
from llmc.export.gptq_pack import check_gptq_plan, export_gptq
from llmc.export.trans_tpu import check_tpu_plan, export_trans
from llmc.plan import LayerPlan, Part

if TYPE_CHECKING:
    from llmc.models.base import ModelAdapter

Exporter = Callable[["ModelAdapter", "str | Path"], object]

EXPORTERS: dict[str, Exporter] = {
    "save_vllm": export_vllm,
    "save_sgl": export_sgl,
    "save_autoawq": export_autoawq,
    "save_gptq": export_gptq,
    "save_gguf": export_gguf,
}
FOLDERS: dict[str, str] = {"save_vllm": "vllm", "save_sgl": "sgl", "save_autoawq": "autoawq", "save_gptq": "gptq",
                           "save_gguf": "gguf"}

PRECHECKS: dict[str, Callable[[list[LayerPlan]], object]] = {
    "save_autoawq": check_awq_plan,
    "save_gptq": check_gptq_plan,
    "save_gguf": check_gguf_plan,
    "tpu_check": check_tpu_plan,
}


VISION_FLOAT = ("save_autoawq", "save_gptq")  # keep the vision tower float unless save.pack_vision


def packed_layers(key: str, layers: Iterable[LayerPlan], pack_vision: bool = False) -> list[LayerPlan]:
    """The planned layers format ``key`` packs (AutoAWQ / GPTQ keep the vision tower float by default)."""
    keep_vision_float = key in VISION_FLOAT and not pack_vision
    return [lp for lp in layers if not (keep_vision_float and lp.part is Part.VISION)]


def check_save_plan(keys: Iterable[str], layers: Iterable[LayerPlan], pack_vision: bool = False) -> None:
    """Raise the format's clear error now if a requested ``save.*`` key cannot hold the planned layers
    (``QuantPlan.quantized()``, before quantizing)."""
    layers = list(layers)
    for key in keys:
        if key in PRECHECKS:
            PRECHECKS[key](packed_layers(key, layers, pack_vision))


__all__ = ["EXPORTERS", "FOLDERS", "PRECHECKS", "check_save_plan", "export_autoawq", "export_compressed_tensors",
           "export_gptq", "export_sgl", "export_trans", "export_vllm", "load_real_quant"]
