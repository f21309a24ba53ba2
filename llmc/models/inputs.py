"""How samples become model inputs: chat template, the family's processor, truncation and padding.

One of an adapter's three concerns (:class:`llmc.models.base.ModelAdapter`); the same code serves
calibration and evaluation.
"""
from __future__ import annotations

from typing import Any, ClassVar, Sequence

import torch
from PIL import Image

from llmc.calib.sample import Sample


class InputProcessing:
    """``Sample`` objects -> batches, with ``self.processor`` (set by the adapter) and its chat template."""

    processor: Any
    is_vlm: ClassVar[bool] = True
    template_has_bos: ClassVar[bool] = False  # the chat template writes BOS itself

    @property
    def tokenizer(self) -> Any:
        return getattr(self.processor, "tokenizer", self.processor)

    def image_token_id(self) -> int | None:
        cfg = self.model.config
        for key in ("image_token_id", "image_token_index"):
            if getattr(cfg, key, None) is not None:
                return int(getattr(cfg, key))
        return None

    def image_token_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        tid = self.image_token_id()
        return torch.zeros_like(input_ids, dtype=torch.bool) if tid is None else input_ids == tid

    def conversation(self, sample: Sample, with_answer: bool) -> list[dict[str, Any]]:
        """Chat messages of one sample, in the processor's content-list format."""
        content: list[dict[str, Any]] = [{"type": "image"} for _ in sample.images]
        content.append({"type": "text", "text": sample.question})
        if not self.is_vlm:
            content = sample.question  # type: ignore[assignment]
        msgs = [{"role": "user", "content": content}]
        if with_answer and sample.answer is not None:
            answer = sample.answer if not self.is_vlm else [{"type": "text", "text": sample.answer}]
            msgs.append({"role": "assistant", "content": answer})
        return msgs

    def prompt_text(self, sample: Sample, with_answer: bool, chat_template: bool = True) -> str:
        if not chat_template:
            text = sample.question if not (with_answer and sample.answer) else f"{sample.question} {sample.answer}"
            if sample.images and self.is_vlm:
                raise ValueError("apply_chat_template: false is only supported for text-only samples")
            return text
        gen = not (with_answer and sample.answer is not None)
        return self.processor.apply_chat_template(
            self.conversation(sample, with_answer), tokenize=False, add_generation_prompt=gen)

    def encode(self, sample: Sample, with_answer: bool, chat_template: bool = True) -> dict[str, torch.Tensor]:
        """One sample -> processor outputs with a batch dimension of 1."""
        text = self.prompt_text(sample, with_answer, chat_template)
        if not self.is_vlm:
            return dict(self.processor(text, return_tensors="pt", add_special_tokens=not chat_template))
        images = [Image.open(p).convert("RGB") for p in sample.images]
        kwargs: dict[str, Any] = {"images": images} if images else {}
        if chat_template and self.template_has_bos:
            kwargs["add_special_tokens"] = False  # no second BOS
        return dict(self.processor(text=[text], return_tensors="pt", **kwargs))

    def batch_process(self, samples: Sequence[Sample], with_answer: bool = True, chat_template: bool = True,
                      max_length: int | None = None, padding_side: str = "right") -> dict[str, torch.Tensor]:
        """Samples -> one padded batch (input ids, attention mask, pixel values, ...).

        Each sample is encoded alone, truncated to ``max_length`` tokens without
        ever cutting image tokens (an error says when it would), then token-level
        tensors are padded on ``padding_side`` and the others concatenated.
        """
        from llmc.models.collate import collate, truncate

        encoded = []
        for i, s in enumerate(samples):
            enc = self.encode(s, with_answer, chat_template)
            if max_length is not None:
                enc = truncate(enc, max_length, self.image_token_mask(enc["input_ids"]), i)
            encoded.append(enc)
        return collate(encoded, self.pad_token_id(), padding_side)

    def pad_token_id(self) -> int:
        tok = self.tokenizer
        pid = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return 0 if pid is None else int(pid)
