"""Where the calibration activations wait between blocks: ``run.offload_activations``.

The hidden states that feed the next block (one per calibration batch) stay on the compute device
(``device``), wait in CPU memory (``cpu``, pinned when the device is a GPU) or in files under the job's
folder (``disk``, read back one batch at a time). ``auto`` measures them once captured and picks the
first place that holds them in half of its free memory: the device, then the CPU, then the disk.
"""
from __future__ import annotations

import uuid
from pathlib import Path

import psutil
import torch
from loguru import logger

MODES = ("device", "cpu", "disk")


class OnDisk:
    """A tensor written to ``folder`` (read back with :meth:`load`)."""

    def __init__(self, t: torch.Tensor, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"{uuid.uuid4().hex}.pt"
        torch.save(t.detach().cpu(), self.path)
        self.shape, self.dtype = tuple(t.shape), t.dtype

    def load(self, device: torch.device) -> torch.Tensor:
        return torch.load(self.path, map_location=device, weights_only=True)

    def drop(self) -> None:
        self.path.unlink(missing_ok=True)


def _free_bytes(where: str, device: torch.device) -> int:
    if where == "device" and device.type == "cuda":
        return torch.cuda.mem_get_info(device.index if device.index is not None else torch.cuda.current_device())[0]
    return psutil.virtual_memory().available


class ActivationStore:
    """Puts the activations between blocks where ``mode`` says and gives them back on ``device``."""

    def __init__(self, mode: str, device: torch.device, folder: Path) -> None:
        if mode not in MODES:
            raise ValueError(f"run.offload_activations: {mode!r}; valid: ['auto', {', '.join(map(repr, MODES))}]")
        self.mode, self.device, self.folder = mode, device, folder

    @classmethod
    def choose(cls, setting: str, tensors: list[torch.Tensor], device: torch.device, folder: Path) -> "ActivationStore":
        """``setting`` as asked, or for ``auto`` the first place that holds ``tensors`` in half its free memory."""
        need = sum(t.numel() * t.element_size() for t in tensors)
        if setting != "auto":
            mode = setting
        else:
            places = ("device", "disk") if device.type == "cpu" else MODES
            mode = next((m for m in places if m == "disk" or need <= 0.5 * _free_bytes(m, device)), "disk")
        logger.info(f"activations: {need / 2**20:.1f} MiB between blocks, kept on {mode} "
                    f"({'chosen by free memory' if setting == 'auto' else 'run.offload_activations'})")
        return cls(mode, device, folder)

    def put(self, t: torch.Tensor) -> "torch.Tensor | OnDisk":
        if self.mode == "device":
            return t
        if self.mode == "cpu":
            out = t.detach().to("cpu")
            return out.pin_memory() if self.device.type == "cuda" else out
        return OnDisk(t, self.folder)

    def get(self, x: "torch.Tensor | OnDisk") -> torch.Tensor:
        if isinstance(x, OnDisk):
            return x.load(self.device)
        return x.to(self.device, non_blocking=True)

    def drop(self, x: "torch.Tensor | OnDisk") -> None:
        if isinstance(x, OnDisk):
            x.drop()
