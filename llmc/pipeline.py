"""The block loop: capture the first block's inputs, then process blocks one by one.

Only the block being processed (plus, while capturing, the small modules in
front of the blocks) sits on the compute device; the rest of the model stays
on CPU. Each block's quantized outputs feed the next block.
"""
from __future__ import annotations

import contextlib
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Callable, Iterator

import torch
import torch.nn.functional as F
from loguru import logger
from torch import nn
from tqdm import tqdm

from llmc import distributed as dist
from llmc.context import BlockContext, CachedCall, hidden_input, to_device
from llmc.offload import ActivationStore
from llmc.plan import Part, QuantPlan
from llmc.quant.fake_linear import fake_quant_off

if TYPE_CHECKING:
    from llmc.algorithms.base import Algorithm
    from llmc.models.base import ModelAdapter


class _StopForward(Exception):
    """Raised by the capture hook to end the model's forward at the first block."""


class _Recorder(nn.Module):
    """Stands in for a block during capture: records its call, passes the hidden state through.

    Attribute lookups fall through to the real block (model code reads e.g.
    ``blocks[0].mlp.fc2.weight.dtype`` or ``layer.attention_type``).
    """

    def __init__(self, block: nn.Module, record: bool, stop: bool, sink: list) -> None:
        super().__init__()
        self.inner, self.record, self.stop, self.sink = block, record, stop, sink

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("inner"), name)

    def forward(self, *args, **kwargs):
        if self.record:
            self.sink.append((args, kwargs))
        if self.stop:
            raise _StopForward
        return hidden_input(args, kwargs)


@contextmanager
def catch_block_inputs(blocks: nn.ModuleList, indices: tuple[int, ...] = (0,)) -> Iterator[list[list]]:
    """Record the calls of ``blocks[i]`` for ``i`` in ``indices`` and stop the forward at the last.

    Blocks before the last index are replaced by pass-through recorders, so only
    the call kwargs (masks, rotary tables) of later blocks are meaningful; their
    hidden states come from chaining real block outputs. Blocks are always restored.
    """
    last = max(indices)
    sinks: list[list] = [[] for _ in indices]
    originals = [blocks[i] for i in range(last + 1)]
    try:
        for i in range(last + 1):
            sink = sinks[indices.index(i)] if i in indices else []
            blocks[i] = _Recorder(originals[i], i in indices, i == last, sink)
        yield sinks
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block


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


def _is_patch_conv(m: nn.Module) -> bool:
    """A convolution over non-overlapping patches: stride == kernel, no padding or dilation, one group,
    its ``forward`` not already wrapped (accelerate's hooks set an instance ``forward``)."""
    return (isinstance(m, (nn.Conv2d, nn.Conv3d)) and tuple(m.stride) == tuple(m.kernel_size)
            and not isinstance(m.padding, str) and not any(m.padding) and all(d == 1 for d in m.dilation)
            and m.groups == 1 and "forward" not in m.__dict__)


