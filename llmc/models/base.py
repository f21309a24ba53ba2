"""The model adapter: the one place where knowledge of a model family lives.

An adapter names the parts of a model (``ModelParts``), describes each block as
``BlockLayout`` data, lists the rotation targets and turns ``Sample`` objects
into model inputs with the model's own processor and chat template. Algorithms
only ever talk to this surface.
"""
from __future__ import annotations

from abc import ABC
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch
from PIL import Image
from torch import nn

from llmc.calib.sample import Sample
from llmc.models.common import decoder_layout
from llmc.models.layout import BlockLayout, ModelParts, RotationTargets

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelAdapter(ABC):
    """Base class of every adapter. Subclasses set the class attributes and layouts."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "model_type" in cls.__dict__ and "hf_model_types" not in cls.__dict__:
            cls.hf_model_types = (cls.model_type,)

    model_type: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()
    # config.json ``model_type`` values this adapter handles (default: its own model_type)
    hf_model_types: ClassVar[tuple[str, ...]] = ()
    parts: ClassVar[ModelParts]
    is_vlm: ClassVar[bool] = True
    default_skip: ClassVar[tuple[str, ...]] = ("lm_head",)
    # Writers into the language residual stream from outside its blocks (rotation targets):
    # linears (the projector's last one) and raw weights ((path, "in_out" | "row")).
    projector_writers: ClassVar[tuple[str, ...]] = ()
    projector_weights: ClassVar[tuple[tuple[str, str], ...]] = ()
    norm_offset: ClassVar[float] = 0.0  # 1.0 for norms scaling by (1 + weight) (Gemma)
    template_has_bos: ClassVar[bool] = False  # the chat template writes BOS itself
    vision_blocks_candidates: ClassVar[tuple[str, ...]] = ()  # first existing path wins

    def __init__(self, path: str | Path, dtype: str = "auto", attn_implementation: str = "sdpa",
                 trust_remote_code: bool = False) -> None:
        self.path = Path(path)
        self.trust_remote_code = trust_remote_code
        self.model = self.load_model(dtype, attn_implementation)
        self.model.eval()
        self.processor = self.load_processor()
        for candidate in self.vision_blocks_candidates:
            try:
                self.model.get_submodule(candidate)
            except AttributeError:
                continue
            self.parts = replace(self.parts, vision_blocks=candidate)
            break

    def with_model(self, model: nn.Module) -> "ModelAdapter":
        """The same adapter (processor, layout knowledge) around another model of the family."""
        other = object.__new__(type(self))
        other.__dict__.update(self.__dict__)
        other.model = model.eval()
        return other

    # ---------------------------------------------------------------- loading
    @classmethod
    def auto_model_class(cls) -> Any:
        import transformers

        return transformers.AutoModelForImageTextToText if cls.is_vlm else transformers.AutoModelForCausalLM

    def load_model(self, dtype: str, attn_implementation: str) -> nn.Module:
        """Load on CPU with accelerate's low-memory path; only blocks move to the device later."""
        torch_dtype = "auto" if dtype == "auto" else _DTYPES[dtype]
        return self.auto_model_class().from_pretrained(
            self.path, dtype=torch_dtype, low_cpu_mem_usage=True, device_map="cpu",
            attn_implementation=attn_implementation, trust_remote_code=self.trust_remote_code,
        )

    def load_processor(self) -> Any:
        import transformers

        loader = transformers.AutoProcessor if self.is_vlm else transformers.AutoTokenizer
        return loader.from_pretrained(self.path, trust_remote_code=self.trust_remote_code)

    @property
    def tokenizer(self) -> Any:
        return getattr(self.processor, "tokenizer", self.processor)

    # ------------------------------------------------------------------ parts
    def module(self, name: str) -> nn.Module:
        return self.model.get_submodule(name)

    def blocks(self, part: str) -> nn.ModuleList:
        """The ``language`` or ``vision`` blocks."""
        name = self.parts.language_blocks if part == "language" else self.parts.vision_blocks
        if name is None:
            raise ValueError(f"{self.model_type} has no {part} blocks; valid parts: {self.available_parts()}")
        return self.module(name)

    def blocks_path(self, part: str) -> str:
        return self.parts.language_blocks if part == "language" else self.parts.vision_blocks

    def available_parts(self) -> list[str]:
        return ["vision", "language"] if self.parts.vision_blocks else ["language"]

    def vision_tower(self) -> nn.Module | None:
        return self.module(self.parts.vision_tower) if self.parts.vision_tower else None

    def projector(self) -> nn.Module | None:
        return self.module(self.parts.projector) if self.parts.projector else None

    def embed_tokens(self) -> nn.Embedding:
        return self.module(self.parts.embed_tokens)

    def final_norm(self) -> nn.Module:
        return self.module(self.parts.final_norm)

    def lm_head(self) -> nn.Linear:
        return self.module(self.parts.lm_head)

    def block_layout(self, part: str, block: nn.Module) -> BlockLayout:
        return self.language_layout(block) if part == "language" else self.vision_layout(block)

    def language_layout(self, block: nn.Module) -> BlockLayout:
        """Layer groups of one language block (default: a Llama-style pre-norm decoder layer)."""
        return decoder_layout(block, norm_offset=self.norm_offset)

    def vision_layout(self, block: nn.Module) -> BlockLayout:
        raise ValueError(f"{self.model_type} has no vision blocks")

    def rotation_targets(self) -> RotationTargets:
        """Writers into the language residual stream from outside its blocks."""
        return RotationTargets(embeddings=(self.parts.embed_tokens,), external_writers=self.projector_writers,
                               external_weights=self.projector_weights, final_norm=self.parts.final_norm,
                               lm_head=self.parts.lm_head, norm_weight_offset=self.norm_offset)

    def block_kind(self, part: str, index: int) -> Any:
        """Blocks of one kind are called with the same kwargs (masks, rotary tables).

        Default: the text config's ``layer_types`` (sliding vs full attention) for
        language blocks, else the block's ``attention_type`` attribute.
        """
        if part == "language":
            cfg = getattr(self.model.config, "text_config", None) or self.model.config
            types = getattr(cfg, "layer_types", None)
            if types:
                return types[index]
        return getattr(self.blocks(part)[index], "attention_type", None)

    def kwargs_source(self, part: str, index: int) -> int:
        """The block whose captured call kwargs block ``index`` runs with: its kind's first block."""
        kind = self.block_kind(part, index)
        return next(j for j in range(len(self.blocks(part))) if self.block_kind(part, j) == kind)

    def block_call_kwargs(self, part: str, index: int, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Last adjustment of block ``index``'s call kwargs (default: as captured)."""
        return kwargs

    # Models that add into the residual stream between blocks (Qwen3-VL's deepstack) name the
    # module whose call kwargs carry what is added, and say how to add it.
    extras_module: ClassVar[str | None] = None

    @staticmethod
    def capture_extras(kwargs: dict[str, Any]) -> dict[str, Any]:
        """What ``between_blocks`` needs, read from ``extras_module``'s call kwargs (default: nothing)."""
        return {}

    @staticmethod
    def between_blocks(part: str, index: int, hidden: torch.Tensor, extras: dict[str, Any] | None) -> torch.Tensor:
        """Output of block ``index`` -> input of block ``index + 1`` (default: unchanged)."""
        return hidden

    # ------------------------------------------------------------------ inputs
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
