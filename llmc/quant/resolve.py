"""Which spec each layer gets: part settings, skip patterns and per-pattern overrides."""
from __future__ import annotations

import difflib
import re
from dataclasses import replace
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Iterable

from llmc.quant.primitives import QuantSpec
from llmc.strict import ConfigError

if TYPE_CHECKING:
    from llmc.config import QuantConfig
    from llmc.context import SpecResolver
    from torch import nn

    from llmc.models.base import ModelAdapter


def check_patterns(quant: "QuantConfig", model: "nn.Module") -> None:
    """Every ``skip_layers`` / ``overrides`` pattern must match a module of the model (a typo would
    otherwise quantize every layer); the error lists the closest module names."""
    from torch import nn

    names = [n for n, _ in model.named_modules() if n]
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    # what a user would write: block indices as '*', or '*.' + the last two name components
    candidates = sorted({re.sub(r"\.\d+\.", ".*.", n) for n in linears} |
                        {"*." + ".".join(n.split(".")[-2:]) for n in linears})
    patterns = [("quant.skip_layers", p) for p in quant.skip_layers]
    patterns += [(f"quant.overrides[{i}].pattern", o.pattern) for i, o in enumerate(quant.overrides)]
    for key, pattern in patterns:
        if any(fnmatchcase(n, pattern) for n in names):
            continue
        close = difflib.get_close_matches(pattern, candidates, n=3, cutoff=0.0)
        raise ConfigError(f"{key}: {pattern!r} matches no module of the model; closest layer names: {close} "
                          f"(patterns are fnmatch on full module names, e.g. '*.mlp.down_proj')")


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
