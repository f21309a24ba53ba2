"""Give a model the weight-outlier columns of real LLMs without changing what it computes.

Real LLMs have a few input channels whose weight columns are an order of magnitude
larger than the rest (paired with small activations); under per-group round-to-nearest
such a column stretches its group's range, so the other weights of the group lose
their resolution. That is why W2 RTN destroys an LLM while W4 barely hurts it, and
why activation-aware scaling (AWQ) and error compensation (GPTQ) matter.

A 1.3M-parameter model trained for twenty minutes has none of this: its weights are
near-Gaussian (kurtosis ~3.3, max/std ~5) and it tolerates Gaussian weight noise of
60 % of the weight std, so even W2 RTN barely moves its benchmark score (see
``docs/tiny_vlm.md``). :func:`plant_outlier_columns` adds the structure back with
the exact re-parametrisation AWQ itself uses (:func:`llmc.quant.scaling.fold_scales`):
in every layer group that has a producer, ``channels`` random input channels get
``x -> x / scale`` at the producer and ``W[:, c] -> W[:, c] * scale`` in the consumers.
With a power-of-two ``scale`` the rescaled bf16/fp32 weights are exact, so the float
model computes the same function (up to summation-order rounding).
"""
from __future__ import annotations

import torch

from llmc.models.base import ModelAdapter
from llmc.quant.scaling import fold_scales, producer_rows


@torch.no_grad()
def plant_outlier_columns(adapter: ModelAdapter, scale: float = 16.0, channels: int = 4, seed: int = 0,
                          parts: list[str] | None = None) -> dict[str, list[int]]:
    """Scale ``channels`` random input columns of every producer-backed layer group by ``scale``.

    Returns ``{"<part>.<block>.<group>": [channel, ...]}`` (channels relative to the
    group's input). ``parts`` defaults to every part the adapter has.
    """
    if scale <= 0:
        raise ValueError(f"outlier scale must be > 0, got {scale}")
    if channels < 0:
        raise ValueError(f"outlier channels must be >= 0, got {channels}")
    gen = torch.Generator().manual_seed(seed)
    planted: dict[str, list[int]] = {}
    for part in parts or adapter.available_parts():
        for i, block in enumerate(adapter.blocks(part)):
            for group in adapter.block_layout(part, block).groups:
                if group.producer is None:
                    continue
                start, stop = producer_rows(block, group)
                n = stop - start
                if channels > n:
                    raise ValueError(f"{part}.{i}.{group.name}: {channels} outlier channels asked, "
                                     f"the group has {n} input channels")
                chosen = torch.randperm(n, generator=gen)[:channels]
                scales = torch.ones(n)
                scales[chosen] = scale
                fold_scales(block, group, scales)
                planted[f"{part}.{i}.{group.name}"] = sorted(chosen.tolist())
    return planted
