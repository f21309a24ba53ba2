"""Float Hugging Face folders: ``save_trans`` (transformed float) and ``save_fake`` (fake-quant weights)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from llmc.export.base import Export
from llmc.export.writer import StateDict
from llmc.quant.fake_linear import FakeQuantLinear

if TYPE_CHECKING:
    from llmc.models.base import ModelAdapter


class FakeExport(Export):
    """``save_fake``: every quantized layer holds its fake-quantized (dequantized) weight."""

    key, folder = "save_fake", "fake"

    def layer(self, name: str, m: FakeQuantLinear) -> StateDict:
        return {"weight": m.quantized_weight().detach(), **({"bias": m.bias.detach()} if m.bias is not None else {})}

    def decode(self, tensors: StateDict, m: FakeQuantLinear) -> torch.Tensor:
        return tensors["weight"]


class FloatExport(Export):
    """The transformed float weights (fake quantization off): the base of ``save_trans``."""

    key, folder = "save_trans", "trans"


def export_state_dict(model: torch.nn.Module, fake: bool) -> dict[str, torch.Tensor]:
    """The model's state dict with each fake-quant linear's weight quantized (``fake``) or float."""
    sd = dict(model.state_dict())
    for name, m in model.named_modules():
        if isinstance(m, FakeQuantLinear) and fake:
            sd[f"{name}.weight"] = m.quantized_weight().detach()
    return sd


def save_hf_folder(adapter: "ModelAdapter", out_dir: str | Path, fake: bool, overwrite: bool = False) -> Path:
    """Write a complete folder (safetensors, config, processor, chat template) that ``from_pretrained`` loads."""
    return (FakeExport if fake else FloatExport)(adapter).write(out_dir, overwrite)
