"""``model.type: auto``: a generic adapter for an unseen (vision-)language model, found from its module tree.

:func:`llmc.models.discover.discover` finds the parts (embeddings, language blocks, final norm,
lm_head, vision tower, vision blocks, projector and its last linear into the text hidden size) and
reads each kind of block (attention q/k/v/o or fused qkv + proj, gated or plain MLP, two pre-norms).
Anything it cannot find makes the adapter refuse with the list of problems (``python -m llmc inspect
MODEL_DIR`` prints the same, plus the skeleton of an explicit adapter). What auto cannot know:

* block kinds: text ``layer_types`` (sliding/full) and vision ``fullatt_block_indexes`` (window vs
  full attention) are read from the config; other per-block differences need an explicit adapter;
* norms that scale by ``1 + weight`` (Gemma) and blocks that add into the stream between blocks
  (deepstack) are refused; raw ``[hidden]`` vectors outside the tower (``image_newline``) are
  rotation targets of kind ``"row"`` (inserted as tokens).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from llmc.models.base import ModelAdapter
from llmc.models.discover import Discovery, discover, norm_weight_offset
from llmc.models.layout import BlockLayout, ModelParts, RotationTargets
from llmc.models.registry import register_adapter


def config_is_vlm(config: Any) -> bool:
    """A config with a vision sub-config describes a VLM (loaded with AutoModelForImageTextToText)."""
    return getattr(config, "vision_config", None) is not None


class AutoDiscoveryError(ValueError):
    """``model.type: auto`` could not find every part of the model."""


def refusal(d: Discovery, where: str) -> str:
    lines = "\n".join(f"  - {p}" for p in d.problems)
    return (f"model.type auto: cannot read {where}:\n{lines}\nRun `python -m llmc inspect {where}` for the module "
            f"tree and the skeleton of an explicit adapter (docs/add_model.md).")


@register_adapter
class AutoAdapter(ModelAdapter):
    """Picks :class:`AutoVLMAdapter` or :class:`AutoTextAdapter` from the checkpoint's config (a class-level
    fact of each), then finds the parts by discovery (instance state)."""

    model_type = "auto"
    aliases = ("generic",)

    def __new__(cls, path: str | Path, *args: Any, **kwargs: Any) -> "AutoAdapter":
        if cls is AutoAdapter:
            import transformers

            config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=kwargs.get("trust_remote_code",
                                                                                               False))
            cls = AutoVLMAdapter if config_is_vlm(config) else AutoTextAdapter
        return super().__new__(cls)

    def find_parts(self) -> ModelParts:
        self.discovery = discover(self.model, self.is_vlm)
        if self.discovery.problems:
            raise AutoDiscoveryError(refusal(self.discovery, str(self.path)))
        d = self.discovery
        return ModelParts(language_blocks=d.language_blocks, embed_tokens=d.embed_tokens, final_norm=d.final_norm,
                          lm_head=d.lm_head, vision_tower=d.vision_tower, vision_blocks=d.vision_blocks,
                          projector=d.projector)

    def language_layout(self, block: nn.Module) -> BlockLayout:
        return self.discovery.language_spec.layout(block)

    def vision_layout(self, block: nn.Module) -> BlockLayout:
        if self.discovery.vision_spec is None:
            raise ValueError("model.type auto: this model has no vision blocks")
        return self.discovery.vision_spec.layout(block)

    def rotation_targets(self) -> RotationTargets:
        """Embeddings, the projector's last linear, and raw ``[hidden]`` vectors outside the tower (``"row"``)."""
        d = self.discovery
        writers = (d.projector_writer,) if d.projector_writer else ()
        return RotationTargets(embeddings=(d.embed_tokens,), external_writers=writers,
                               external_weights=tuple((name, "row") for name in d.raw_writers),
                               final_norm=d.final_norm, lm_head=d.lm_head,
                               norm_weight_offset=norm_weight_offset(self.module(d.final_norm)))

    def block_kind(self, part: str, index: int) -> Any:
        """Text ``layer_types`` (base rule); vision ``fullatt_block_indexes`` (window vs full attention)."""
        if part == "vision":
            full = getattr(getattr(self.model.config, "vision_config", None), "fullatt_block_indexes", None)
            if full:
                return index in full
        return super().block_kind(part, index)


class AutoVLMAdapter(AutoAdapter):
    """``model.type: auto`` on a checkpoint with a vision config."""

    is_vlm = True


class AutoTextAdapter(AutoAdapter):
    """``model.type: auto`` on a text-only checkpoint."""

    is_vlm = False
