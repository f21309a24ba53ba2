"""A VILA-style VLM written outside ``transformers``: SigLIP tower + 2-layer MLP projector + decoder.

Module tree (as in NVIDIA VILA's ``LlavaLlamaModel``)::

    vision_tower          SiglipVisionModel (transformers)
    mm_projector.layers   Sequential(Linear, GELU, Linear)   # layers.2 writes into the text stream
    llm                   Qwen2ForCausalLM / LlamaForCausalLM (transformers)

The image features (last hidden state of the tower, every patch) replace the embeddings of the
``<image>`` tokens that the processor put into ``input_ids``.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_vila_tiny import VilaTinyConfig


class VilaTinyProjector(nn.Module):
    """VILA's ``mlp2x_gelu``: ``layers`` = Linear(vision, text) -> GELU -> Linear(text, text)."""

    def __init__(self, config: VilaTinyConfig) -> None:
        super().__init__()
        v, t = config.vision_config.hidden_size, config.text_config.hidden_size
        self.layers = nn.Sequential(nn.Linear(v, t), nn.GELU(), nn.Linear(t, t))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class VilaTinyPreTrainedModel(PreTrainedModel):
    config_class = VilaTinyConfig
    config: VilaTinyConfig
    base_model_prefix = "vila"
    input_modalities = ("image", "text")
    _supports_sdpa = True
    _supports_attention_backend = True
    _skip_keys_device_placement = ["past_key_values"]


class VilaTinyForConditionalGeneration(VilaTinyPreTrainedModel, GenerationMixin):
    def __init__(self, config: VilaTinyConfig) -> None:
        super().__init__(config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.mm_projector = VilaTinyProjector(config)
        self.llm = AutoModelForCausalLM.from_config(config.text_config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.llm.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.llm.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.llm.get_output_embeddings()

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[images, 3, H, W] -> [images * patches, text hidden]."""
        feats = self.vision_tower(pixel_values=pixel_values.to(self.dtype)).last_hidden_state
        return self.mm_projector(feats).flatten(0, 1)

    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None,
                past_key_values=None, inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0,
                **kwargs) -> CausalLMOutputWithPast:
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        if pixel_values is not None and input_ids is not None:
            mask = input_ids == self.config.image_token_id
            if mask.any():  # generation steps after the first carry pixel_values but no image tokens
                feats = self.get_image_features(pixel_values).to(inputs_embeds.dtype)
                if feats.shape[0] != int(mask.sum()):
                    raise ValueError(f"{int(mask.sum())} image tokens but {feats.shape[0]} image features")
                inputs_embeds = inputs_embeds.masked_scatter(mask.unsqueeze(-1), feats)
        return self.llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                        past_key_values=past_key_values, labels=labels, use_cache=use_cache,
                        logits_to_keep=logits_to_keep, **kwargs)


__all__ = ["VilaTinyForConditionalGeneration", "VilaTinyPreTrainedModel"]
