"""One lmms-eval model class for every llmc adapter: ``--model llmc``.

:class:`LLMCLMM` evaluates any adapter's model (float, transformed, fake-quant in
memory, or a folder saved by llmc) with the adapter's own processor and chat
template: greedy, batched, left padding. Build it from an adapter in memory
(``LLMCLMM(adapter=...)``) or from a folder (``pretrained=DIR[,model_type=...]``,
the type read from ``config.json`` when not given).

Registration with lmms-eval 0.7.3 (which resolves ``--model NAME`` through its
``ModelRegistryV2``), in order of preference:

* entry point ``lmms_eval.models`` -> :func:`llmc.eval.lmms_entry.lmms_manifest` (needs llmc pip-installed
  with that entry point in ``setup.py``);
* ``LMMS_EVAL_PLUGINS=llmc.eval`` (deprecated by lmms-eval, works without installing:
  reads ``llmc.eval.models.AVAILABLE_MODELS`` and ``llmc.eval.tasks``);
* in-process :func:`register` (what ``python -m llmc.eval.lmms_cli`` does).

Under torch.distributed (a torchrun job, :mod:`llmc.distributed`) the model reports its rank and
world size; lmms-eval, run with ``distributed_executor_backend="torchrun"``, then gives each rank
every ``world``-th document and gathers the logged samples and metrics on rank 0.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from loguru import logger
from PIL import Image
from tqdm import tqdm

from llmc import distributed as dist
from llmc.eval.generation import encode_batch, generate, model_device
from llmc.eval.lmms_compat import lmms, models
from llmc.eval.lmms_entry import lmms_manifest
from llmc.models.base import ModelAdapter

DEFAULT_MAX_NEW_TOKENS = 16

__all__ = ["LLMCLMM", "detect_model_type", "encode_batch", "generate", "lmms_manifest", "model_device",
           "register"]


def detect_model_type(path: str | Path) -> str:
    """The llmc model type of a checkpoint folder, from ``config.json``'s ``model_type``."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"{path}: no config.json; pass model_type=... explicitly")
    model_type = json.loads(cfg.read_text()).get("model_type")
    if not model_type:
        raise ValueError(f"{cfg}: no 'model_type' key; pass model_type=... explicitly")
    return str(model_type)


def _cut(text: str, until: Sequence[str]) -> str:
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text


def _as_list(v: Any) -> list:
    if v is None:
        return []
    if isinstance(v, (list, tuple)):
        return list(v[0]) if len(v) == 1 and isinstance(v[0], (list, tuple)) else list(v)
    return [v]


class LLMCLMM(lmms):
    """lmms-eval model over an llmc :class:`ModelAdapter` (``generate_until`` only)."""

    is_simple = True

    def __init__(self, adapter: ModelAdapter | None = None, pretrained: str | None = None,
                 model_type: str | None = None, dtype: str = "auto", device: str | None = None,
                 batch_size: int | str = 1, max_new_tokens: int | None = None,
                 attn_implementation: str = "sdpa", trust_remote_code: bool = False,
                 max_batch_size: int | None = None) -> None:
        super().__init__()
        if (adapter is None) == (pretrained is None):
            raise ValueError("LLMCLMM: give exactly one of adapter=... (in memory) or pretrained=DIR")
        if adapter is None:
            from llmc.models import load_adapter

            model_type = model_type or detect_model_type(pretrained)
            adapter = load_adapter(model_type, str(pretrained), dtype, attn_implementation, bool(trust_remote_code))
        self.adapter = adapter
        if device in (None, "auto"):  # an adapter in memory stays where it is; a loaded folder goes to CUDA if any
            device = None if pretrained is None else ("cuda" if torch.cuda.is_available() else "cpu")
        if device is not None:
            adapter.model.to(device)
        self.batch_size_per_gpu = int(batch_size) if str(batch_size).isdigit() else 1
        self.max_new_tokens = int(max_new_tokens) if max_new_tokens else None
        self.accelerator = None  # lmms-eval then skips creating an Accelerator (torchrun: torch.distributed)
        if dist.active():  # lmms-eval shards the documents by rank and gathers on rank 0
            self._rank, self._world_size = dist.rank(), dist.world()
        self._warned_text_only = False

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return model_device(self.adapter.model)

    def loglikelihood(self, requests: list) -> list:
        raise NotImplementedError("the llmc model only supports generate_until tasks")

    def generate_until_multi_round(self, requests: list) -> list:
        raise NotImplementedError("the llmc model only supports generate_until tasks")

    def _visuals(self, arg: tuple) -> list[Image.Image]:
        _, _, doc_to_visual, doc_id, task, split = arg
        visuals = _as_list(doc_to_visual(self.task_dict[task][split][doc_id])) if doc_to_visual else []
        if visuals and not self.adapter.is_vlm:
            if not self._warned_text_only:
                logger.warning(f"{self.adapter.model_type} is text-only: images of the requests are dropped")
                self._warned_text_only = True
            return []
        return visuals

    def _batches(self, args: list[tuple]) -> list[list[int]]:
        """Request indices grouped by generation kwargs, longest context first, in chunks of ``batch_size``."""
        groups: dict[str, list[int]] = {}
        for i, a in enumerate(args):
            groups.setdefault(json.dumps(a[1], sort_keys=True, default=str), []).append(i)
        out = []
        for idx in groups.values():
            idx.sort(key=lambda i: -len(args[i][0]))
            out += [idx[s:s + self.batch_size] for s in range(0, len(idx), self.batch_size)]
        return out

    def generate_until(self, requests: list) -> list[str]:
        args = [r.args for r in requests]
        results: list[str | None] = [None] * len(args)
        bar = tqdm(total=len(args), desc="llmc generate", disable=len(args) < 2 * self.batch_size)
        for chunk in self._batches(args):
            gen_kwargs = dict(args[chunk[0]][1] or {})
            max_new = self.max_new_tokens or int(gen_kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS)
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            batch = encode_batch(self.adapter, [args[i][0] for i in chunk], [self._visuals(args[i]) for i in chunk])
            for i, text in zip(chunk, generate(self.adapter, batch, max_new)):
                results[i] = _cut(text, until).strip()
                self.cache_hook.add_partial("generate_until", args[i][:2], results[i])
            bar.update(len(chunk))
        bar.close()
        return results  # type: ignore[return-value]


def register() -> None:
    """Make ``--model llmc`` resolvable in this process (idempotent)."""
    models.MODEL_REGISTRY_V2.register_manifest(lmms_manifest(), overwrite=True)