@contextmanager
def patch_convs_as_matmul(model: nn.Module) -> Iterator[None]:
    """Run patch convolutions whose input is exactly one kernel (Qwen2-VL-style patch embeddings
    cut the image into ``[N, C, T, P, P]`` patches first) as one matmul: the same products, summed in
    another order.

    torch's CPU ``Conv3d`` on such input is about 30-100x slower than the equivalent GEMM (bf16, 1024
    patches of 2x14x14: 44-200 ms against 1.5 ms), which was 7 % of a GPTQ job's CPU time. Any
    other input goes to the module's own forward. Restored on exit."""
    patched = [m for m in model.modules() if _is_patch_conv(m)]

    def as_matmul(m: nn.Module, own: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
        def forward(x: torch.Tensor) -> torch.Tensor:
            if x.dim() != m.weight.dim() or tuple(x.shape[2:]) != tuple(m.kernel_size):
                return own(x)
            out = F.linear(x.reshape(x.shape[0], -1), m.weight.reshape(m.out_channels, -1), m.bias)
            return out.view(x.shape[0], m.out_channels, *(1 for _ in m.kernel_size))
        return forward

    for m in patched:
        m.forward = as_matmul(m, m.forward)
    try:
        yield
    finally:
        for m in patched:
            del m.forward


def token_weights(adapter: "ModelAdapter", batch: dict[str, torch.Tensor],
                  weights: dict[str, float] | None) -> torch.Tensor:
    """Per-token weight ``[B, T]``: 0 on padding, ``weights['image'|'text']`` elsewhere."""
    mask = batch["attention_mask"].float()
    if not weights:
        return mask
    is_img = adapter.image_token_mask(batch["input_ids"])
    w = torch.where(is_img, weights.get("image", 1.0), weights.get("text", 1.0)).float()
    return mask * w


def _language_weight(adapter: "ModelAdapter", batch: dict, args: tuple, kwargs: dict,
                     weights: dict[str, float] | None, device: torch.device) -> torch.Tensor:
    w = token_weights(adapter, batch, weights).to(device)
    hidden = hidden_input(args, kwargs)
    if tuple(hidden.shape[:-1]) != tuple(w.shape):
        raise RuntimeError(f"language block input {tuple(hidden.shape)} does not line up with the input ids "
                           f"{tuple(w.shape)}")
    return w


@torch.no_grad()
def capture(adapter: "ModelAdapter", part: str, batches: list[dict[str, torch.Tensor]],
            device: torch.device, weights: dict[str, float] | None = None) -> list[CachedCall]:
    """Run the real model on ``batches`` and cache the inputs of the part's first block.

    The call kwargs of every block kind (``adapter.kwargs_source``) are cached too.
    """
    blocks = adapter.blocks(part)
    indices = tuple(sorted({adapter.kwargs_source(part, i) for i in range(len(blocks))}))
    calls: list[CachedCall] = []
    with front_on_device(adapter.model, blocks, device), catch_block_inputs(blocks, indices) as sinks, \
            catch_extras(adapter, part) as extras, patch_convs_as_matmul(adapter.model):
        for batch in batches:
            before = [len(s) for s in sinks]
            try:
                adapter.model(**to_device(batch, device), use_cache=False)
            except _StopForward:
                pass
            if any(len(s) != b + 1 for s, b in zip(sinks, before)):
                raise RuntimeError(f"the forward pass did not reach the {part} blocks {list(indices)} once each; "
                                   f"does every calibration sample have what the {part} part needs "
                                   f"(images for vision)?")
            args, kwargs = sinks[0][-1]
            w = _language_weight(adapter, batch, args, kwargs, weights, device) if part == "language" else None
            by_block = {i: _no_cache(s[-1][1]) for i, s in zip(indices, sinks)}
            calls.append(CachedCall(args, by_block[0], w, by_block, extras.pop() if extras else None))
    return calls


@contextmanager
def catch_extras(adapter: "ModelAdapter", part: str) -> Iterator[list[dict]]:
    """Record ``adapter.capture_extras`` of each call of the adapter's ``extras_module`` (language only)."""
    found: list[dict] = []
    if part != "language" or adapter.extras_module is None:
        yield found
        return
    handle = adapter.module(adapter.extras_module).register_forward_pre_hook(
        lambda mod, args, kwargs: found.append(adapter.capture_extras(kwargs)), with_kwargs=True)
    try:
        yield found
    finally:
        handle.remove()


def _no_cache(kwargs: dict) -> dict:
    return {**kwargs, "use_cache": False} if "use_cache" in kwargs else kwargs


AfterBlock = Callable[[str, int, str, nn.Module], None]


def process_blocks(adapter: "ModelAdapter", part: str, calls: list[CachedCall], algorithm: "Algorithm",
                   plan: QuantPlan, device: torch.device, after_block: AfterBlock | None = None,
                   store: ActivationStore | None = None) -> list[torch.Tensor]:
    """Apply ``algorithm`` to every block of ``part`` in order, chaining quantized outputs.

    ``after_block(part, index, name, block)`` runs once a block is final (streamed jobs write its
    outputs then). A streamed adapter's language blocks are read just before and released just after.
    ``store`` keeps the hidden states between blocks (:mod:`llmc.offload`; None: on the device).
    Returns the last block's outputs, one per cached call.
    """
    blocks = adapter.blocks(part)
    prefix = adapter.blocks_path(part)
    stream = adapter.stream if part == "language" else None
    for i in tqdm(range(len(blocks)), desc=f"{algorithm.name} {part} blocks", disable=not dist.is_main()):
        t0 = time.time()
        dist.fault_point(f"{part} block {i}")  # test hook (LLMC_TEST_FAIL)
        block = blocks[i]
        if stream is not None:
            stream.load(f"{prefix}.{i}")
        block.to(device)
        src = adapter.kwargs_source(part, i)
        block_calls = [c.for_block(adapter.block_call_kwargs(part, i, c.kwargs_for(src))) for c in calls]
        ctx = BlockContext(part=Part.parse(part), index=i, prefix=f"{prefix}.{i}", block=block,
                           layout=adapter.block_layout(part, block), calls=block_calls, device=device, plan=plan,
                           store=store)
        algorithm.process_block(ctx)
        with fake_quant_off(block) if algorithm.propagates_float() else contextlib.nullcontext():
            outs = ctx.run()
        calls = [_keep(c, adapter.between_blocks(part, i, o, c.extras), store) for c, o in zip(calls, outs)]
        if dist.active():  # every rank continues with the same block, bit for bit
            dist.check_same(sum(dist.checksum(t) for t in block.state_dict().values()),
                            f"block {prefix}.{i} after {algorithm.name}")
        if device.type != "cpu":
            block.to("cpu")
        if after_block is not None:
            after_block(part, i, f"{prefix}.{i}", block)
        if stream is not None:
            stream.release(block)
        # the console shows the progress bar; the job's log gets one line per block
        logger.bind(file_only=True).info(f"{algorithm.name} {part} block {i + 1}/{len(blocks)}: {time.time() - t0:.1f}s")
    return [hidden_input(c.args, c.kwargs) if store is None else store.get(hidden_input(c.args, c.kwargs))
            for c in calls]


def _keep(call: CachedCall, hidden: torch.Tensor, store: ActivationStore | None) -> CachedCall:
    """``call`` with its next hidden state, put into ``store`` (the previous one dropped)."""
    if store is None:
        return call.with_hidden(hidden)
    store.drop(hidden_input(call.args, call.kwargs))
    return call.with_hidden(store.put(hidden))


def offload_calls(calls: list[CachedCall], store: ActivationStore) -> list[CachedCall]:
    """Captured calls with their hidden states put into ``store``."""
    return [c.with_hidden(store.put(hidden_input(c.args, c.kwargs))) for c in calls]


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; anything else must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"run.device: {name!r} asked for, but CUDA is not available; valid: 'auto', 'cpu'")
    return dev


def check_dtype(device: torch.device, dtype: str, bf16_supported: bool | None = None) -> None:
    """Refuse, before any work, a model dtype the device cannot compute in (bfloat16 on a GPU without it)."""
    if device.type != "cuda" or dtype != "bfloat16":
        return
    if bf16_supported is None:
        bf16_supported = torch.cuda.is_bf16_supported()
    if not bf16_supported:
        gpu = torch.cuda.get_device_name(device) if torch.cuda.is_available() else str(device)
        raise ValueError(f"model.dtype: 'bfloat16' cannot run on {gpu}; valid here: 'float16', 'float32' "
                         f"(or run.device: cpu)")
