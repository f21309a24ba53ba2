"""Quantization algorithms, one file each, selected by ``quant.method``.

Every module in this package is imported here so that its ``@register_algorithm``
classes are selectable; adding an algorithm is adding a file.
"""
import importlib
import pkgutil

from llmc.algorithms.base import (
    Algorithm,
    algorithm_class,
    build_algorithms,
    register_algorithm,
    valid_methods,
)

for _mod in pkgutil.iter_modules(__path__):
    if _mod.name != "base" and not _mod.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["Algorithm", "algorithm_class", "build_algorithms", "register_algorithm", "valid_methods"]
