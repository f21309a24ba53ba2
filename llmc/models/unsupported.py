"""Errors for model features the shared layout data cannot express yet."""
from __future__ import annotations


class RotationUnsupported(ValueError):
    """The model writes into the language residual stream in a way rotation cannot fold exactly yet."""
