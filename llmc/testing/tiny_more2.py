"""Tiny VLM families, third batch (Mllama, PaliGemma, Mistral3), built like :mod:`llmc.testing.tiny_more`.

Shapes: text hidden 64, 4 heads of 16, intermediate 128; vision hidden 64, MLP 128, 4 heads; every
``nn.Linear`` has ``in_features % 32 == 0``.

* ``mllama``: Llama-3.2-Vision. Vision: 28px tiles of 14px patches (4 patches + CLS), up to 2 tiles
  per image (aspect ratios ``[[1, 1], [1, 2], [2, 1]]``), 2 local layers + 1 gated global layer,
  ``intermediate_layers_indices=[0]`` -> vision output 128 -> ``multi_modal_projector`` (128 -> 64).
  Text: 3 layers, layer 1 is a cross-attention layer (k/v read the projected vision features);
  2 kv heads. The tanh gates of the cross-attention layer (0 at init, so the layer would be an
  identity) and the gated positional embeddings are set to non-zero values. One ``<|image|>``
  token per image; the image only reaches the text through cross-attention.
* ``paligemma``: SigLIP 28px (2x2 patches, no head) -> ``multi_modal_projector.linear`` -> Gemma
  (v1) text, 2 layers, 1 kv head (multi-query, as PaliGemma-3B); 4 ``<image>`` tokens per image, put
  before ``<bos>`` by the processor (which also adds Gemma's 1152 ``<locXXXX>``/``<segXXX>`` tokens).
* ``mistral3``: Pixtral 56px (4x4 patches of 14, 2D RoPE, gated MLP, RMSNorms) -> projector (RMSNorm,
  2x2 patch merger, ``linear_1 -> GELU -> linear_2``) -> Mistral text (2 kv heads); a 56px image is
  2x2 ``[IMG]`` tokens + ``[IMG_BREAK]`` + ``[IMG_END]``.

``BUILDERS`` / ``MODEL_TYPES`` / ``MODEL_CLASSES`` as in tiny_more; importing this module registers the
families with :mod:`llmc.testing.tiny_models` (imported from ``llmc.testing.tiny_more``).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers import (
    GemmaConfig,
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    MistralConfig,
    MllamaConfig,
    MllamaForConditionalGeneration,
    MllamaImageProcessor,
    MllamaProcessor,
    MllamaTextConfig,
    MllamaVisionConfig,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PaliGemmaProcessor,
    PixtralImageProcessor,
    PixtralProcessor,
    PixtralVisionConfig,
    PreTrainedTokenizerBase,
    SiglipImageProcessor,
    SiglipVisionConfig,
)

from llmc.testing import tiny_models as tm
from llmc.testing import tiny_more_tokenizers as mt

Built = tuple[Any, Any, PreTrainedTokenizerBase]
_MLLAMA_TILE = 28
_MLLAMA_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                    "<|eot_id|>", "<|python_tag|>", "<|finetune_right_pad_id|>", "<|image|>")


@torch.no_grad()
def _open_gates(model: torch.nn.Module, value: float = 0.7) -> None:
    """Zero-initialised tanh gates make cross-attention and gated embeddings no-ops: open them."""
    for name, p in model.named_parameters():
        if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")) or name.endswith(".gate"):
            p.fill_(value)


def _mllama() -> Built:
    named = {"image_token": "<|image|>"}
    tok = mt.qwen_style(_MLLAMA_SPECIALS, named, mt.MLLAMA_TEMPLATE, eos="<|eot_id|>",
                        pad="<|finetune_right_pad_id|>", bos="<|begin_of_text|>")
    ids = tm._special_ids(tok)
    vision = MllamaVisionConfig(
        hidden_size=tm.HIDDEN, intermediate_size=tm.INTERMEDIATE, num_hidden_layers=2, num_global_layers=1,
        attention_heads=tm.HEADS, image_size=_MLLAMA_TILE, patch_size=tm.PATCH, max_num_tiles=2,
        intermediate_layers_indices=[0], vision_output_dim=2 * tm.HIDDEN,
        supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]])
    text = MllamaTextConfig(
        vocab_size=len(tok), hidden_size=tm.HIDDEN, intermediate_size=tm.INTERMEDIATE, num_hidden_layers=3,
        num_attention_heads=tm.HEADS, num_key_value_heads=2, cross_attention_layers=[1],
        max_position_embeddings=tm.MAX_POS, bos_token_id=ids["bos"], eos_token_id=ids["eos"],
        pad_token_id=ids["pad"], tie_word_embeddings=False)
    config = MllamaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<|image|>"),
                          tie_word_embeddings=False)
    images = MllamaImageProcessor(size={"height": _MLLAMA_TILE, "width": _MLLAMA_TILE}, max_image_tiles=2)
    processor = MllamaProcessor(image_processor=images, tokenizer=tok, chat_template=tok.chat_template)
    model = MllamaForConditionalGeneration(config)
    _open_gates(model)
    return model, processor, tok


# PaliGemma has no chat template: "<image>" per image, then the text; the processor adds <bos> and "\n".
PALIGEMMA_TEMPLATE = ("{% for message in messages %}" + mt._content_loop("{{ '<image>' }}", True)
                      + "{% if not loop.last %}{{ ' ' }}{% endif %}{% endfor %}")


def _paligemma() -> Built:
    named = {"image_token": "<image>"}
    tok = mt.gemma_style(("<image>",), named, PALIGEMMA_TEMPLATE)
    images = SiglipImageProcessor(size={"height": _MLLAMA_TILE, "width": _MLLAMA_TILE})
    images.image_seq_length = 4
    processor = PaliGemmaProcessor(image_processor=images, tokenizer=tok, chat_template=PALIGEMMA_TEMPLATE)
    ids = tm._special_ids(tok)
    text = GemmaConfig(vocab_size=len(tok), hidden_size=tm.HIDDEN, intermediate_size=tm.INTERMEDIATE,
                       num_hidden_layers=tm.LAYERS, num_attention_heads=tm.HEADS, num_key_value_heads=1, head_dim=16,
                       max_position_embeddings=tm.MAX_POS, bos_token_id=ids["bos"], eos_token_id=ids["eos"],
                       pad_token_id=ids["pad"], tie_word_embeddings=True)
    vision = SiglipVisionConfig(hidden_size=tm.HIDDEN, intermediate_size=tm.INTERMEDIATE, num_hidden_layers=tm.LAYERS,
                                num_attention_heads=tm.HEADS, image_size=_MLLAMA_TILE, patch_size=tm.PATCH,
                                vision_use_head=False, projection_dim=tm.HIDDEN)
    config = PaliGemmaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                             projection_dim=tm.HIDDEN, hidden_size=tm.HIDDEN, tie_word_embeddings=True)
    return PaliGemmaForConditionalGeneration(config), processor, tok


# Mistral-Small-3.1: [INST] ... [/INST], [IMG] per image (expanded by PixtralProcessor).
MISTRAL3_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST]' }}"
                     + mt._content_loop("{{ '[IMG]' }}", True) + "{{ '[/INST]' }}{% else %}"
                     + mt._content_loop("", True) + "{{ eos_token }}{% endif %}{% endfor %}")


def _mistral3() -> Built:
    named = {"image_token": "[IMG]", "image_break_token": "[IMG_BREAK]", "image_end_token": "[IMG_END]"}
    tok = mt.llama_style(("[INST]", "[/INST]", *named.values()), named, MISTRAL3_TEMPLATE)
    vision = PixtralVisionConfig(hidden_size=tm.HIDDEN, intermediate_size=tm.INTERMEDIATE, num_hidden_layers=tm.LAYERS,
                                 num_attention_heads=tm.HEADS, head_dim=16, patch_size=tm.PATCH, image_size=56)
    text = MistralConfig(**tm._text_kwargs(tok, kv_heads=2, tie=False), head_dim=16)
    config = Mistral3Config(vision_config=vision, text_config=text, spatial_merge_size=2, vision_feature_layer=-1,
                            image_token_index=tok.convert_tokens_to_ids("[IMG]"), tie_word_embeddings=False)
    images = PixtralImageProcessor(size={"longest_edge": 56}, patch_size=tm.PATCH)
    processor = PixtralProcessor(image_processor=images, tokenizer=tok, patch_size=tm.PATCH, spatial_merge_size=2,
                                 chat_template=MISTRAL3_TEMPLATE)
    return Mistral3ForConditionalGeneration(config), processor, tok


BUILDERS: dict[str, Callable[[], Built]] = {"mllama": _mllama, "paligemma": _paligemma, "mistral3": _mistral3}
MODEL_TYPES: dict[str, str] = {"mllama": "mllama", "paligemma": "paligemma", "mistral3": "mistral3"}
MODEL_CLASSES: dict[str, str] = {"mllama": "MllamaForConditionalGeneration",
                                 "paligemma": "PaliGemmaForConditionalGeneration",
                                 "mistral3": "Mistral3ForConditionalGeneration"}
IMAGE_TOKENS: dict[str, int] = {"mllama": 1, "paligemma": 4, "mistral3": 4}
tm._BUILDERS.update(BUILDERS)
