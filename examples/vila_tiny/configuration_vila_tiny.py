"""Configuration of the VILA-style tiny model (a model family that is not in ``transformers``).

``vision_config``: a SigLIP vision tower config; ``text_config``: any decoder config (Qwen2, Llama).
The projector (``mm_projector``) is VILA's ``mlp2x_gelu``: Linear -> GELU -> Linear, vision hidden
-> text hidden.
"""
from __future__ import annotations

from transformers import AutoConfig, PretrainedConfig
from transformers.configuration_utils import SubConfigSpec


class VilaTinyConfig(PretrainedConfig):
    model_type = "vila_tiny"
    attribute_map = {"image_token_index": "image_token_id"}
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="siglip_vision_model"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2"),
    }

    vision_config: dict | PretrainedConfig | None = None
    text_config: dict | PretrainedConfig | None = None
    image_token_id: int = 0
    mm_projector_type: str = "mlp2x_gelu"
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.mm_projector_type != "mlp2x_gelu":
            raise ValueError(f"mm_projector_type={self.mm_projector_type!r}; only 'mlp2x_gelu' is implemented")


__all__ = ["VilaTinyConfig"]
