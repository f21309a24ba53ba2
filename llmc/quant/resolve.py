"""Which spec each layer gets: part settings, skip patterns and per-pattern overrides."""
from __future__ import annotations

from dataclasses import replace
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Iterable

from llmc.quant.primitives import QuantSpec
from llmc.strict import ConfigError

if TYPE_CHECKING:
    from llmc.config import QuantConfig
    from llmc.context import SpecResolver
    from llmc.models.base import ModelAdapter


def make_resolver(quant: "QuantConfig", default_skip: Iterable[str] = ()) -> "SpecResolver":
    """``(full module name, part) -> QuantSpec | None`` (None: keep the layer float).

    ``skip_layers`` and override ``pattern`` are fnmatch patterns on full module
    names (``*.mlp.down_proj``, ``model.visual.blocks.0.*``); the first matching
    override wins and replaces only the weight keys it names.
    """
    skips = list(quant.skip_layers) + list(default_skip)

    def resolve(name: str, part: str) -> QuantSpec | None:
        if any(fnmatchcase(name, p) for p in skips):
            return None
        weight = quant.part_weight(part)
        for ov in quant.overrides:
            if fnmatchcase(name, ov.pattern):
                if ov.skip:
                    return None
                weight = replace(weight, **(ov.weight or {}))
                break
        return weight.to_spec()

    return resolve


def check_layers(adapter: "ModelAdapter", parts: Iterable[str], resolver: "SpecResolver") -> dict[str, QuantSpec]:
    """Resolve every block linear up front; a group size that does not divide is an error naming the layer."""
    specs: dict[str, QuantSpec] = {}
    for part in parts:
        prefix = adapter.blocks_path(part)
        for i, block in enumerate(adapter.blocks(part)):
            for rel in adapter.block_layout(part, block).linears():
                name = f"{prefix}.{i}.{rel}"
                spec = resolver(name, part)
                if spec is None:
                    continue
                in_f = block.get_submodule(rel).in_features
                if spec.granularity == "per_group" and in_f % spec.group_size:
                    divisors = [d for d in (16, 32, 64, 128, 256) if in_f % d == 0]
                    raise ConfigError(
                        f"group_size={spec.group_size} does not divide in_features={in_f} of layer {name}; "
                        f"group sizes that divide it: {divisors or 'none of 16..256'} "
                        f"(or use granularity: per_channel, or an override for this layer)")
                specs[name] = spec
    return specs
