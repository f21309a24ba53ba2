"""The unit of calibration and evaluation data: one prompt, its images, an optional answer."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Sample:
    """One multimodal (or text-only) sample.

    ``images`` are absolute paths (already resolved and checked by the loader);
    ``answer`` is appended as the assistant turn when present (calibration), left
    out when the model is asked to generate (evaluation).
    """

    question: str
    images: tuple[Path, ...] = field(default_factory=tuple)
    answer: str | None = None
