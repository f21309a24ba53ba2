"""VILA-style VLMs (NVIDIA VILA / NVILA layout): a model family that ``transformers`` does not ship.

Module tree (see ``examples/vila_tiny``)::

    vision_tower            SigLIP tower: encoder.layers (q/k/v/out_proj, layer_norm1/2, fc1 -> fc2)
    mm_projector.layers     Linear -> GELU -> Linear ("mlp2x_gelu"): layers.2 writes into the text stream
    llm                     a causal LM (Qwen2 / Llama): llm.model.layers, llm.model.norm, llm.lm_head

The model's code is not part of ``transformers``: it must be registered with the Auto classes by
importing its package before loading, or loaded from the folder's own code files with
``model.trust_remote_code: true`` (never the default).
"""
from __future__ import annotations

import json

from torch import nn

from llmc.models.base import ModelAdapter
from llmc.models.common import clip_encoder_layout
from llmc.models.layout import BlockLayout, ModelParts
from llmc.models.registry import register_adapter

TOWER_BLOCKS = ("vision_tower.encoder.layers", "vision_tower.vision_model.encoder.layers",
                "vision_tower.vision_tower.vision_model.encoder.layers")


@register_adapter
class VilaAdapter(ModelAdapter):
    model_type = "vila"
    aliases = ("VILA", "NVILA", "vila_tiny")
    hf_model_types = ("vila", "vila_tiny", "llava_llama")
    parts = ModelParts(
        language_blocks="llm.model.layers",
        embed_tokens="llm.model.embed_tokens",
        final_norm="llm.model.norm",
        lm_head="llm.lm_head",
        vision_tower="vision_tower",
        vision_blocks=TOWER_BLOCKS[0],
        projector="mm_projector",
    )
    projector_writers = ("mm_projector.layers.2",)
    vision_blocks_candidates = TOWER_BLOCKS  # flattened (transformers >= 5) or wrapped SigLIP towers

    def load_model(self, dtype: str, attn_implementation: str) -> nn.Module:
        try:
            return super().load_model(dtype, attn_implementation)
        except ValueError as exc:
            if self.trust_remote_code or "custom code" not in str(exc) and "model type" not in str(exc):
                raise
            raise ValueError(self._not_registered_message()) from exc

    def _not_registered_message(self) -> str:
        cfg = json.loads((self.path / "config.json").read_text())
        auto_map = cfg.get("auto_map")
        remote = (f"or set `model.trust_remote_code: true` to run the code files shipped in the folder "
                  f"(auto_map: {auto_map})" if auto_map else "(the folder ships no code files: no auto_map)")
        return (f"model.type vila: {self.path} is a {cfg.get('model_type')!r} model, which transformers does not "
                f"know. Import the package that registers it with AutoConfig/AutoModelForImageTextToText before "
                f"loading (e.g. `sys.path.append('examples'); import vila_tiny`), {remote}. llmc never runs a "
                f"checkpoint's code unless model.trust_remote_code is true")

    def vision_layout(self, block: nn.Module) -> BlockLayout:
        return clip_encoder_layout(block)
