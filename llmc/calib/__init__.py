"""Calibration data: the :class:`Sample` unit and loaders for datasets on disk."""
from llmc.calib.datasets import (
    LOADERS,
    MM_KEYS,
    batches,
    load_custom_mm,
    load_custom_txt,
    load_samples,
)
from llmc.calib.sample import Sample

__all__ = ["LOADERS", "MM_KEYS", "Sample", "batches", "load_custom_mm", "load_custom_txt", "load_samples"]
