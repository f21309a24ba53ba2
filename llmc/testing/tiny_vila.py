"""Tiny VILA-style checkpoint (``vila_tiny``): a model family defined outside ``transformers``.

The model code lives in the example package ``examples/vila_tiny`` (its own config/model classes,
registered with the Auto classes on import). Shapes follow :mod:`llmc.testing.tiny_models`: SigLIP
28x28 (patch 14 -> 4 patches, no CLS, no pooling head), vision hidden 64 / MLP 128 / depth 2;
``mm_projector`` 64 -> 64 -> 64; Qwen2 text (hidden 64, 2 layers, 4 heads on 2 kv heads). A 56x56
image is resized to 28x28 -> 4 ``<image>`` tokens. The saved folder carries the code files and an
``auto_map`` (loadable with ``trust_remote_code=True`` where the package is not imported).
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

from transformers import (
    LlavaProcessor,
    Qwen2Config,
    SiglipImageProcessor,
    SiglipVisionConfig,
)

from llmc.testing import tiny_models as tm
from llmc.testing import tiny_tokenizers as tt

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
FAMILY, MODEL_TYPE, IMAGE_TOKENS = "vila_tiny", "vila", 4


def vila_package() -> ModuleType:
    """Import ``examples/vila_tiny`` as ``vila_tiny`` (registers it with AutoConfig / AutoModelForImageTextToText).

    ``examples`` is put on ``sys.path`` (a site-packages ``examples`` package may shadow a dotted import).
    """
    if str(EXAMPLES) not in sys.path:
        sys.path.append(str(EXAMPLES))
    return importlib.import_module("vila_tiny")


def _vila_tiny() -> tuple:
    pkg = vila_package()
    tok = tt.qwen_tokenizer(vision=False, extra=("<image>",), chat_template=tt.LLAVA_QWEN_TEMPLATE)
    side = tm.LLAVA_IMAGE_SIZE
    vision = SiglipVisionConfig(hidden_size=tm.HIDDEN, intermediate_size=tm.INTERMEDIATE,
                                num_hidden_layers=tm.LAYERS, num_attention_heads=tm.HEADS, image_size=side,
                                patch_size=tm.PATCH, vision_use_head=False)
    text = Qwen2Config(**tm._text_kwargs(tok, kv_heads=2, tie=False))
    config = pkg.VilaTinyConfig(vision_config=vision, text_config=text,
                                image_token_id=tok.convert_tokens_to_ids("<image>"))
    processor = LlavaProcessor(image_processor=SiglipImageProcessor(size={"height": side, "width": side}),
                               tokenizer=tok, patch_size=tm.PATCH, vision_feature_select_strategy="full",
                               num_additional_image_tokens=0, chat_template=tok.chat_template)
    return pkg.VilaTinyForConditionalGeneration(config), processor, tok


BUILDERS = {FAMILY: _vila_tiny}
tm._BUILDERS.update(BUILDERS)  # build_tiny_model / ensure_tiny_model know vila_tiny
