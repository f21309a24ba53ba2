"""The exporter template: one output folder, written scope by scope.

An :class:`Export` turns each module into the tensors its format stores (``layer`` for a fake-quant
linear: packed integers, scales...; float modules as they are, cast to ``dtype``), hands them to a
:class:`llmc.export.writer.FolderWriter` one scope at a time (the whole model at once, or block by
block when the checkpoint is streamed) and writes the format's config at the end. Layers a format
cannot hold are written as their fake-quant float weights and listed in ``kept``.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch
from loguru import logger
from torch import nn

from llmc.export.atomic import atomic_dir
from llmc.export.writer import FolderWriter, StateDict, leaf_state
from llmc.quant.fake_linear import FakeQuantLinear

if TYPE_CHECKING:
    from llmc.models.base import ModelAdapter


class ExportMismatch(RuntimeError):
    """What an export wrote does not read back as the fake-quant model (layers named)."""


class Export:
    """Base class of the exporters; subclasses set ``key``/``folder`` and override what differs."""

    key: ClassVar[str]
    folder: ClassVar[str]
    checkpoint_names: ClassVar[bool] = True  # tensors under the names save_pretrained writes

    def __init__(self, adapter: "ModelAdapter", dtype: torch.dtype | None = None) -> None:
        self.adapter = adapter
        self.dtype = dtype  # floats cast to it (None: as they are)
        self.kept: dict[str, str] = {}  # quantized layers the format cannot hold -> why (written as floats)
        self.written: dict[str, FakeQuantLinear] = {}  # quantized layers written in the format
        self.mismatched: list[str] = []  # layers whose written tensors do not read back as their weights

    def why_not(self, name: str, m: FakeQuantLinear) -> str | None:
        """Why the format cannot hold this quantized layer (None: it can)."""
        return None

    def layer(self, name: str, m: FakeQuantLinear) -> StateDict:
        """The tensors (local names) of a quantized layer the format holds."""
        return {"weight": m.weight.detach(), **({"bias": m.bias.detach()} if m.bias is not None else {})}

    def decode(self, tensors: StateDict, m: FakeQuantLinear) -> torch.Tensor | None:
        """The float weight ``tensors`` hold, read back by the format's own rules (None: not checked)."""
        return None

    def _check(self, name: str, m: FakeQuantLinear, tensors: StateDict) -> None:
        """The written tensors must read back as the fake-quant weight: to fp16 rounding of the scales."""
        got = self.decode(tensors, m)
        if got is None:
            return
        want = m.quantized_weight().detach().float()
        tol = float(want.abs().max()) * (2.0**-9 if self.dtype in (torch.float16, torch.bfloat16) else 1e-6)
        if not torch.isfinite(got).all() or float((got.float() - want).abs().max()) > tol:
            self.mismatched.append(name)

    def quantization_config(self) -> dict[str, Any] | Callable[[Path], None] | None:
        """Written into ``config.json`` once every scope is written (None: none)."""
        return None

    def _tensors(self, name: str, module: nn.Module) -> StateDict | None:
        if isinstance(module, FakeQuantLinear):
            why = self.why_not(name, module)
            if why is None:
                self.written[name] = module
                out = self.layer(name, module)
                self._check(name, module, out)
                return out
            self.kept[name] = why
            return self._cast({"weight": module.quantized_weight().detach(),
                               **({"bias": module.bias.detach()} if module.bias is not None else {})})
        if self.dtype is None:
            return None
        own = {k: p for k, p in module._parameters.items() if p is not None}
        own.update({k: b for k, b in module._buffers.items()
                    if b is not None and k not in module._non_persistent_buffers_set})
        return self._cast(own)

    def _cast(self, own: StateDict) -> StateDict:
        if self.dtype is None:
            return own
        return {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in own.items()}

    @torch.no_grad()
    def write_scope(self, writer: FolderWriter, prefix: str, module: nn.Module, skip: tuple[str, ...] = ()) -> None:
        """Add one scope of the model (``module`` named ``prefix``, without ``skip``) to the folder."""
        writer.add(leaf_state(module, prefix, self._tensors, skip))

    def finish(self, writer: FolderWriter) -> Path:
        """Config, processor and the log lines, once every scope is written."""
        if self.mismatched:
            raise ExportMismatch(f"{self.folder}: {len(self.mismatched)} layer(s) do not read back as their "
                                 f"fake-quant weights (or hold NaN): {self.mismatched[:5]}")
        log_kept_float(self.folder, self.kept)
        return writer.close(dtype=self.dtype, quantization_config=self.quantization_config())

    def new_writer(self, folder: Path) -> FolderWriter:
        return FolderWriter(self.adapter, folder, self.checkpoint_names)

    def write(self, out_dir: str | Path, overwrite: bool = False) -> Path:
        """The whole model at once into ``out_dir`` (written atomically)."""
        with atomic_dir(out_dir, overwrite) as tmp:
            writer = self.new_writer(tmp)
            self.write_scope(writer, "", self.adapter.model)
            self.finish(writer)
        return Path(out_dir)


def log_kept_float(fmt: str, kept: dict[str, str]) -> None:
    """One line per reason: the quantized layers the format cannot express, written as fake-quant floats."""
    by_reason: dict[str, list[str]] = {}
    for name, why in kept.items():
        by_reason.setdefault(why, []).append(name)
    for why, names in by_reason.items():
        shown = ", ".join(names[:4]) + (f", ... ({len(names)} layers)" if len(names) > 4 else "")
        logger.warning(f"{fmt}: kept float (fake-quant weights): {shown}: {why}")
