"""The prompts every runner scores (built in llmc's venv, handed to runners as JSON)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TEXTS = (
    "The quick brown fox jumps over the lazy dog while the cat watches from the window.",
    "Quantization maps each weight to a small integer and a shared scale per group of channels.",
    "What color is the square in the picture? Answer with one word.",
)
IMAGE_QUESTIONS = ("Describe the image.", "Is there a red circle in the image? Answer yes or no.")


def image_files(root: Path) -> list[Path]:
    """Two deterministic 112x112 PNGs (16 image tokens each in Qwen2-VL)."""
    from llmc.testing.tiny_models import tiny_image

    return [tiny_image(root / "images" / f"img{i}.png", size=(112, 112), seed=i) for i in range(len(IMAGE_QUESTIONS))]


def make_prompts(model_dir: Path, root: Path) -> list[dict[str, Any]]:
    """Text prompts as token ids; for a VLM also chat prompts with one image each."""
    from transformers import AutoProcessor, AutoTokenizer

    cfg = json.loads((model_dir / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts: list[dict[str, Any]] = [{"id": f"text{i}", "kind": "text", "token_ids": tok(t)["input_ids"]}
                                     for i, t in enumerate(TEXTS)]
    if "vision_config" not in cfg:
        return prompts
    proc = AutoProcessor.from_pretrained(model_dir)
    for i, (q, img) in enumerate(zip(IMAGE_QUESTIONS, image_files(root))):
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
        text = proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        prompts.append({"id": f"image{i}", "kind": "image", "text": text, "image": str(img)})
    return prompts
