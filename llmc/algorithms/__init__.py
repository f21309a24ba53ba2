"""Quantization algorithms, one file each, selected by ``quant.method``."""
from llmc.algorithms import rtn  # noqa: F401  (registration)
from llmc.algorithms.base import Algorithm, algorithm_class, build_algorithms, register_algorithm, valid_methods

__all__ = ["Algorithm", "algorithm_class", "build_algorithms", "register_algorithm", "valid_methods"]
