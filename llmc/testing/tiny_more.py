"""More tiny VLM families, built like :mod:`llmc.testing.tiny_models` (real classes, seeded, offline).

Shapes follow tiny_models: text hidden 64, intermediate 128, 2 layers, 4 heads (head_dim 16);
vision hidden 64, MLP 128, depth 2, 4 heads; every ``nn.Linear`` has ``in_features % 32 == 0``.
A 56x56 image gives a handful of image tokens in every family (see ``IMAGE_TOKENS`` below).

* ``internvl``: InternViT 56x56 (patch 14 -> 16 patches), pixel shuffle 0.5 -> 4 ``<IMG_CONTEXT>``
  tokens between ``<img>``/``</img>``; no tiling (``crop_to_patches`` off); Qwen2 text.
* ``idefics3`` / ``smolvlm``: SigLIP-style 56px tiles, pixel shuffle x2 -> 4 ``<image>`` per tile;
  idefics3 splits a 56px image (longest edge resized to 112) into 2x2 tiles + a global view = 20
  tokens, smolvlm keeps only the global view = 4 tokens; Llama text; SmolVLM's processor needs
  ``num2words``.
* ``gemma3``: SigLIP 56px, avg-pooled to 4 ``<image_soft_token>``; GemmaTokenizer; Gemma3 text with
  sliding + full attention layers.
* ``qwen3_vl``: patch 16 (56px -> 64px -> 4 tokens), deepstack mergers after vision blocks 0 and 1.
* ``llava_next`` (CLIP + Llama) / ``llava_onevision`` (SigLIP + Qwen2): 28px tiles, anyres grid
  ``[[28, 28], [28, 56], [56, 28], [56, 56]]`` -> a 56px image is 2x2 tiles + base = 24 tokens.

``BUILDERS`` maps family -> builder; tiny_models registers them (``FAMILIES`` there stays the
original list, ``ALL_FAMILIES`` below is the union) and ``MODEL_TYPES`` maps family -> model.type.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from transformers import (
    CLIPVisionConfig,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessor,
    Gemma3Processor,
    Gemma3TextConfig,
    GotOcr2ImageProcessor,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessor,
    Idefics3Processor,
    Idefics3VisionConfig,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLProcessor,
    InternVLVideoProcessor,
    InternVLVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessor,
    LlavaOnevisionProcessor,
    LlavaOnevisionVideoProcessor,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen2VLImageProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
    SiglipVisionConfig,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
    SmolVLMImageProcessor,
    SmolVLMProcessor,
    SmolVLMVideoProcessor,
    SmolVLMVisionConfig,
)

from llmc.testing import tiny_models as tm
from llmc.testing import tiny_more_tokenizers as mt
from llmc.testing import tiny_tokenizers as tt

Built = tuple[Any, Any, PreTrainedTokenizerBase]
SIDE = 56  # test images are 56x56


def _internvl() -> Built:
    named = {"start_image_token": "<img>", "end_image_token": "</img>",
             "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}
    tok = mt.qwen_style(tt.QWEN_TEXT_SPECIALS + tuple(named.values()), named, mt.INTERNVL_TEMPLATE)
    vision = InternVLVisionConfig(hidden_size=tm.HIDDEN, intermediate_size=tm.INTERMEDIATE,
                                  num_hidden_layers=tm.LAYERS, num_attention_heads=tm.HEADS,
                                  image_size=[SIDE, SIDE], patch_size=[tm.PATCH, tm.PATCH])
    text = Qwen2Config(**tm._text_kwargs(tok, kv_heads=2, tie=False))
    config = InternVLConfig(vision_config=vision, text_config=text, downsample_ratio=0.5,
                            image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"), image_seq_length=4,
                            tie_word_embeddings=False)
    size = {"height": SIDE, "width": SIDE}
    processor = InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(size=size, crop_to_patches=False),
        tokenizer=tok, video_processor=InternVLVideoProcessor(size=size), image_seq_length=4,
        chat_template=tok.chat_template)
    return InternVLForConditionalGeneration(config), processor, tok


def _vision(**extra: Any) -> dict[str, Any]:
    """SigLIP-style tiny vision tower kwargs (56x56 / patch 14 = 16 patches)."""
    return {"hidden_size": tm.HIDDEN, "intermediate_size": tm.INTERMEDIATE, "num_hidden_layers": tm.LAYERS,
            "num_attention_heads": tm.HEADS, "image_size": SIDE, "patch_size": tm.PATCH} | extra


_IDEFICS_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>",
                     "<image>", "<global-img>", "<video>") + tuple(
    f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7))


def _idefics(model_cls: type, config_cls: type, vision_cls: type, proc_cls: type, image_proc: type,
             video: Any | None, max_tiles_side: int) -> Built:
    """Idefics3 / SmolVLM: SigLIP 56px tiles, pixel shuffle x2 -> 4 ``<image>`` tokens per tile.

    The image processor resizes the longest edge to ``56 * max_tiles_side`` and splits into 56px
    tiles plus a global view when that is larger than one tile.
    """
    named = {"image_token": "<image>", "fake_image_token": "<fake_token_around_image>",
             "global_image_token": "<global-img>", "end_of_utterance_token": "<end_of_utterance>"}
    tok = mt.qwen_style(_IDEFICS_SPECIALS, named, mt.IDEFICS3_TEMPLATE, eos="<end_of_utterance>")
    text = LlamaConfig(**tm._text_kwargs(tok, kv_heads=4, tie=False))
    config = config_cls(vision_config=vision_cls(**_vision()), text_config=text, scale_factor=2,
                        image_token_id=tok.convert_tokens_to_ids("<image>"), tie_word_embeddings=False)
    images = image_proc(size={"longest_edge": SIDE * max_tiles_side}, max_image_size={"longest_edge": SIDE},
                        do_image_splitting=max_tiles_side > 1)
    extra = {"video_processor": video} if video is not None else {}
    processor = proc_cls(image_processor=images, tokenizer=tok, image_seq_len=4, chat_template=tok.chat_template,
                         **extra)
    return model_cls(config), processor, tok


def _idefics3() -> Built:
    return _idefics(Idefics3ForConditionalGeneration, Idefics3Config, Idefics3VisionConfig, Idefics3Processor,
                    Idefics3ImageProcessor, None, max_tiles_side=2)


def _smolvlm() -> Built:
    video = SmolVLMVideoProcessor(size={"longest_edge": SIDE}, max_image_size={"longest_edge": SIDE})
    return _idefics(SmolVLMForConditionalGeneration, SmolVLMConfig, SmolVLMVisionConfig, SmolVLMProcessor,
                    SmolVLMImageProcessor, video, max_tiles_side=1)


def _gemma3() -> Built:
    """Gemma 3: SigLIP 56px (4x4 patches) avg-pooled to 2x2 = 4 ``<image_soft_token>`` per image."""
    named = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    extra = ("<start_of_turn>", "<end_of_turn>", *named.values())
    tok = mt.gemma_style(extra, named, mt.GEMMA3_TEMPLATE)
    ids = tm._special_ids(tok)
    text = Gemma3TextConfig(
        vocab_size=len(tok), hidden_size=tm.HIDDEN, intermediate_size=tm.INTERMEDIATE,
        num_hidden_layers=tm.LAYERS, num_attention_heads=tm.HEADS, num_key_value_heads=2, head_dim=16,
        query_pre_attn_scalar=16, sliding_window=32, max_position_embeddings=tm.MAX_POS,
        layer_types=["sliding_attention", "full_attention"], bos_token_id=ids["bos"],
        eos_token_id=ids["eos"], pad_token_id=ids["pad"], tie_word_embeddings=True)
    get = tok.convert_tokens_to_ids
    config = Gemma3Config(
        text_config=text, vision_config=SiglipVisionConfig(**_vision(vision_use_head=False)),
        mm_tokens_per_image=4, boi_token_index=get("<start_of_image>"), eoi_token_index=get("<end_of_image>"),
        image_token_index=get("<image_soft_token>"), tie_word_embeddings=True)
    images = Gemma3ImageProcessor(size={"height": SIDE, "width": SIDE}, do_pan_and_scan=False)
    processor = Gemma3Processor(image_processor=images, tokenizer=tok, image_seq_length=4,
                                chat_template=tok.chat_template)
    return Gemma3ForConditionalGeneration(config), processor, tok


def _qwen3_vl() -> Built:
    """Qwen3-VL: patch 16, merge 2 -> a 56x56 image is resized to 64x64 -> 4 ``<|image_pad|>`` tokens.

    Deepstack: vision blocks 0 and 1 feed two mergers whose outputs are added to the hidden states
    of the image tokens after language blocks 0 and 1.
    """
    tok = tt.qwen_tokenizer(vision=True, chat_template=mt.QWEN3_VL_TEMPLATE)
    vision = {"depth": tm.LAYERS, "hidden_size": tm.HIDDEN, "intermediate_size": tm.INTERMEDIATE,
              "num_heads": tm.HEADS, "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
              "out_hidden_size": tm.HIDDEN, "num_position_embeddings": 16, "deepstack_visual_indexes": [0, 1]}
    rope = {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [2, 3, 3], "mrope_interleaved": True}
    text = tm._text_kwargs(tok, kv_heads=2, tie=False) | {"head_dim": 16, "rope_parameters": rope}
    config = Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **tm._qwen_vl_ids(tok))
    size = {"shortest_edge": 32 * 32, "longest_edge": 128 * 128}
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=size, patch_size=16, merge_size=2, temporal_patch_size=2),
        tokenizer=tok, video_processor=Qwen3VLVideoProcessor(size=size, patch_size=16),
        chat_template=tok.chat_template)
    return Qwen3VLForConditionalGeneration(config), processor, tok


_TILE = 28  # LLaVA-NeXT / OneVision tiles: 28px / patch 14 = 2x2 patches
_PINPOINTS = [[28, 28], [28, 56], [56, 28], [56, 56]]


def _llava_next() -> Built:
    """LLaVA-NeXT (1.6): CLIP 28px tiles, anyres grid up to 2x2 tiles + base view, ``image_newline``."""
    tok = tt.llama_tokenizer(image=True)
    vision = CLIPVisionConfig(**_vision(image_size=_TILE), projection_dim=tm.HIDDEN)
    text = LlamaConfig(**tm._text_kwargs(tok, kv_heads=4, tie=False))
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=tok.image_token_id,
                             image_grid_pinpoints=_PINPOINTS, vision_feature_select_strategy="default",
                             vision_feature_layer=-2, image_seq_length=4, tie_word_embeddings=False)
    images = LlavaNextImageProcessor(size={"shortest_edge": _TILE}, crop_size={"height": _TILE, "width": _TILE},
                                     image_grid_pinpoints=_PINPOINTS)
    processor = LlavaNextProcessor(image_processor=images, tokenizer=tok, patch_size=tm.PATCH,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=tok.chat_template)
    return LlavaNextForConditionalGeneration(config), processor, tok


def _llava_onevision() -> Built:
    """LLaVA-OneVision: SigLIP 28px tiles (anyres, up to 2x2 + base), Qwen2 text, ``image_newline``."""
    tok = tt.qwen_tokenizer(vision=False, extra=("<image>", "<video>"), chat_template=tt.LLAVA_QWEN_TEMPLATE)
    tok_video = {"video_token": "<video>"}
    vision = SiglipVisionConfig(**_vision(image_size=_TILE), vision_use_head=False)
    text = Qwen2Config(**tm._text_kwargs(tok, kv_heads=2, tie=False))
    get = tok.convert_tokens_to_ids
    config = LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_index=get("<image>"),
                                  video_token_index=get("<video>"), image_grid_pinpoints=_PINPOINTS,
                                  vision_feature_select_strategy="full", vision_feature_layer=-1,
                                  vision_aspect_ratio="anyres_max_9", tie_word_embeddings=False)
    size = {"height": _TILE, "width": _TILE}
    images = LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=_PINPOINTS)
    processor = LlavaOnevisionProcessor(
        image_processor=images, tokenizer=tok, video_processor=LlavaOnevisionVideoProcessor(size=size),
        num_image_tokens=4, vision_feature_select_strategy="full", chat_template=tok.chat_template, **tok_video)
    return LlavaOnevisionForConditionalGeneration(config), processor, tok


BUILDERS: dict[str, Callable[[], Built]] = {
    "internvl": _internvl, "idefics3": _idefics3, "smolvlm": _smolvlm, "gemma3": _gemma3, "qwen3_vl": _qwen3_vl,
    "llava_next": _llava_next, "llava_onevision": _llava_onevision,
}
MODEL_TYPES: dict[str, str] = {"internvl": "internvl", "idefics3": "idefics3", "smolvlm": "smolvlm", "gemma3": "gemma3", "qwen3_vl": "qwen3_vl",
                               "llava_next": "llava_next", "llava_onevision": "llava_onevision"}
# <image> tokens for one 56x56 image: idefics3 splits (2x2 tiles + global view) x 4 tokens
IMAGE_TOKENS: dict[str, int] = {"internvl": 4, "idefics3": 20, "smolvlm": 4, "gemma3": 4, "qwen3_vl": 4, "llava_next": 24, "llava_onevision": 24}
MODEL_CLASSES: dict[str, str] = {
    "internvl": "InternVLForConditionalGeneration", "idefics3": "Idefics3ForConditionalGeneration",
    "smolvlm": "SmolVLMForConditionalGeneration", "gemma3": "Gemma3ForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration",
    "llava_onevision": "LlavaOnevisionForConditionalGeneration",
}
ALL_FAMILIES: tuple[str, ...] = tm.FAMILIES + tuple(BUILDERS)
tm._BUILDERS.update(BUILDERS)  # build_tiny_model / ensure_tiny_model know these families
