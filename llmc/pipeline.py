"""The block loop: capture the first block's inputs, then process blocks one by one.

Only the block being processed (plus, while capturing, the small modules in
front of the blocks) sits on the compute device; the rest of the model stays
on CPU. Each block's quantized outputs feed the next block.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

import torch
from loguru import logger
from torch import nn
from tqdm import tqdm

from llmc.context import BlockContext, CachedCall, SpecResolver, to_device

if TYPE_CHECKING:
    from llmc.algorithms.base import Algorithm
    from llmc.models.base import ModelAdapter


class _StopForward(Exception):
    """Raised by the capture hook to end the model's forward at the first block."""


@contextmanager
def catch_block_inputs(block: nn.Module) -> Iterator[list[tuple[tuple, dict]]]:
    """Record the (args, kwargs) of ``block``'s calls and stop the forward there.

    The hook is always removed, whatever happens inside.
    """
    records: list[tuple[tuple, dict]] = []

    def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        records.append((args, kwargs))
        raise _StopForward

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield records
    finally:
        handle.remove()


def _move_except(module: nn.Module, keep: nn.Module, device: torch.device) -> None:
    """Move every parameter/buffer of ``module`` to ``device`` except those under ``keep``."""
    for child in module.children():
        if child is keep:
            continue
        if any(m is keep for m in child.modules()):
            _move_except(child, keep, device)
        else:
            child.to(device)
    for name, p in list(module._parameters.items()):
        if p is not None:
            p.data = p.data.to(device)
    for name, b in list(module._buffers.items()):
        if b is not None:
            module._buffers[name] = b.to(device)


@contextmanager
def front_on_device(model: nn.Module, blocks: nn.Module, device: torch.device) -> Iterator[None]:
    """Put everything but ``blocks`` on ``device`` for a capture pass; back to CPU afterwards."""
    if device.type == "cpu":
        yield
        return
    _move_except(model, blocks, device)
    try:
        yield
    finally:
        _move_except(model, blocks, torch.device("cpu"))


def token_weights(adapter: "ModelAdapter", batch: dict[str, torch.Tensor],
                  weights: dict[str, float] | None) -> torch.Tensor:
    """Per-token weight ``[B, T]``: 0 on padding, ``weights['image'|'text']`` elsewhere."""
    mask = batch["attention_mask"].float()
    if not weights:
        return mask
    is_img = adapter.image_token_mask(batch["input_ids"])
    w = torch.where(is_img, weights.get("image", 1.0), weights.get("text", 1.0)).float()
    return mask * w


@torch.no_grad()
def capture(adapter: "ModelAdapter", part: str, batches: list[dict[str, torch.Tensor]],
            device: torch.device, weights: dict[str, float] | None = None) -> list[CachedCall]:
    """Run the real model on ``batches`` and cache the inputs of the part's first block."""
    blocks = adapter.blocks(part)
    calls: list[CachedCall] = []
    with front_on_device(adapter.model, blocks, device), catch_block_inputs(blocks[0]) as rec:
        for batch in batches:
            before = len(rec)
            try:
                adapter.model(**to_device(batch, device), use_cache=False)
            except _StopForward:
                pass
            if len(rec) == before:
                raise RuntimeError(f"the forward pass never reached the first {part} block; "
                                   f"does every calibration sample have what the {part} part needs "
                                   f"(images for vision)?")
            for args, kwargs in rec[before:]:
                w = None
                if part == "language":
                    w = token_weights(adapter, batch, weights).to(device)
                    hidden = args[0] if args else kwargs.get("hidden_states")
                    if hidden is None or tuple(hidden.shape[:-1]) != tuple(w.shape):
                        raise RuntimeError("language block input does not line up with the input ids")
                calls.append(CachedCall(args, {**kwargs, "use_cache": False} if "use_cache" in kwargs
                                        else kwargs, w))
    return calls


def process_blocks(adapter: "ModelAdapter", part: str, calls: list[CachedCall], algorithm: "Algorithm",
                   resolver: SpecResolver, device: torch.device, act_bits: int | None = None) -> None:
    """Apply ``algorithm`` to every block of ``part`` in order, chaining quantized outputs."""
    blocks = adapter.blocks(part)
    prefix = adapter.blocks_path(part)
    for i in tqdm(range(len(blocks)), desc=f"{algorithm.name} {part} blocks"):
        block = blocks[i]
        block.to(device)
        block_calls = [CachedCall(c.args, adapter.block_call_kwargs(part, i, c.kwargs), c.weight)
                       for c in calls]
        ctx = BlockContext(part=part, index=i, prefix=f"{prefix}.{i}", block=block,
                           layout=adapter.block_layout(part, block), calls=block_calls,
                           device=device, resolver=resolver, act_bits=act_bits)
        algorithm.process_block(ctx)
        outs = ctx.run()
        calls = [c.with_hidden(o) for c, o in zip(calls, outs)]
        if device.type != "cpu":
            block.to("cpu")
        logger.debug(f"{part} block {i}: done")


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; anything else must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"run.device: {name!r} asked for, but CUDA is not available; valid: 'auto', 'cpu'")
    return dev
