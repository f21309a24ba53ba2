"""The algorithm template and its registry.

The contract of a pipeline (``quant.method`` as a list): *transforms* (``quantizes = False``)
run once on the whole model before the block loop (``prepare_model``: rotation) and never per
block; exactly one *quantizer* comes last and is the only algorithm whose ``process_block`` runs
on each block (RTN, AWQ, GPTQ, SmoothQuant). :func:`build_algorithms` enforces it and
:func:`describe_pipeline` says it in the job's log. Options come from ``quant.special`` and are a
dataclass per algorithm, parsed strictly. What an algorithm finds is its ``record`` (a
:class:`llmc.algorithms.records.Record` subclass, ``Record``): ``save_state`` writes it, the
algorithm's ``load_scales`` / ``load_state`` option replays it.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from llmc.algorithms.records import Record
from llmc.strict import ConfigError, from_dict, suggest

if TYPE_CHECKING:
    from llmc.config import QuantConfig
    from llmc.context import BlockContext
    from llmc.models.base import ModelAdapter

_ALGORITHMS: dict[str, type["Algorithm"]] = {}


@dataclass
class NoOptions:
    """The algorithm takes no ``quant.special`` keys."""


class Algorithm:
    """Base class. Subclasses set ``name``, ``Options`` (and ``Record``) and override the hooks they need."""

    name: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()
    Options: ClassVar[type] = NoOptions
    Record: ClassVar[type[Record] | None] = None
    quantizes: ClassVar[bool] = True
    needs_calib: ClassVar[bool] = True
    load_option: ClassVar[str | None] = None  # the option naming a record to replay (load_scales, load_state)
    save_option: ClassVar[str | None] = None  # the option switching the record's file off (save_scales, ...)
    replay_with: ClassVar[str] = ""  # how a saved record is replayed when no load_option says it (the log)

    def __init__(self, options: Any, quant: "QuantConfig") -> None:
        self.options = options
        self.quant = quant
        self.record: Record | None = self.Record() if self.Record is not None else None
        self.loaded: Record | None = self.Record.load(self.load_path) if self.load_path is not None else None
        if self.load_option is not None:
            self.replay_with = f"quant.special.{self.load_option}"

    @property
    def load_path(self) -> str | None:
        """The record this run replays (the algorithm's ``load_option``), if any."""
        return getattr(self.options, self.load_option) if self.load_option is not None else None

    def needs_calibration(self) -> bool:
        """Calibration data is needed unless the algorithm needs none or replays a record."""
        return self.needs_calib and self.load_path is None

    def propagates_float(self) -> bool:
        """Whether the next block's inputs come from this block's float (transformed, not rounded)
        weights rather than its quantized ones (default: quantized, the error propagates)."""
        return False

    def prepare_model(self, adapter: "ModelAdapter", device: torch.device) -> None:
        """Whole-model transform before the block loop (default: nothing)."""

    def process_block(self, ctx: "BlockContext") -> None:
        """Transform and/or quantize one block (default: nothing); runs for the quantizer only."""

    @property
    def saves_state(self) -> bool:
        """Whether ``save_state`` writes the record (the algorithm's ``save_option``; default yes)."""
        return getattr(self.options, self.save_option) if self.save_option is not None else True

    def save_state(self, out_dir: Path) -> list[Path]:
        """Write the record into ``out_dir`` (nothing when empty, replayed, or saving is switched off)."""
        if self.record is None or self.record.is_empty() or self.load_path is not None or not self.saves_state:
            return []
        return [self.record.save(out_dir)]

    @classmethod
    def stage(cls) -> str:
        """Where the algorithm runs: ``whole model`` (before the block loop) and/or ``each block``."""
        where = []
        if cls.prepare_model is not Algorithm.prepare_model:
            where.append("whole model, before the block loop")
        if cls.process_block is not Algorithm.process_block:
            where.append("each block")
        return " + ".join(where) or "nothing"


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def register_algorithm(cls: type[Algorithm]) -> type[Algorithm]:
    for n in (cls.name, *cls.aliases):
        _ALGORITHMS[_norm(n)] = cls
    return cls


def valid_methods() -> list[str]:
    return sorted({c.name for c in _ALGORITHMS.values()})


def algorithm_class(name: str) -> type[Algorithm]:
    cls = _ALGORITHMS.get(_norm(str(name)))
    if cls is None:
        valid = valid_methods()
        raise ConfigError(f"quant.method: {name!r} is not supported{suggest(name, valid)}; valid: {valid}")
    return cls


def build_algorithms(quant: "QuantConfig") -> list[Algorithm]:
    """Instantiate ``quant.method`` (a name or a list) with its ``quant.special`` options.

    Transforms run first, in the given order; exactly one algorithm quantizes
    (RTN is appended when the list has none). Every ``special`` key must belong
    to one of the listed algorithms.
    """
    classes = [algorithm_class(m) for m in quant.methods]
    for c in classes:
        if not c.quantizes and c.process_block is not Algorithm.process_block:
            raise ConfigError(f"quant.method: {c.name} is a transform but processes blocks; transforms run on the "
                              f"whole model only (only the quantizer's process_block runs)")
    quantizers = [c for c in classes if c.quantizes]
    if len(quantizers) > 1:
        raise ConfigError(f"quant.method: {[c.name for c in quantizers]} all quantize; list at most one of "
                          f"them, after any transforms")
    if not quantizers:
        classes.append(algorithm_class("RTN"))
    elif classes[-1] is not quantizers[0]:
        raise ConfigError(f"quant.method: the quantizer {quantizers[0].name} must come last")
    known = {f.name: c for c in classes for f in dataclasses.fields(c.Options)}
    for key in quant.special:
        if key not in known:
            raise ConfigError(f"quant.special: unknown key {key!r}{suggest(key, known)} for "
                              f"{[c.name for c in classes]}; valid keys: {sorted(known)}")
    algos = []
    for c in classes:
        own = {f.name for f in dataclasses.fields(c.Options)}
        opts = from_dict(c.Options, {k: v for k, v in quant.special.items() if k in own}, "quant.special")
        algos.append(c(opts, quant))
    return algos


def describe_pipeline(algos: list[Algorithm]) -> str:
    """``Rotation (whole model, before the block loop) -> GPTQ (each block)``: what runs where."""
    return " -> ".join(f"{a.name} ({type(a).stage()})" for a in algos)
