"""``model.type`` -> adapter class."""
from __future__ import annotations

import re
from typing import TYPE_CHECKING

from llmc.strict import ConfigError, suggest

if TYPE_CHECKING:
    from llmc.models.base import ModelAdapter

_ADAPTERS: dict[str, type["ModelAdapter"]] = {}


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def register_adapter(cls: type["ModelAdapter"]) -> type["ModelAdapter"]:
    """Class decorator: make ``cls`` selectable by its ``model_type`` and aliases."""
    for name in (cls.model_type, *cls.aliases):
        key = _norm(name)
        if key in _ADAPTERS and _ADAPTERS[key] is not cls:
            raise ValueError(f"model type {name!r} is registered twice")
        _ADAPTERS[key] = cls
    return cls


def valid_types() -> list[str]:
    return sorted({cls.model_type for cls in _ADAPTERS.values()})


def adapters_for(hf_model_type: str) -> list[type["ModelAdapter"]]:
    """The adapters whose ``hf_model_types`` include a checkpoint's ``config.json`` ``model_type``."""
    seen = dict.fromkeys(_ADAPTERS.values())
    return [cls for cls in seen if hf_model_type in cls.hf_model_types]


def adapter_class(model_type: str) -> type["ModelAdapter"]:
    """The adapter registered for ``model_type`` (case, '_' and '-' are ignored)."""
    cls = _ADAPTERS.get(_norm(model_type))
    if cls is None:
        valid = valid_types()
        raise ConfigError(f"model.type: {model_type!r} is not supported{suggest(model_type, valid)}; "
                          f"valid: {valid}")
    return cls
