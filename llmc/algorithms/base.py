"""The algorithm template and its registry.

An algorithm may transform the whole model once before the block loop
(``prepare_model``: rotation) and/or process each block (``process_block``:
RTN, AWQ, GPTQ, SmoothQuant). Options come from ``quant.special`` and are a
dataclass per algorithm, parsed strictly.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

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
    """Base class. Subclasses set ``name``, ``Options`` and override the hooks they need."""

    name: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()
    Options: ClassVar[type] = NoOptions
    quantizes: ClassVar[bool] = True
    needs_calib: ClassVar[bool] = True

    def __init__(self, options: Any, quant: "QuantConfig") -> None:
        self.options = options
        self.quant = quant
        self.records: dict[str, Any] = {}

    def prepare_model(self, adapter: "ModelAdapter", device: torch.device) -> None:
        """Whole-model transform before the block loop (default: nothing)."""

    def process_block(self, ctx: "BlockContext") -> None:
        """Transform and/or quantize one block (default: nothing)."""

    def save_state(self, out_dir: Path) -> list[Path]:
        """Write what makes this run replayable (search results) into ``out_dir``; default: nothing."""
        return []


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
