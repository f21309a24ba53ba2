"""How the block loop calls a family's blocks: which captured kwargs a block runs with, and what the
model adds into the stream between blocks (Qwen3-VL's deepstack). One of an adapter's three concerns."""
from __future__ import annotations

from typing import Any, ClassVar

import torch


class BlockLoopHooks:
    """Defaults: every block of a kind runs with its kind's first block's kwargs; nothing between blocks."""

    # Models that add into the residual stream between blocks (Qwen3-VL's deepstack) name the
    # module whose call kwargs carry what is added, and say how to add it.
    extras_module: ClassVar[str | None] = None

    def kwargs_source(self, part: str, index: int) -> int:
        """The block whose captured call kwargs block ``index`` runs with: its kind's first block."""
        kind = self.block_kind(part, index)  # llmc.models.structure.ModelStructure
        return next(j for j in range(len(self.blocks(part))) if self.block_kind(part, j) == kind)

    def block_call_kwargs(self, part: str, index: int, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Last adjustment of block ``index``'s call kwargs (default: as captured)."""
        return kwargs

    @staticmethod
    def capture_extras(kwargs: dict[str, Any]) -> dict[str, Any]:
        """What ``between_blocks`` needs, read from ``extras_module``'s call kwargs (default: nothing)."""
        return {}

    @staticmethod
    def between_blocks(part: str, index: int, hidden: torch.Tensor, extras: dict[str, Any] | None) -> torch.Tensor:
        """Output of block ``index`` -> input of block ``index + 1`` (default: unchanged)."""
        return hidden
