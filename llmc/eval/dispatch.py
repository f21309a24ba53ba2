"""Loading a model for evaluation when it may not fit: accelerate's dispatch over the device, CPU memory
and an offload folder on disk (``device_map="auto"`` with the free memory as ``max_memory``)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import psutil
import torch
from loguru import logger
from torch import nn

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def free_memory(device: torch.device, headroom: float = 0.8) -> dict[Any, int]:
    """``max_memory`` for accelerate: ``headroom`` of the free memory of the device (GPU) and of the CPU."""
    mem: dict[Any, int] = {"cpu": int(psutil.virtual_memory().available * headroom)}
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        free, _ = torch.cuda.mem_get_info(index)
        mem[index] = int(free * headroom)
    return mem


def load_dispatched(folder: str | Path, auto_class: Any, dtype: str, device: torch.device,
                    offload_folder: Path) -> nn.Module:
    """The model saved in ``folder``, placed by accelerate: on ``device`` what fits, then CPU, then disk."""
    offload_folder.mkdir(parents=True, exist_ok=True)
    max_memory = free_memory(device)
    model = auto_class.from_pretrained(folder, dtype="auto" if dtype == "auto" else _DTYPES[dtype],
                                       device_map="auto", max_memory=max_memory, offload_folder=str(offload_folder))
    placed = sorted({str(v) for v in (getattr(model, "hf_device_map", None) or {"": "cpu"}).values()})
    logger.info(f"eval: {Path(folder).name} loaded with accelerate's dispatch on {placed}")
    return model.eval()
