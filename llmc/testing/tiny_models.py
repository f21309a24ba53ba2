"""Tiny but real checkpoints of the VLM/LLM families supported by llmc, built offline.

Each family is built with the real ``transformers`` classes (random, seeded init, float32), a tokenizer
trained locally (see :mod:`llmc.testing.tiny_tokenizers`), the model's real processor class and a chat
template, and saved with ``save_pretrained`` so that user-style ``from_pretrained(folder)`` works.

Shapes: text hidden 64, intermediate 128, 2 layers, 4 heads (head_dim 16), max positions 512;
vision hidden 64, MLP 128, depth 2, 4 heads. Every ``nn.Linear`` has ``in_features % 32 == 0``.
A 56x56 image gives 4 image tokens in every VLM family:

* ``qwen2_vl`` / ``qwen2_5_vl``: 56x56 -> grid (t, h, w) = (1, 4, 4) = 16 patches of 14 px
  (``pixel_values`` [16, 1176]) -> 4 merged ``<|image_pad|>`` tokens. ``min_pixels`` = 28*28 (1 token),
  ``max_pixels`` = 112*112 (16 tokens); Qwen2.5-VL uses ``window_size`` 56 (a 56x56 image is one
  window) with block 1 as the full-attention block.
* ``llava_clip_llama``: CLIP 28x28 (resize + center crop), 2x2 patches + CLS, strategy "default" drops
  CLS -> 4 ``<image>`` tokens; ``vision_feature_layer`` -2 as in LLaVA-1.5.
* ``llava_siglip_qwen2``: SigLIP 28x28, 2x2 patches, no CLS, strategy "full", ``vision_feature_layer``
  -1, no pooling head (as in llava-interleave-qwen) -> 4 ``<image>`` tokens.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerBase,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
    SiglipImageProcessor,
    SiglipVisionConfig,
)

from llmc.testing import tiny_tokenizers as tt

FAMILIES: tuple[str, ...] = (
    "qwen2_vl", "qwen2_5_vl", "llava_clip_llama", "llava_siglip_qwen2", "llama", "qwen2",
)
VLM_FAMILIES: tuple[str, ...] = FAMILIES[:4]
IMAGE_TOKENS_PER_56PX_IMAGE: int = 4

HIDDEN, INTERMEDIATE, LAYERS, HEADS, MAX_POS = 64, 128, 2, 4, 512
QWEN_MIN_PIXELS, QWEN_MAX_PIXELS = 28 * 28, 112 * 112
LLAVA_IMAGE_SIZE, PATCH = 28, 14


# ----------------------------------------------------------------------------------------- helpers
def _special_ids(tok: PreTrainedTokenizerBase) -> dict[str, Any]:
    """bos/eos/pad ids for the config and the generation config (eos may be a list there)."""
    if tok.bos_token_id is None:  # Qwen: no bos is prepended; <|endoftext|> is the nominal bos
        bos = tok.convert_tokens_to_ids("<|endoftext|>")
        return {"bos": bos, "eos": tok.eos_token_id, "pad": tok.pad_token_id,
                "gen_eos": [tok.eos_token_id, bos]}
    return {"bos": tok.bos_token_id, "eos": tok.eos_token_id, "pad": tok.pad_token_id,
            "gen_eos": tok.eos_token_id}


def _text_kwargs(tok: PreTrainedTokenizerBase, kv_heads: int, tie: bool) -> dict[str, Any]:
    ids = _special_ids(tok)
    return {
        "vocab_size": len(tok), "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": kv_heads,
        "max_position_embeddings": MAX_POS, "tie_word_embeddings": tie,
        "bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": ids["pad"],
    }


def _generation_config(tok: PreTrainedTokenizerBase) -> GenerationConfig:
    ids = _special_ids(tok)
    return GenerationConfig(
        bos_token_id=ids["bos"], eos_token_id=ids["gen_eos"], pad_token_id=ids["pad"]
    )


def _qwen_rope() -> dict[str, Any]:
    # multimodal RoPE sections must sum to head_dim / 2 = 8 (the real [16, 24, 24] sums to 64)
    return {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]}


def _qwen_vl_processor(cls: type, tok: PreTrainedTokenizerBase) -> Any:
    size = {"shortest_edge": QWEN_MIN_PIXELS, "longest_edge": QWEN_MAX_PIXELS}
    return cls(
        image_processor=Qwen2VLImageProcessor(size=size),
        tokenizer=tok,
        video_processor=Qwen2VLVideoProcessor(size=size),
        chat_template=tok.chat_template,
    )


def _qwen_vl_ids(tok: PreTrainedTokenizerBase) -> dict[str, int]:
    get = tok.convert_tokens_to_ids
    return {
        "image_token_id": get("<|image_pad|>"), "video_token_id": get("<|video_pad|>"),
        "vision_start_token_id": get("<|vision_start|>"), "vision_end_token_id": get("<|vision_end|>"),
    }


# ---------------------------------------------------------------------------------------- families
def _qwen2_vl() -> tuple[Any, Any, PreTrainedTokenizerBase]:
    tok = tt.qwen_tokenizer(vision=True)
    vision = {  # hidden_size is the merger's output dim = text hidden size
        "depth": LAYERS, "embed_dim": HIDDEN, "hidden_size": HIDDEN, "mlp_ratio": INTERMEDIATE // HIDDEN,
        "num_heads": HEADS, "patch_size": PATCH, "spatial_merge_size": 2, "temporal_patch_size": 2,
    }
    text = _text_kwargs(tok, kv_heads=4, tie=True) | {"rope_parameters": _qwen_rope()}
    config = Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True,
                           **_qwen_vl_ids(tok))
    return Qwen2VLForConditionalGeneration(config), _qwen_vl_processor(Qwen2VLProcessor, tok), tok


def _qwen2_5_vl() -> tuple[Any, Any, PreTrainedTokenizerBase]:
    tok = tt.qwen_tokenizer(vision=True)
    vision = {  # window_size in pixels: 56 = 2x2 merged tokens per window; last block uses full attention
        "depth": LAYERS, "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE, "num_heads": HEADS,
        "out_hidden_size": HIDDEN, "patch_size": PATCH, "spatial_merge_size": 2, "temporal_patch_size": 2,
        "window_size": 56, "fullatt_block_indexes": [LAYERS - 1],
    }
    text = _text_kwargs(tok, kv_heads=2, tie=False) | {"rope_parameters": _qwen_rope()}
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False,
                              **_qwen_vl_ids(tok))
    return Qwen2_5_VLForConditionalGeneration(config), _qwen_vl_processor(Qwen2_5_VLProcessor, tok), tok


def _vision_kwargs() -> dict[str, Any]:
    return {
        "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE, "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS, "image_size": LLAVA_IMAGE_SIZE, "patch_size": PATCH,
    }


def _llava(
    tok: PreTrainedTokenizerBase, vision: Any, text: Any, image_processor: Any,
    strategy: str, feature_layer: int, extra_tokens: int,
) -> tuple[Any, Any, PreTrainedTokenizerBase]:
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=tok.image_token_id,
        image_seq_length=IMAGE_TOKENS_PER_56PX_IMAGE, vision_feature_select_strategy=strategy,
        vision_feature_layer=feature_layer, projector_hidden_act="gelu", tie_word_embeddings=False,
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tok, patch_size=PATCH,
        vision_feature_select_strategy=strategy, num_additional_image_tokens=extra_tokens,
        chat_template=tok.chat_template,
    )
    return LlavaForConditionalGeneration(config), processor, tok


def _llava_clip_llama() -> tuple[Any, Any, PreTrainedTokenizerBase]:
    tok = tt.llama_tokenizer(image=True)
    vision = CLIPVisionConfig(**_vision_kwargs(), projection_dim=HIDDEN)
    text = LlamaConfig(**_text_kwargs(tok, kv_heads=4, tie=False))
    side = LLAVA_IMAGE_SIZE
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": side}, crop_size={"height": side, "width": side}
    )
    return _llava(tok, vision, text, image_processor, "default", -2, extra_tokens=1)


def _llava_siglip_qwen2() -> tuple[Any, Any, PreTrainedTokenizerBase]:
    tok = tt.qwen_tokenizer(vision=False, extra=("<image>",), chat_template=tt.LLAVA_QWEN_TEMPLATE)
    vision = SiglipVisionConfig(**_vision_kwargs(), vision_use_head=False)
    text = Qwen2Config(**_text_kwargs(tok, kv_heads=2, tie=False))
    side = LLAVA_IMAGE_SIZE
    image_processor = SiglipImageProcessor(size={"height": side, "width": side})
    return _llava(tok, vision, text, image_processor, "full", -1, extra_tokens=0)


def _llama() -> tuple[Any, Any, PreTrainedTokenizerBase]:
    tok = tt.llama_tokenizer(image=False)
    return LlamaForCausalLM(LlamaConfig(**_text_kwargs(tok, kv_heads=4, tie=False))), None, tok


def _qwen2() -> tuple[Any, Any, PreTrainedTokenizerBase]:
    tok = tt.qwen_tokenizer(vision=False)
    return Qwen2ForCausalLM(Qwen2Config(**_text_kwargs(tok, kv_heads=2, tie=True))), None, tok


_BUILDERS: dict[str, Callable[[], tuple[Any, Any, PreTrainedTokenizerBase]]] = {
    "qwen2_vl": _qwen2_vl, "qwen2_5_vl": _qwen2_5_vl, "llava_clip_llama": _llava_clip_llama,
    "llava_siglip_qwen2": _llava_siglip_qwen2, "llama": _llama, "qwen2": _qwen2,
}


# -------------------------------------------------------------------------------------- public API
def _check_family(family: str) -> None:
    if family not in _BUILDERS:  # FAMILIES + the families registered by llmc.testing.tiny_more
        raise ValueError(f"unknown tiny model family {family!r}; valid families: {', '.join(_BUILDERS)}")


@torch.no_grad()
def perturb_biases_and_norms(model: torch.nn.Module, seed: int) -> None:
    """Non-zero biases and non-unit norm weights wherever the architecture has them.

    A fresh transformers model has zero biases and unit (or, for ``1 + w`` norms, zero) norm weights,
    which would leave bias handling in folding and rotation untested: biases get ``N(0, 0.05)``,
    norm weights ``+ N(0, 0.1)``.
    """
    g = torch.Generator().manual_seed(seed + 7)
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        module = name.rsplit(".", 1)[0]
        if leaf == "bias":
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
        elif leaf == "weight" and p.dim() == 1 and "norm" in module.lower():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def _write(family: str, folder: Path, seed: int) -> None:
    """Build the model (seeded) with its processor/tokenizer and save everything into ``folder``."""
    torch.manual_seed(seed)
    model, processor, tok = _BUILDERS[family]()
    model = model.to(torch.float32).eval()
    perturb_biases_and_norms(model, seed)
    model.generation_config = _generation_config(tok)
    model.save_pretrained(folder)
    (processor if processor is not None else tok).save_pretrained(folder)


def build_tiny_model(family: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Build the tiny checkpoint of ``family`` into ``out_dir`` and return it.

    The checkpoint is written to a temporary sibling folder and renamed into place, so ``out_dir``
    never holds a half-written checkpoint. Raises ``ValueError`` for an unknown family and
    ``FileExistsError`` if ``out_dir`` already exists (also when another process wins a race).
    """
    _check_family(family)
    out = Path(out_dir).expanduser().absolute()
    if out.exists():
        raise FileExistsError(f"refusing to build into existing path {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _write(family, tmp, seed)
        try:
            os.rename(tmp, out)  # atomic; fails if `out` appeared meanwhile and is not empty
        except OSError as exc:
            if out.exists():
                raise FileExistsError(f"{out} was created concurrently") from exc
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def default_cache_dir() -> Path:
    """``$LLMC_CACHE`` if set, else ``~/.cache/llmc/tiny``."""
    env = os.environ.get("LLMC_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "llmc" / "tiny"


def ensure_tiny_model(family: str, cache_dir: str | Path | None = None, seed: int = 0) -> Path:
    """Return ``cache_dir/<family>-s<seed>``, building it first if absent (safe under races)."""
    _check_family(family)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = root / f"{family}-s{seed}"
    if not path.exists():
        try:
            build_tiny_model(family, path, seed=seed)
        except FileExistsError:
            pass  # another process published it first: use theirs
    if not (path / "config.json").is_file():
        raise RuntimeError(f"{path} exists but is not a tiny checkpoint (no config.json)")
    return path


def tiny_image(path: str | Path, size: tuple[int, int] = (56, 56), seed: int = 0) -> Path:
    """Write a small RGB PNG (colored background with a few rectangles/ellipses) and return its path."""
    rng = random.Random(seed)
    width, height = size

    def color() -> tuple[int, int, int]:
        return (rng.randrange(256), rng.randrange(256), rng.randrange(256))

    image = Image.new("RGB", (width, height), color())
    draw = ImageDraw.Draw(image)
    for i in range(3):
        x0, y0 = rng.randrange(max(width - 8, 1)), rng.randrange(max(height - 8, 1))
        box = (x0, y0, rng.randrange(x0 + 4, width + 1), rng.randrange(y0 + 4, height + 1))
        (draw.ellipse if i % 2 else draw.rectangle)(box, fill=color())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path


# More VLM families live in llmc.testing.tiny_more, which adds its builders to _BUILDERS on import
# (FAMILIES keeps the original list; tiny_more.ALL_FAMILIES is the union).
import llmc.testing.tiny_more  # noqa: E402,F401
import llmc.testing.tiny_more2  # noqa: E402,F401
import llmc.testing.tiny_vila  # noqa: E402,F401  (the vila_tiny family, defined outside transformers)
