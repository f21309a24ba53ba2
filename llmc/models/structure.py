"""What a family's model looks like: its parts, block layouts, rotation targets and block kinds.

One of the three concerns of an adapter (:class:`llmc.models.base.ModelAdapter`); the other two are
the block-loop hooks (:mod:`llmc.models.hooks`) and input processing (:mod:`llmc.models.inputs`).
Families declare class attributes (``parts``, ``projector_writers``, ``norm_offset``...) and may
override the layout methods; ``model_parts`` is what was found in the loaded model.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, ClassVar

from torch import nn

from llmc.models.common import decoder_layout
from llmc.models.layout import BlockLayout, ModelParts, RotationTargets


class ModelStructure:
    """Parts, layouts, rotation targets and block kinds of ``self.model`` (set by the adapter)."""

    model: nn.Module
    model_type: ClassVar[str]
    parts: ClassVar[ModelParts]  # declared by the family; see model_parts for the loaded model's
    default_skip: ClassVar[tuple[str, ...]] = ("lm_head",)
    # Writers into the language residual stream from outside its blocks (rotation targets):
    # linears (the projector's last one) and raw weights ((path, "in_out" | "row")).
    projector_writers: ClassVar[tuple[str, ...]] = ()
    projector_weights: ClassVar[tuple[tuple[str, str], ...]] = ()
    norm_offset: ClassVar[float] = 0.0  # 1.0 for norms scaling by (1 + weight) (Gemma)
    vision_blocks_candidates: ClassVar[tuple[str, ...]] = ()  # first existing path wins

    @property
    def model_parts(self) -> ModelParts:
        """The parts of the loaded model: the declared ones, the vision blocks at the first existing candidate."""
        return self._model_parts

    def find_parts(self) -> ModelParts:
        """Resolve the declared parts against the loaded model (called once, when it is loaded)."""
        for candidate in self.vision_blocks_candidates:
            try:
                self.model.get_submodule(candidate)
            except AttributeError:
                continue
            return replace(self.parts, vision_blocks=candidate)
        return self.parts

    def module(self, name: str) -> nn.Module:
        return self.model.get_submodule(name)

    def blocks_path(self, part: str) -> str | None:
        return self.model_parts.language_blocks if part == "language" else self.model_parts.vision_blocks

    def blocks(self, part: str) -> nn.ModuleList:
        """The ``language`` or ``vision`` blocks."""
        name = self.blocks_path(part)
        if name is None:
            raise ValueError(f"{self.model_type} has no {part} blocks; valid parts: {self.available_parts()}")
        return self.module(name)

    def available_parts(self) -> list[str]:
        return ["vision", "language"] if self.model_parts.vision_blocks else ["language"]

    def vision_tower(self) -> nn.Module | None:
        return self.module(self.model_parts.vision_tower) if self.model_parts.vision_tower else None

    def projector(self) -> nn.Module | None:
        return self.module(self.model_parts.projector) if self.model_parts.projector else None

    def embed_tokens(self) -> nn.Embedding:
        return self.module(self.model_parts.embed_tokens)

    def final_norm(self) -> nn.Module:
        return self.module(self.model_parts.final_norm)

    def lm_head(self) -> nn.Linear:
        return self.module(self.model_parts.lm_head)

    def block_layout(self, part: str, block: nn.Module) -> BlockLayout:
        return self.language_layout(block) if part == "language" else self.vision_layout(block)

    def language_layout(self, block: nn.Module) -> BlockLayout:
        """Layer groups of one language block (default: a Llama-style pre-norm decoder layer)."""
        return decoder_layout(block, norm_offset=self.norm_offset)

    def vision_layout(self, block: nn.Module) -> BlockLayout:
        raise ValueError(f"{self.model_type} has no vision blocks")

    def rotation_targets(self) -> RotationTargets:
        """Writers into the language residual stream from outside its blocks."""
        p = self.model_parts
        return RotationTargets(embeddings=(p.embed_tokens,), external_writers=self.projector_writers,
                               external_weights=self.projector_weights, final_norm=p.final_norm,
                               lm_head=p.lm_head, norm_weight_offset=self.norm_offset)

    def block_kind(self, part: str, index: int) -> Any:
        """Blocks of one kind are called with the same kwargs (masks, rotary tables).

        Default: the text config's ``layer_types`` (sliding vs full attention) for
        language blocks, else the block's ``attention_type`` attribute.
        """
        if part == "language":
            cfg = getattr(self.model.config, "text_config", None) or self.model.config
            types = getattr(cfg, "layer_types", None)
            if types:
                return types[index]
        return getattr(self.blocks(part)[index], "attention_type", None)
