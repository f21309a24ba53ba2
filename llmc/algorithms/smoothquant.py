"""SmoothQuant: migrate activation outliers into the weights before W8A8 quantization.

Paper: Xiao et al. 2022, "SmoothQuant: Accurate and Efficient Post-Training
Quantization for Large Language Models" (arXiv:2211.10438).

For every layer group that has a producer (a norm or a linear that can absorb a
per-channel scale), the input channels ``j`` get

    s_j = max|X_j| ** alpha / max|W_j| ** (1 - alpha)

where ``max|X_j|`` is over the cached calibration tokens (padding rows, token
weight 0, excluded; vision blocks: every row) and ``max|W_j|`` over the output
rows of all linears of the group. ``X -> X / s`` is folded into the producer and
``W -> W * s`` into the consumers (:func:`llmc.quant.scaling.fold_scales`: exact
in float), then every linear is fake-quantized: weights by ``quant.weight`` (RTN
min/max), activations per token, dynamic, symmetric, by ``quant.act``.

Config keys:

* ``quant.act`` (required): ``{bit: 8}``; SmoothQuant is meaningless without
  activation quantization, so a missing ``quant.act`` is a ``ConfigError``.
* ``quant.special.alpha`` (float in [0, 1], default 0.5): migration strength;
  0 leaves activations alone (s = 1 / max|W|), 1 moves all difficulty to weights.
* ``quant.special.save_scales`` (true): write the record (:class:`SmoothQuantRecord`,
  ``{"<block prefix>.<group name>": scales [in]}``) as ``smoothquant_records.pt``.
* ``quant.special.load_scales`` (null): replay such a record (:meth:`SmoothQuant.apply`:
  the recorded scales are folded in layout order, then every linear is quantized; no
  calibration data is needed).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from llmc import distributed as dist
from llmc.algorithms.base import Algorithm, register_algorithm
from llmc.algorithms.records import SmoothQuantRecord
from llmc.context import BlockContext, flatten_rows
from llmc.models.layout import LayerGroup
from llmc.quant.scaling import fold_scales, producer_rows
from llmc.strict import ConfigError

if TYPE_CHECKING:
    from llmc.config import QuantConfig

SCALE_MIN, SCALE_MAX = 1e-5, 1e5


@dataclass
class SmoothQuantOptions:
    alpha: float = 0.5
    save_scales: bool = True
    load_scales: str | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"quant.special.alpha: {self.alpha} must be in [0, 1]")
        if self.load_scales is not None and not Path(self.load_scales).is_file():
            raise ConfigError(f"quant.special.load_scales: {self.load_scales} is not a file")


# ------------------------------------------------------------------------------------ pure numerics
def rows_absmax(x: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor | None:
    """Per-channel ``max |x|`` over the rows of ``x`` ``[..., C]`` with non-zero weight; None if none."""
    rows, _ = flatten_rows(x.detach(), weight)
    if rows.shape[0] == 0:
        return None
    return rows.abs().amax(dim=0).float()


def weight_absmax(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-input-channel ``max |W|`` over the output rows of every ``[out, in]`` weight."""
    return torch.stack([w.detach().float().abs().amax(dim=0).cpu() for w in weights]).amax(dim=0)


