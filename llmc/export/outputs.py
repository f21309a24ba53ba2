"""The output folders of one job (``save.*``), written as the model becomes final.

Eager jobs write every folder at the end, the whole model as one scope. Streamed jobs
(:mod:`llmc.models.stream`) write each language block's tensors into every folder right after the block
is quantized (before it is released), and the rest of the model at the end; the same exporters run
either way, so the files hold the same tensors. Each folder is built in a hidden temporary sibling
and appears whole. GGUF is written from the whole model at the end (eager jobs only).
"""
from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from loguru import logger
from torch import nn

from llmc.export.atomic import new_temp, publish
from llmc.export.awq_gemm import AWQExport
from llmc.export.base import Export
from llmc.export.compressed import CompressedExport
from llmc.export.gptq_pack import GPTQExport
from llmc.export.hf import FakeExport
from llmc.export.trans_tpu import TransExport
from llmc.export.writer import FolderWriter
from llmc.plan import Part

if TYPE_CHECKING:
    from llmc.config import SaveConfig
    from llmc.models.base import ModelAdapter
    from llmc.plan import LayerPlan

# a streamed job writes a shard once this much is pending: memory holds at most a block or this much
STREAM_FLUSH_BYTES = 64 * 2**20
# save key -> (folder, exporter): the folders of ``save``; save_gguf is written apart (whole model)
BUILDERS: dict[str, tuple[str, Callable[..., Export]]] = {
    "save_trans": ("trans", TransExport),
    "save_fake": ("fake", FakeExport),
    "save_vllm": ("vllm", CompressedExport),
    "save_sgl": ("sgl", CompressedExport),
    "save_autoawq": ("autoawq", AWQExport),
    "save_gptq": ("gptq", GPTQExport),
}


class JobOutputs:
    """Writers for every requested folder under ``out``; ``extra`` adds folders the job needs itself
    (a streamed evaluation reads the fake-quant model from disk), removed by ``cleanup``."""

    def __init__(self, save: "SaveConfig", adapter: "ModelAdapter", layers: list["LayerPlan"], out: Path,
                 extra: dict[str, str] | None = None) -> None:
        self.adapter, self.out = adapter, out
        wanted = {k: BUILDERS[k][0] for k in BUILDERS if getattr(save, k)}
        self.extra = dict(extra or {})
        self.items: list[tuple[str, Export, FolderWriter, Path]] = []
        for key, folder in {**wanted, **self.extra}.items():
            export = self._make(key, layers, save)
            target = out / folder
            tmp = new_temp(target)
            self.items.append((folder, export, export.new_writer(tmp), tmp))

    def _make(self, key: str, layers: list["LayerPlan"], save: "SaveConfig") -> Export:
        cls = BUILDERS[key][1]
        if cls in (AWQExport, GPTQExport) and save.pack_vision and any(lp.part is Part.VISION for lp in layers):
            logger.warning(f"{key}: save.pack_vision packs the vision tower; vLLM serves it, GPTQModel 7.7 ignores "
                           "packed vision tensors and outputs NaN (docs/runtimes.md): leave it off for GPTQModel")
        if cls is TransExport:
            return TransExport(self.adapter, save.tpu_check, layers)
        if cls is AWQExport:
            return AWQExport(self.adapter, layers=layers, pack_vision=save.pack_vision)
        if cls is GPTQExport:
            return GPTQExport(self.adapter, checkpoint_format=save.gptq_format, quantize_vision=save.pack_vision,
                              layers=layers)
        return cls(self.adapter)

    @property
    def folders(self) -> list[str]:
        return [f for f, *_ in self.items]

    def write_block(self, prefix: str, block: nn.Module) -> None:
        """One finished block into every folder (streamed jobs)."""
        for _, export, writer, _ in self.items:
            export.write_scope(writer, prefix, block)
            if writer.pending_bytes >= STREAM_FLUSH_BYTES:
                writer.flush()

    def finish_one(self, folder: str, done: tuple[str, ...] = ()) -> Path:
        """Complete ``folder``: the rest of the model (everything not under ``done``), its config; published."""
        for name, export, writer, tmp in self.items:
            if name == folder:
                export.write_scope(writer, "", self.adapter.model, skip=done)
                export.finish(writer)
                path = publish(tmp, self.out / folder)
                logger.info(f"saved {folder}/")
                return path
        raise KeyError(folder)

    def abort(self) -> None:
        for *_, tmp in self.items:
            shutil.rmtree(tmp, ignore_errors=True)

    def cleanup(self) -> None:
        """Remove the folders the job wrote for itself."""
        for folder in self.extra.values():
            shutil.rmtree(self.out / folder, ignore_errors=True)
