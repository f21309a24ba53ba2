"""Model adapters: one per family, selected by ``model.type``."""
from __future__ import annotations

from llmc.models import (  # noqa: F401  (registration)
    auto,
    causal_lm,
    gemma3,
    idefics3,
    internvl,
    llava,
    llava_next,
    mistral3,
    mllama,
    paligemma,
    qwen3_vl,
    qwen_vl,
    vila,
)
from llmc.models.base import ModelAdapter
from llmc.models.layout import (
    BlockLayout,
    LayerGroup,
    ModelParts,
    Producer,
    RotationTargets,
)
from llmc.models.registry import adapter_class, register_adapter, valid_types

__all__ = ["BlockLayout", "LayerGroup", "ModelAdapter", "ModelParts", "Producer", "RotationTargets",
           "adapter_class", "load_adapter", "register_adapter", "valid_types"]


def load_adapter(model_type: str, path: str, dtype: str = "auto", attn_implementation: str = "sdpa",
                 trust_remote_code: bool = False, stream: bool = False) -> ModelAdapter:
    """Instantiate the adapter of ``model_type`` on the checkpoint at ``path`` (``stream``: see ``ModelAdapter``)."""
    from llmc.builtin import local_path

    return adapter_class(model_type)(local_path(path), dtype=dtype, attn_implementation=attn_implementation,
                                     trust_remote_code=trust_remote_code, stream=stream)