def smooth_scales(act_max: torch.Tensor, w_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s = act_max ** alpha / w_max ** (1 - alpha)``, finite and positive.

    Channels that never fire (``act_max == 0``) or have no weight keep ``s = 1``;
    the rest are clamped to ``[1e-5, 1e5]``.
    """
    a, w = act_max.float(), w_max.float()
    s = a.clamp(min=SCALE_MIN).pow(alpha) / w.clamp(min=SCALE_MIN).pow(1.0 - alpha)
    ok = (a > 0) & (w > 0) & torch.isfinite(s)
    return torch.where(ok, s, torch.ones_like(s)).clamp(SCALE_MIN, SCALE_MAX)


# ------------------------------------------------------------------------------------- block helpers
@torch.no_grad()
def collect_act_max(ctx: BlockContext, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Run the block once over its calls; per-channel input ``max |x|`` of each submodule in ``names``.

    Reduced on the fly (hooks), so no input is kept in memory. Distributed: the maximum over every
    rank's rows (an all-reduce MAX; exact, the same as one process).
    """
    stats: dict[str, torch.Tensor | None] = {n: None for n in names}

    def reduce(n: str, x: torch.Tensor, w: torch.Tensor | None) -> None:
        m = rows_absmax(x, w)
        if m is not None:
            stats[n] = m.cpu() if stats[n] is None else torch.maximum(stats[n], m.cpu())

    ctx.stream_inputs(names, reduce)
    if dist.active():  # -1: no row on this rank (|x| >= 0 elsewhere)
        for n in names:
            local = stats[n] if stats[n] is not None else torch.full((ctx.get(n).in_features,), -1.0)
            m = dist.all_reduce_max(local.clone())
            stats[n] = m if bool((m >= 0).all()) else None
    for n in names:
        if stats[n] is None:
            raise ValueError(f"{ctx.full_name(n)}: no calibration rows with non-zero weight")
    return stats  # type: ignore[return-value]


def check_distinct_producers(ctx: BlockContext, groups: Sequence[LayerGroup]) -> None:
    """Raise when two groups fold into overlapping rows of the same producer (not an exact fold)."""
    seen: dict[str, list[tuple[int, int, str]]] = {}
    for g in groups:
        start, stop = producer_rows(ctx.block, g)
        for a, b, other in seen.get(g.producer.name, []):
            if start < b and a < stop:
                raise ValueError(f"{ctx.prefix}: groups {other!r} and {g.name!r} both fold scales into "
                                 f"{g.producer.name} rows [{max(a, start)}, {min(b, stop)}); a producer "
                                 f"must feed one group only (merge their linears into one group)")
        seen.setdefault(g.producer.name, []).append((start, stop, g.name))


@register_algorithm
class SmoothQuant(Algorithm):
    name = "SmoothQuant"
    aliases = ("smooth_quant", "sq")
    Options = SmoothQuantOptions
    Record = SmoothQuantRecord
    load_option, save_option = "load_scales", "save_scales"

    def __init__(self, options: SmoothQuantOptions, quant: QuantConfig) -> None:
        if quant.act is None:
            raise ConfigError("quant.act: SmoothQuant needs activation quantization (W8A8); add "
                              "`act: {bit: 8}` under `quant` (or use RTN/AWQ/GPTQ for weight-only)")
        super().__init__(options, quant)

    def groups(self, ctx: BlockContext) -> list[LayerGroup]:
        """Groups to smooth: those with a producer and at least one linear that is quantized."""
        return [g for g in ctx.layout.groups
                if g.producer is not None and any(ctx.spec(n) is not None for n in g.linears)]

    def search(self, ctx: BlockContext, group: LayerGroup, act_max: torch.Tensor) -> torch.Tensor:
        """Scales ``[in]`` of ``group`` from its input ``act_max`` and its linears' current weights."""
        w_max = weight_absmax([ctx.get(n).weight for n in group.linears])
        if w_max.shape != act_max.shape:
            raise ValueError(f"{ctx.full_name(group.name)}: {act_max.numel()} input channels measured, "
                             f"weights have {w_max.numel()}")
        return smooth_scales(act_max, w_max, self.options.alpha)

    def apply(self, ctx: BlockContext, scales: dict[str, torch.Tensor]) -> list[str]:
        """Fold recorded scales (``{"<block prefix>.<group name>": [in]}``) into the block, in layout order;
        returns the keys folded."""
        done = []
        for group in ctx.layout.groups:
            key = f"{ctx.prefix}.{group.name}"
            if key in scales:
                fold_scales(ctx.block, group, scales[key])
                done.append(key)
        return done

    def smooth(self, ctx: BlockContext) -> dict[str, torch.Tensor]:
        """Measure, search and fold every smoothable group of the block; returns ``{key: scales}``.

        Activation maxima come from one pass over the float block: folding one
        group is an exact re-parametrisation that changes only that group's own
        input, so every other group's cached maxima stay valid. That holds only
        when no two groups share producer rows (folding one would then change
        the other's input without compensation): such a layout is an error.
        """
        groups = self.groups(ctx)
        if not groups:
            return {}
        if not ctx.calls:
            raise ValueError(f"{ctx.prefix}: SmoothQuant needs calibration calls, got none")
        check_distinct_producers(ctx, groups)
        act = collect_act_max(ctx, [g.input_of for g in groups])
        out: dict[str, torch.Tensor] = {}
        for g in groups:
            key = f"{ctx.prefix}.{g.name}"
            out[key] = self.search(ctx, g, act[g.input_of])
            fold_scales(ctx.block, g, out[key])
        return out

    def process_block(self, ctx: BlockContext) -> None:
        if self.loaded is not None:
            wanted = {f"{ctx.prefix}.{g.name}" for g in self.groups(ctx)}
            missing = sorted(wanted - set(self.loaded.scales))
            if missing:
                raise ValueError(f"quant.special.load_scales: {self.options.load_scales} has no scales for {missing}")
            found = {k: self.loaded.scales[k] for k in self.apply(ctx, self.loaded.scales)}
        else:
            found = self.smooth(ctx)
        for key, s in found.items():
            self.record.scales[key] = s.detach().cpu()
        for name in ctx.layout.linears():
            ctx.quantize(name)
