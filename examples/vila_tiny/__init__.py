"""VILA-style tiny VLM, a model family that ``transformers`` does not ship.

Importing this package registers it with the Auto classes, so that
``AutoModelForImageTextToText.from_pretrained(folder)`` works without ``trust_remote_code``.
Every saved folder also carries these code files and an ``auto_map`` in its config.json:
then ``from_pretrained(folder, trust_remote_code=True)`` loads it with no import at all.
The processor is ``transformers.LlavaProcessor`` (SiglipImageProcessor + a tokenizer): it
expands each ``<image>`` into one token per vision patch.
"""
from __future__ import annotations

from transformers import AutoConfig, AutoModelForImageTextToText

from .configuration_vila_tiny import VilaTinyConfig
from .modeling_vila_tiny import VilaTinyForConditionalGeneration, VilaTinyPreTrainedModel

AutoConfig.register(VilaTinyConfig.model_type, VilaTinyConfig, exist_ok=True)
AutoModelForImageTextToText.register(VilaTinyConfig, VilaTinyForConditionalGeneration, exist_ok=True)

# Saving copies the code files next to the weights and writes ``auto_map`` into config.json, so a saved
# folder also loads with ``trust_remote_code=True`` and no import of this package.
VilaTinyConfig.register_for_auto_class()
VilaTinyForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")

__all__ = ["VilaTinyConfig", "VilaTinyForConditionalGeneration", "VilaTinyPreTrainedModel"]
