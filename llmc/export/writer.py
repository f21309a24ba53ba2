"""Output folders written scope by scope: the tensors of a block can go to disk as soon as it is final.

:class:`FolderWriter` is what ``save_pretrained(state_dict=...)`` does, split in two: ``add`` takes
the state dict of one scope of the model (a block, or the rest of the model) under in-memory names,
drops tied duplicates, renames to checkpoint names (transformers' own ``revert_weight_conversion``)
and appends the tensors to safetensors shards; ``close`` writes the last shard, the index, the
config (with its dtype and ``quantization_config``), the generation config, remote code files and
the processor. Writing the whole model as one scope gives the files ``save_pretrained`` writes.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file
from torch import nn

if TYPE_CHECKING:
    from llmc.models.base import ModelAdapter

StateDict = dict[str, torch.Tensor]
SHARD_BYTES = 5 * 1024**3
WEIGHTS, INDEX = "model.safetensors", "model.safetensors.index.json"


def leaf_state(root: nn.Module, prefix: str, layer_fn: Callable[[str, nn.Module], StateDict | None],
               skip: tuple[str, ...] = ()) -> StateDict:
    """The state dict of ``root`` (named under ``prefix``) in module order, without the modules under
    ``skip``; ``layer_fn(name, module)`` returns a module's own tensors (local names) to use instead of
    its parameters, or None."""
    out: StateDict = {}
    for name, module in root.named_modules(prefix=prefix):
        if any(name == s or name.startswith(f"{s}.") for s in skip):
            continue
        own = layer_fn(name, module)
        if own is None:
            own = {k: p for k, p in module._parameters.items() if p is not None}
            own.update({k: b for k, b in module._buffers.items()
                        if b is not None and k not in module._non_persistent_buffers_set})
        dot = f"{name}." if name else ""
        out.update({f"{dot}{k}": v.detach() for k, v in own.items()})
    return out


class FolderWriter:
    """One Hugging Face folder under construction (``folder``), filled scope by scope."""

    def __init__(self, adapter: "ModelAdapter", folder: Path, checkpoint_names: bool = True,
                 shard_bytes: int = SHARD_BYTES) -> None:
        self.adapter, self.folder = adapter, Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.checkpoint_names, self.shard_bytes = checkpoint_names, shard_bytes
        self.pending: StateDict = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []

    def add(self, state: StateDict) -> None:
        """Append one scope's tensors (in-memory names), shards written as they fill up."""
        from transformers.core_model_loading import revert_weight_conversion
        from transformers.modeling_utils import remove_tied_weights_from_state_dict

        model = self.adapter.model
        state = remove_tied_weights_from_state_dict(dict(state), model)
        if self.checkpoint_names:
            state = revert_weight_conversion(model, state)
        for name, t in state.items():
            self.pending[name] = t.contiguous()
            self.pending_bytes += t.numel() * t.element_size()
            if self.pending_bytes >= self.shard_bytes:
                self.flush()

    def flush(self) -> None:
        """Write what is pending as a shard now (a streamed job does after each block: memory stays flat)."""
        if not self.pending:
            return
        save_file(self.pending, self.folder / f".shard-{len(self.shards):05d}", metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def _finish_shards(self) -> None:
        self.flush()
        n = len(self.shards)
        if n == 1:
            (self.folder / ".shard-00000").rename(self.folder / WEIGHTS)
            return
        weight_map, total = {}, 0
        for i, names in enumerate(self.shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.folder / f".shard-{i:05d}").rename(self.folder / final)
            weight_map.update(dict.fromkeys(names, final))
            total += (self.folder / final).stat().st_size
        (self.folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                    indent=2, sort_keys=True) + "\n")

    def close(self, dtype: torch.dtype | None = None,
              quantization_config: dict[str, Any] | Callable[[Path], None] | None = None) -> Path:
        """The last shard, the index, config (+ ``quantization_config``), generation config, code, processor."""
        from transformers.dynamic_module_utils import custom_object_save

        self._finish_shards()
        model = self.adapter.model
        model.config.dtype = str(model.dtype).removeprefix("torch.")
        model.config.architectures = [type(model).__name__]
        if model.is_remote_code():
            custom_object_save(model, self.folder, config=model.config)
        model.config.save_pretrained(self.folder)
        if model.can_generate():
            model.generation_config.save_pretrained(self.folder)
        cfg_path = self.folder / "config.json"
        cfg = json.loads(cfg_path.read_text())
        if dtype is not None:
            set_dtype(cfg, dtype)
        if isinstance(quantization_config, dict):
            cfg["quantization_config"] = quantization_config
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        if callable(quantization_config):
            quantization_config(self.folder)
        self.adapter.processor.save_pretrained(self.folder)
        return self.folder


def set_dtype(cfg: dict[str, Any], dtype: torch.dtype) -> None:
    """Record ``dtype`` as the folder's dtype in ``config.json`` and its sub-configs."""
    name = str(dtype).removeprefix("torch.")
    for c in [cfg, *[v for v in cfg.values() if isinstance(v, dict) and "model_type" in v]]:
        if "dtype" in c or "torch_dtype" in c or c is cfg:
            c["dtype"] = name
            c.pop("torch_dtype", None)
