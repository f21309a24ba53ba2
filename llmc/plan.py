"""The quantization plan: every linear of the quantized blocks, how it is quantized and what it does.

Built once per job from the config (``quant``) and the adapter's block layouts, before any weight
changes, and read by every later stage: the block loop and the algorithms (``BlockContext``), the
fake-quant linears (each holds its :class:`LayerPlan`), the save-format checks, every exporter
and the TPU sidecar. ``quant_layers.json`` is its one serialisation (:meth:`QuantPlan.to_json`,
:meth:`QuantPlan.from_json`). Nothing else decides a layer's spec or part.

Spec resolution (:func:`resolve_spec`): ``skip_layers`` (and the adapter's default skips such as
``lm_head``) keep a layer float; otherwise the part's weight setting (``quant.<part>.weight`` over
``quant.weight``), then the first matching ``overrides`` entry (fnmatch on full module names)
replaces the keys it names, or skips the layer.
"""
from __future__ import annotations

import difflib
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from enum import Enum
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

from llmc.quant.primitives import QuantSpec
from llmc.strict import ConfigError, suggest

if TYPE_CHECKING:
    from pathlib import Path

    from torch import nn

    from llmc.config import QuantConfig
    from llmc.models.base import ModelAdapter
    from llmc.models.layout import BlockLayout

PLAN_FORMAT = "llmc_quant_plan"
PLAN_VERSION = 2


class Part(str, Enum):
    """A part of a VLM that is quantized block by block."""

    VISION = "vision"
    LANGUAGE = "language"

    @classmethod
    def parse(cls, value: "str | Part") -> "Part":
        """The part named ``value``; a misspelling is an error (never silently another part)."""
        try:
            return cls(value)
        except ValueError:
            valid = [p.value for p in cls]
            raise ConfigError(f"part {value!r} is not valid{suggest(str(value), valid)}; valid: {valid}") from None


class Role(str, Enum):
    """What a linear does in its block, from the layout data (never guessed from names or order)."""

    QUERY_KEY = "query_key"  # projects attention queries or keys (AWQ's clip search leaves it alone)
    VALUE = "value"  # produces the attention values (head-wise rotation)
    ATTN_OUTPUT = "attn_output"  # consumes the attention values
    RESIDUAL_WRITER = "residual_writer"  # writes into the residual stream (rotated on its output side)
    READS_OTHER = "reads_other"  # reads something other than the block's tokens (cross-attention k/v)


@dataclass(frozen=True)
class LayerPlan:
    """One linear of a quantized block. ``spec`` None: kept float."""

    name: str
    part: Part
    block: int
    group: str
    spec: QuantSpec | None
    act_bits: int | None
    roles: frozenset[Role]
    in_features: int
    out_features: int

    @property
    def quantized(self) -> bool:
        return self.spec is not None

    def describe(self) -> str:
        if self.spec is None:
            return "float"
        return self.spec.describe() + (f"a{self.act_bits}" if self.act_bits else "")

    def to_json(self) -> dict[str, Any]:
        s = self.spec
        return {"name": self.name, "part": self.part.value, "block": self.block, "group": self.group,
                "bits": s.bits if s else None, "symmetric": s.symmetric if s else None,
                "granularity": s.granularity if s else None, "group_size": s.group_size if s else None,
                "act_bits": self.act_bits, "roles": sorted(r.value for r in self.roles),
                "in_features": self.in_features, "out_features": self.out_features}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "LayerPlan":
        spec = None if d["bits"] is None else QuantSpec(d["bits"], d["symmetric"], d["granularity"], d["group_size"])
        return cls(d["name"], Part.parse(d["part"]), d["block"], d["group"], spec, d["act_bits"],
                   frozenset(Role(r) for r in d["roles"]), d["in_features"], d["out_features"])


@dataclass(frozen=True)
class QuantPlan:
    """Every linear of the quantized parts' blocks, in module order; immutable."""

    layers: tuple[LayerPlan, ...]
    parts: tuple[Part, ...]
    _index: dict[str, LayerPlan] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", {lp.name: lp for lp in self.layers})

    def __iter__(self) -> Iterator[LayerPlan]:
        return iter(self.layers)

    def __contains__(self, name: str) -> bool:
        return name in self._index

    def __getitem__(self, name: str) -> LayerPlan:
        return self._index[name]

    def get(self, name: str) -> LayerPlan | None:
        return self._index.get(name)

    def spec(self, name: str) -> QuantSpec | None:
        """The spec of linear ``name``; None when it is kept float or not in the plan."""
        lp = self._index.get(name)
        return None if lp is None else lp.spec

    def quantized(self) -> tuple[LayerPlan, ...]:
        return tuple(lp for lp in self.layers if lp.quantized)

    def settings(self) -> dict[str, str]:
        """Layer name -> setting (``w4ag32``, ``w8sgcha8``) of every quantized layer."""
        return {lp.name: lp.describe() for lp in self.layers if lp.quantized}

    def summary(self) -> str:
        """One line per part: layers, how many quantized, the settings used."""
        lines = []
        for part in self.parts:
            lps = [lp for lp in self.layers if lp.part is part]
            counts = Counter(lp.describe() for lp in lps)
            lines.append(f"{part.value}: {len(lps)} linears in {len({lp.block for lp in lps})} blocks, "
                         f"{sum(lp.quantized for lp in lps)} quantized ({dict(counts)})")
        return "; ".join(lines)

    def to_json(self, **extra: Any) -> dict[str, Any]:
        """The serialisation (``quant_layers.json``); ``extra`` adds top-level keys."""
        return {"format": PLAN_FORMAT, "version": PLAN_VERSION, "parts": [p.value for p in self.parts], **extra,
                "layers": [lp.to_json() for lp in self.layers]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "QuantPlan":
        if data.get("format") != PLAN_FORMAT or data.get("version") != PLAN_VERSION:
            raise ValueError(f"not an llmc quantization plan (format {PLAN_FORMAT!r} version {PLAN_VERSION}): "
                             f"got {data.get('format')!r} version {data.get('version')!r}")
        return cls(tuple(LayerPlan.from_json(d) for d in data["layers"]), tuple(Part.parse(p) for p in data["parts"]))


def load_plan(path: "str | Path") -> QuantPlan:
    """Read a ``quant_layers.json`` written by a job."""
    import json
    from pathlib import Path

    return QuantPlan.from_json(json.loads(Path(path).read_text()))


# ------------------------------------------------------------------------------------------ building
def resolve_spec(quant: "QuantConfig", name: str, part: Part, default_skip: Iterable[str] = ()) -> QuantSpec | None:
    """The spec of linear ``name`` in ``part`` (None: kept float); see the module docstring."""
    if any(fnmatchcase(name, p) for p in (*quant.skip_layers, *default_skip)):
        return None
    weight = quant.part_weight(part.value)
    for ov in quant.overrides:
        if fnmatchcase(name, ov.pattern):
            if ov.skip:
                return None
            weight = replace(weight, **(ov.weight or {}))
            break
    return weight.to_spec()


def check_patterns(quant: "QuantConfig", model: "nn.Module") -> None:
    """Every ``skip_layers`` / ``overrides`` pattern must match a module of the model (a typo would
    otherwise quantize every layer); the error lists the closest names a user would write."""
    from torch import nn

    names = [n for n, _ in model.named_modules() if n]
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    candidates = sorted({re.sub(r"\.\d+\.", ".*.", n) for n in linears} |
                        {"*." + ".".join(n.split(".")[-2:]) for n in linears})
    patterns = [("quant.skip_layers", p) for p in quant.skip_layers]
    patterns += [(f"quant.overrides[{i}].pattern", o.pattern) for i, o in enumerate(quant.overrides)]
    for key, pattern in patterns:
        if not any(fnmatchcase(n, pattern) for n in names):
            close = difflib.get_close_matches(pattern, candidates, n=3, cutoff=0.0)
            raise ConfigError(f"{key}: {pattern!r} matches no module of the model; closest layer names: {close} "
                              f"(patterns are fnmatch on full module names, e.g. '*.mlp.down_proj')")


def _roles(layout: "BlockLayout", rel: str) -> frozenset[Role]:
    roles = set()
    if rel in layout.query_key:
        roles.add(Role.QUERY_KEY)
    if layout.value is not None and layout.value.name == rel:
        roles.add(Role.VALUE)
    if layout.attn_output == rel:
        roles.add(Role.ATTN_OUTPUT)
    if rel in layout.residual_writers:
        roles.add(Role.RESIDUAL_WRITER)
    if any(rel in g.linears and not g.reads_hidden for g in layout.groups):
        roles.add(Role.READS_OTHER)
    return frozenset(roles)


def _check_group_size(name: str, spec: QuantSpec, in_features: int) -> None:
    if spec.granularity == "per_group" and in_features % spec.group_size:
        divisors = [d for d in (16, 32, 64, 128, 256) if in_features % d == 0]
        raise ConfigError(f"group_size={spec.group_size} does not divide in_features={in_features} of layer {name}; "
                          f"group sizes that divide it: {divisors or 'none of 16..256'} "
                          f"(or use granularity: per_channel, or an override for this layer)")


def block_plan(prefix: str, index: int, block: "nn.Module", layout: "BlockLayout", part: Part | str,
               spec_of: "Callable[[str], QuantSpec | None]", act_bits: int | None = None) -> tuple[LayerPlan, ...]:
    """The plan entries of one block: every linear of ``layout`` with ``spec_of(full name)``."""
    part = Part.parse(part)
    layers = []
    for group in layout.groups:
        for rel in group.linears:
            name = f"{prefix}.{rel}"
            lin = block.get_submodule(rel)
            spec = spec_of(name)
            if spec is not None:
                _check_group_size(name, spec, lin.in_features)
            layers.append(LayerPlan(name, part, index, group.name, spec, act_bits if spec else None,
                                    _roles(layout, rel), lin.in_features, lin.out_features))
    return tuple(layers)


def build_plan(quant: "QuantConfig", adapter: "ModelAdapter") -> QuantPlan:
    """The plan of ``quant.quant_objects`` on the adapter's model, every check done up front."""
    parts = tuple(Part.parse(p) for p in ("vision", "language") if p in quant.quant_objects)
    for p in parts:
        if p.value not in adapter.available_parts():
            raise ConfigError(f"quant.quant_objects: {adapter.model_type} has no {p.value} part; "
                              f"valid: {adapter.available_parts()}")
    check_patterns(quant, adapter.model)
    layers: list[LayerPlan] = []
    for part in parts:
        prefix = adapter.blocks_path(part.value)
        for i, block in enumerate(adapter.blocks(part.value)):
            layers += block_plan(f"{prefix}.{i}", i, block, adapter.block_layout(part.value, block), part,
                                 lambda name: resolve_spec(quant, name, part, adapter.default_skip), quant.act_bits)
    return QuantPlan(tuple(layers), parts)


def plan_of_block(prefix: str, block: "nn.Module", layout: "BlockLayout",
                  spec_of: "Callable[[str], QuantSpec | None]", part: Part | str = Part.LANGUAGE,
                  act_bits: int | None = None, index: int = 0) -> QuantPlan:
    """The plan of one block on its own (tests, tools): ``spec_of(full name)`` per linear."""
    return QuantPlan(block_plan(prefix, index, block, layout, part, spec_of, act_bits), (Part.parse(part),))


def single_layer(linear: "nn.Module", spec: QuantSpec, act_bits: int | None = None, name: str = "layer",
                 part: Part | str = Part.LANGUAGE) -> LayerPlan:
    """The plan entry of a linear outside any model (tests, tools)."""
    return LayerPlan(name, Part.parse(part), 0, "layer", spec, act_bits, frozenset(), linear.in_features,
                     linear.out_features)
