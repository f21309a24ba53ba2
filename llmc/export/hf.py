"""Float Hugging Face folders: ``save_trans`` (transformed float) and ``save_fake`` (fake-quant weights)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from llmc.export.atomic import atomic_dir
from llmc.quant.fake_linear import FakeQuantLinear

if TYPE_CHECKING:
    from llmc.models.base import ModelAdapter


def export_state_dict(model: torch.nn.Module, fake: bool) -> dict[str, torch.Tensor]:
    """The model's state dict with each fake-quant linear's weight quantized (``fake``) or float."""
    sd = dict(model.state_dict())
    for name, m in model.named_modules():
        if isinstance(m, FakeQuantLinear) and fake:
            sd[f"{name}.weight"] = m.quantized_weight().detach()
    return sd


@torch.no_grad()
def save_hf_folder(adapter: "ModelAdapter", out_dir: str | Path, fake: bool, overwrite: bool = False) -> Path:
    """Write a complete folder (safetensors, config, processor, chat template) that ``from_pretrained`` loads."""
    with atomic_dir(out_dir, overwrite) as tmp:
        adapter.model.save_pretrained(tmp, state_dict=export_state_dict(adapter.model, fake))
        adapter.processor.save_pretrained(tmp)
    return Path(out_dir)
