"""Batched greedy generation with an adapter's own processor and chat template (no lmms-eval needed)."""
from __future__ import annotations

import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from llmc.calib.sample import Sample
from llmc.models.base import ModelAdapter

__all__ = ["encode_batch", "generate", "model_device"]


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _image_path(visual: Any, folder: Path, name: str) -> Path:
    """An image file for ``visual``: its own path, or a lossless BMP copy of an in-memory image."""
    if isinstance(visual, (str, Path)) and Path(visual).is_file():
        return Path(visual).absolute()
    if isinstance(visual, Image.Image):
        path = folder / f"{name}.bmp"
        visual.convert("RGB").save(path, format="BMP")
        return path
    raise TypeError(f"unsupported visual of type {type(visual).__name__}; expected a PIL image or an image path")


def encode_batch(adapter: ModelAdapter, questions: Sequence[str],
                 images: Sequence[Sequence[Any]]) -> dict[str, torch.Tensor]:
    """Prompts with images (PIL or paths) -> one left-padded batch through ``adapter.batch_process``.

    The adapter's own ``encode`` (chat template, processor, special tokens) is used
    unchanged; since ``Sample.images`` are paths, in-memory images are written to a
    temporary folder as lossless BMP for the call. Text-only adapters get the text alone.
    """
    with tempfile.TemporaryDirectory(prefix="llmc-eval-images-") as tmp:
        samples = []
        for i, (question, imgs) in enumerate(zip(questions, images)):
            imgs = list(imgs) if adapter.is_vlm else []
            paths = tuple(_image_path(v, Path(tmp), f"{i}_{j}") for j, v in enumerate(imgs))
            samples.append(Sample(question, images=paths))
        return adapter.batch_process(samples, with_answer=False, padding_side="left")


@torch.no_grad()
def generate(adapter: ModelAdapter, batch: dict[str, torch.Tensor], max_new_tokens: int) -> list[str]:
    """Greedy continuations of a left-padded batch, decoded without special tokens (not stripped)."""
    device = model_device(adapter.model)
    inputs = {k: v.to(device) for k, v in batch.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sampling defaults of the generation config are ignored on purpose
        out = adapter.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                     pad_token_id=adapter.pad_token_id())
    new_tokens = out[:, inputs["input_ids"].shape[1]:]
    return adapter.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
