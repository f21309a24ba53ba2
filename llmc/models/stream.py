"""Streamed checkpoints: the model built on the meta device, tensors read from the safetensors shards only
when a step needs them, so memory does not grow with the number of language blocks.

:class:`CheckpointStream` maps every parameter and persistent buffer of the meta model to its tensor in
the checkpoint (transformers' own renaming rules, as ``from_pretrained`` applies them), materializes a
scope (``load``), and gives a scope's memory back (``release``: back to the meta device). The job
loads everything but the language blocks up front and each language block just before it is
quantized; once the block's outputs are written it is released.

A checkpoint streams when it is a safetensors checkpoint whose names map one to one (no fused or split
tensors: transformers' ``WeightConverter`` rules), and the model needs no remote code;
:func:`stream_refusal` says why not otherwise, and the job then loads it whole (the eager path).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from loguru import logger
from safetensors import safe_open
from torch import nn

from llmc.models.checkpoint import check_weights


def _conversions(model: nn.Module) -> tuple[list, list]:
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming

    conv = get_model_conversion_mapping(model)
    return [c for c in conv if isinstance(c, WeightRenaming)], [c for c in conv if isinstance(c, WeightConverter)]


def code_refusal(path: Path, trust_remote_code: bool) -> str | None:
    """Why a checkpoint whose model code is not part of transformers is not streamed (None: it is)."""
    import json

    config = json.loads((Path(path) / "config.json").read_text())
    if trust_remote_code or config.get("auto_map"):
        return "the model's code comes with the checkpoint (remote code)"
    return None


def stream_refusal(model: nn.Module, path: Path, trust_remote_code: bool) -> str | None:
    """Why this checkpoint cannot be streamed (None: it can)."""
    if trust_remote_code or getattr(model, "is_remote_code", lambda: False)():
        return "the model's code comes with the checkpoint (remote code)"
    if not check_weights(path):
        return "the checkpoint has no safetensors files"
    _, converters = _conversions(model)
    if converters:
        return f"its checkpoint tensors are converted on load ({type(converters[0]).__name__}), not renamed one to one"
    return None


def meta_model(auto_class: Any, path: Path, dtype: torch.dtype | str, attn_implementation: str) -> nn.Module:
    """The model of the checkpoint's config with every parameter on the meta device (no weight is read)."""
    import transformers
    from accelerate import init_empty_weights

    config = transformers.AutoConfig.from_pretrained(path)
    if dtype == "auto":
        dtype = getattr(config, "dtype", None) or torch.float32
    with init_empty_weights():
        model = auto_class.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    return model.eval()


class CheckpointStream:
    """Where each tensor of ``model`` lives in the checkpoint at ``path``; loads and releases scopes."""

    def __init__(self, model: nn.Module, path: str | Path) -> None:
        from transformers.core_model_loading import rename_source_key

        self.model, self.path = model, Path(path)
        renamings, converters = _conversions(model)
        wanted = {n: t for n, t in model.state_dict(keep_vars=True).items() if t.is_meta}
        self.location: dict[str, tuple[Path, str]] = {}
        for file in check_weights(self.path):
            with safe_open(file, "pt") as f:
                for key in f.keys():
                    name = rename_source_key(key, renamings, converters, model.base_model_prefix, wanted)[0]
                    if name in wanted:
                        self.location[name] = (file, key)
        tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
        missing = sorted(set(wanted) - set(self.location) - tied)
        if missing:
            raise ValueError(f"{self.path}: the checkpoint has no tensor for {len(missing)} parameter(s) of the "
                             f"model, e.g. {missing[:3]}")
        self.dtypes = {n: t.dtype for n, t in wanted.items()}

    def _names(self, prefix: str, exclude: tuple[str, ...]) -> list[str]:
        dot = f"{prefix}." if prefix else ""
        return [n for n in self.location
                if n.startswith(dot) and not any(n == e or n.startswith(f"{e}.") for e in exclude)]

    @torch.no_grad()
    def load(self, prefix: str = "", exclude: tuple[str, ...] = ()) -> int:
        """Materialize on CPU every tensor under ``prefix`` except those under ``exclude``; returns the bytes read."""
        from accelerate.utils import set_module_tensor_to_device

        by_file: dict[Path, list[str]] = {}
        for name in self._names(prefix, exclude):
            by_file.setdefault(self.location[name][0], []).append(name)
        total = 0
        for file, names in by_file.items():
            with safe_open(file, "pt") as f:
                for name in names:
                    t = f.get_tensor(self.location[name][1]).to(self.dtypes[name])
                    set_module_tensor_to_device(self.model, name, "cpu", value=t)
                    total += t.numel() * t.element_size()
        if not prefix:
            self.model.tie_weights()
        logger.debug(f"stream: loaded {prefix or 'the model'} ({total / 2**20:.1f} MiB)")
        return total

    @staticmethod
    def release(module: nn.Module) -> None:
        """Give a scope's memory back: its tensors (and fake-quant caches) move to the meta device, and the
        C allocator returns the freed pages to the system (glibc keeps them otherwise, and a block's
        worth of them per block adds up: measured in docs/scale.md)."""
        for m in module.modules():
            if getattr(m, "_fq_cache", None) is not None:
                object.__setattr__(m, "_fq_cache", None)
        module.to("meta")
        trim_memory()


def trim_memory() -> None:
    """``malloc_trim(0)`` where the C library has it (glibc); nothing elsewhere."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass
