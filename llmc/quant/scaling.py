"""Exact re-parametrisation by per-channel scales: ``x -> x / s`` at the producer, ``W -> W * s`` in consumers.

Shared by AWQ and SmoothQuant. Scaling alone never changes what the float block
computes; only quantization afterwards sees different weights.
"""
from __future__ import annotations

import torch
from torch import nn

from llmc.models.layout import LayerGroup


def producer_rows(block: nn.Module, group: LayerGroup) -> tuple[int, int]:
    """The producer's output rows that feed ``group`` (all rows unless the producer is fused)."""
    prod = group.producer
    if prod is None:
        raise ValueError(f"layer group {group.name!r} has no producer to fold scales into")
    if prod.rows is not None:
        return prod.rows
    m = block.get_submodule(prod.name)
    return 0, m.weight.shape[0]


@torch.no_grad()
def fold_scales(block: nn.Module, group: LayerGroup, scales: torch.Tensor) -> None:
    """Divide the producer's outputs by ``scales`` ``[in]`` and multiply the consumers' input columns."""
    start, stop = producer_rows(block, group)
    s = scales.detach().float().flatten()
    if stop - start != s.numel():
        raise ValueError(f"group {group.name!r}: producer {group.producer.name} gives {stop - start} channels, "
                         f"scales have {s.numel()}")
    prod = block.get_submodule(group.producer.name)
    w = prod.weight
    s_dev = s.to(w.device)
    if group.producer.kind == "norm":
        off = group.producer.weight_offset
        w.copy_(((w.float() + off) / s_dev - off).to(w.dtype))
    else:
        w[start:stop].copy_((w[start:stop].float() / s_dev[:, None]).to(w.dtype))
    bias = getattr(prod, "bias", None)
    if bias is not None:
        bias[start:stop].copy_((bias[start:stop].float() / s_dev).to(bias.dtype))
    for name in group.linears:
        lin = block.get_submodule(name)
        lin.weight.copy_((lin.weight.float() * s.to(lin.weight.device)[None, :]).to(lin.weight.dtype))
