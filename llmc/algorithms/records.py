"""Algorithm state with a schema: one record type per algorithm, written by ``save_state``, replayable.

A record holds what an algorithm found (searched scales, clip ratios, GPTQ's integers, the
rotation's seed) under the names the plan uses (full module names; ``<block prefix>.<group>`` for a
layer group), so that a later job can apply it again without calibration data
(``quant.special.load_scales`` for AWQ and SmoothQuant, ``load_state`` for GPTQ). Files are written
with ``torch.save`` and read with ``weights_only=True``: tensors, numbers, strings, lists and dicts.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch

RECORD_FORMAT = "llmc_algorithm_record"
R = TypeVar("R", bound="Record")


@dataclass
class Record:
    """Base of every record: ``METHOD`` names the algorithm, ``FILE`` the file in the job folder."""

    METHOD: ClassVar[str]
    FILE: ClassVar[str]

    def is_empty(self) -> bool:
        return not any(getattr(self, f.name) for f in dataclasses.fields(self))

    def save(self, folder: str | Path) -> Path:
        """Write ``folder/FILE`` atomically; returns its path."""
        path = Path(folder) / self.FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"format": RECORD_FORMAT, "method": self.METHOD, **_cpu(dataclasses.asdict(self))}
        tmp = path.with_name(path.name + ".tmp")
        torch.save(payload, tmp)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls: type[R], path: str | Path) -> R:
        """Read a record of this algorithm; a clear error for another algorithm's or a foreign file."""
        data = torch.load(Path(path), map_location="cpu", weights_only=True)
        if not isinstance(data, dict):
            raise ValueError(f"{path} is not an llmc {cls.METHOD} record")
        data = cls.legacy(data)
        if data.get("format") != RECORD_FORMAT or data.get("method") != cls.METHOD:
            raise ValueError(f"{path} is not an llmc {cls.METHOD} record (format {data.get('format')!r}, method "
                             f"{data.get('method')!r}); expected one written by a {cls.METHOD} job")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def legacy(cls, data: dict[str, Any]) -> dict[str, Any]:
        """Records written before the schema (override to accept them); default: as they are."""
        return data


def _cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_cpu(v) for v in obj]
    return obj


@dataclass
class ScalesRecord(Record):
    """Per-input-channel scales folded into each layer group (``<block prefix>.<group>`` -> ``[in]``),
    in fold order, and clip ratios per layer (full name -> ``[out, groups]`` or ``[out, groups, 2]``)."""

    scales: dict[str, torch.Tensor] = field(default_factory=dict)
    clips: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class AWQRecord(ScalesRecord):
    METHOD = "AWQ"
    FILE = "awq_records.pt"

    @classmethod
    def legacy(cls, data: dict[str, Any]) -> dict[str, Any]:
        if set(data) == {"scales", "clips"}:  # written before the schema: AWQ's only format then
            return {"format": RECORD_FORMAT, "method": cls.METHOD, **data}
        return data


@dataclass
class SmoothQuantRecord(ScalesRecord):
    METHOD = "SmoothQuant"
    FILE = "smoothquant_records.pt"


@dataclass
class GPTQRecord(Record):
    """GPTQ's result per layer (full name): ``codes`` ``[out, in]`` (int8 symmetric, uint8 asymmetric),
    ``scale``/``zero`` ``[out, G]``, ``g_idx`` ``[in]`` or absent. Replaying sets each weight to its
    dequantized codes.

    With :meth:`spill_to` (streamed jobs) each layer's state goes to its own file as soon as it is made
    and the record holds the file's path relative to the record: memory does not grow with the model.
    """

    METHOD = "GPTQ"
    FILE = "gptq_records.pt"
    SPILL = "gptq_records"
    layers: dict[str, "dict[str, torch.Tensor] | str"] = field(default_factory=dict)

    def spill_to(self, folder: Path | None) -> None:
        """Write each layer's state under ``folder`` as it is made; ``None``: keep nothing (a rank other
        than 0 under torch.distributed, whose record rank 0 writes)."""
        self._spill = Path(folder) / self.SPILL if folder is not None else False
        if self._spill:
            self._spill.mkdir(parents=True, exist_ok=True)

    def put(self, name: str, state: dict[str, torch.Tensor]) -> None:
        spill = getattr(self, "_spill", None)
        if spill is False:
            return
        if spill is None:
            self.layers[name] = state
            return
        torch.save({k: v.detach().cpu() for k, v in state.items()}, spill / f"{name}.pt")
        self.layers[name] = f"{self.SPILL}/{name}.pt"

    def state(self, name: str) -> dict[str, torch.Tensor] | None:
        """A layer's state (read from its file when spilled)."""
        value = self.layers.get(name)
        if isinstance(value, str):
            return torch.load(self._root / value, map_location="cpu", weights_only=True)
        return value

    @classmethod
    def load(cls, path: str | Path) -> "GPTQRecord":
        record = super().load(path)
        record._root = Path(path).parent
        return record


@dataclass
class RotationRecord(Record):
    """What the rotation did; the matrices follow from ``rotate_mode`` and ``rotation_seed``."""

    METHOD = "Rotation"
    FILE = "rotation_record.pt"
    rotate_mode: str = ""
    rotation_seed: int = 0
    hidden_size: int = 0
    untied_lm_head: bool = False
    blocks: int = 0
    targets: dict[str, Any] = field(default_factory=dict)
    heads: list[dict[str, Any]] = field(default_factory=list)
