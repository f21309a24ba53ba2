"""The model adapter: the one place where knowledge of a model family lives.

An adapter is data plus three concerns, each in its own module:

* :class:`llmc.models.structure.ModelStructure`: the model's parts (``ModelParts``), each block as
  ``BlockLayout`` data, the rotation targets, the block kinds;
* :class:`llmc.models.hooks.BlockLoopHooks`: how the block loop calls the blocks;
* :class:`llmc.models.inputs.InputProcessing`: ``Sample`` objects -> model inputs with the model's
  own processor and chat template.

This module adds loading (model and processor). Class attributes are the family's declared facts
and are never rewritten on an instance; what is found in the loaded model is instance state
(``model_parts``). Algorithms only ever talk to this surface.
"""
from __future__ import annotations

from abc import ABC
from pathlib import Path
from typing import Any, ClassVar

import torch
from loguru import logger
from torch import nn

from llmc.models.hooks import BlockLoopHooks
from llmc.models.inputs import InputProcessing
from llmc.models.stream import (
    CheckpointStream,
    code_refusal,
    meta_model,
    stream_refusal,
)
from llmc.models.structure import ModelStructure

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelAdapter(ModelStructure, BlockLoopHooks, InputProcessing, ABC):
    """Base class of every adapter. Subclasses set the class attributes and, where needed, layouts."""

    model_type: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()
    # config.json ``model_type`` values this adapter handles (default: its own model_type)
    hf_model_types: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "model_type" in cls.__dict__ and "hf_model_types" not in cls.__dict__:
            cls.hf_model_types = (cls.model_type,)

    def __init__(self, path: str | Path, dtype: str = "auto", attn_implementation: str = "sdpa",
                 trust_remote_code: bool = False, model: nn.Module | None = None, processor: Any = None,
                 stream: bool = False) -> None:
        """Load the checkpoint at ``path`` (or wrap ``model`` / ``processor`` already loaded from it).

        ``stream``: build the model on the meta device and load everything but the language blocks;
        each block is loaded by ``self.stream`` when needed (:mod:`llmc.models.stream`). A checkpoint
        that cannot stream is loaded whole, with the reason in the log (``self.stream`` is None).
        """
        self.path = Path(path)
        self.dtype, self.attn_implementation, self.trust_remote_code = dtype, attn_implementation, trust_remote_code
        self.stream: CheckpointStream | None = None
        if model is None:
            model = self._load_streamed(dtype, attn_implementation) if stream else None
            model = model if model is not None else self.load_model(dtype, attn_implementation)
        self.model = model.eval()
        self.processor = processor if processor is not None else self.load_processor()
        self._model_parts = self.find_parts()
        if self.stream is not None:
            self.stream.load("", exclude=(self._model_parts.language_blocks,))

    def _load_streamed(self, dtype: str, attn_implementation: str) -> nn.Module | None:
        """The meta model and its stream, or None (logged) when the checkpoint cannot stream."""
        torch_dtype = "auto" if dtype == "auto" else _DTYPES[dtype]
        why = code_refusal(self.path, self.trust_remote_code)
        meta = None if why else meta_model(self.auto_model_class(), self.path, torch_dtype, attn_implementation)
        why = why or stream_refusal(meta, self.path, self.trust_remote_code)
        if why is not None:
            logger.info(f"stream: loading {self.path} whole (eager path): {why}")
            return None
        self.stream = CheckpointStream(meta, self.path)
        logger.info(f"stream: {self.path} is streamed: the language blocks are read one at a time")
        return meta

    def with_model(self, model: nn.Module) -> "ModelAdapter":
        """The same adapter (processor, layout knowledge) around another model of the family."""
        return type(self)(self.path, self.dtype, self.attn_implementation, self.trust_remote_code, model=model,
                          processor=self.processor)

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
