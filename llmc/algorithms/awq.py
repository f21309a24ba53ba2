"""AWQ: Lin et al. 2023, "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration".

Per block: (1) for every layer group with a producer, search per-input-channel
scales ``s`` that minimise the quantized output error of the group's
``inspect`` module and fold them exactly (``x / s`` at the producer,
``W * s`` in the consumers); (2) search a weight clipping ratio per (output
row, quantization group); (3) quantize every linear. Searches are pure
functions (``search_scales``; ``search_clip`` in ``awq_clip.py``); folding and quantizing are
separate and can be replayed from a saved record (``load_scales``).

``quant.special`` keys:

* ``trans`` (true): do the scale search and fold the scales.
* ``trans_version`` ("v2"): "v2" ``s = x_mean^r``; "v1" ``s = x_mean^r / w_mean^(1-r)``
  with ``w_mean`` the mean over output rows of ``|W|`` normalised by its group's absmax.
* ``n_grid`` (20): ratios ``r = i / n_grid`` for ``i < n_grid``; ``r = 0`` is plain RTN.
* ``search_calls`` (null): how many calibration batches (evenly strided) the scale search's loss runs
  on; null: all of them (the means are always over all). Fewer is faster; the measured effect is in
  docs/performance.md.
* ``propagate`` ("quantized"): the next block's inputs come from the quantized block (its error
  propagates), or from the scaled float block ("float": llm-awq and llm-compressor do this, each block
  is calibrated on the float model's activations). The measured effect is in docs/performance.md.
* ``weight_clip`` (true): search clipping ratios (llm-awq's ``auto_clip``).
* ``clip_sym`` (true): one ratio per (row, group) shrinks both ends of the range
  (``compute_qparams``'s ``clip``). False, for asymmetric weights only, refines it
  by coordinate search into separate max-side and min-side ratios (two more passes
  over the grid, never worse on the sampled tokens); symmetric weights have one
  absmax ratio either way.
* ``clip_grid`` (20): number of ratios from 1 down to ``1 - max_shrink`` (inclusive).
* ``max_shrink`` (0.5): the largest fraction of the range that clipping may remove.
* ``clip_n_tokens`` (512): input rows (evenly strided over non-padding rows) used by the clip search.
* ``load_scales`` (null): path of an ``awq_records.pt`` (:class:`AWQRecord`) written by an
  earlier job; its scales and clips are replayed instead of searched (no calibration data then).
* ``save_scales`` (true): write the record (``awq_records.pt``) into the job folder.

Token weights (``CachedCall.token_weight``: 0 on padding, the user's image/text
weights elsewhere; None for vision blocks) weight every mean and every error.
As in llm-awq, clipping skips the query/key linears: the plan's ``Role.QUERY_KEY``
(from the layout's ``query_key``, cross-attention q/k included). A fused qkv linear
is none of them and is clipped as a whole.

Under torch.distributed (:mod:`llmc.distributed`) every rank sees its share of the calls and
every statistic is a sum over ranks: the input means (sums and norms), each ratio's loss (errors
and norms) and the clip errors per (row, group) over the same strided rows as one process; every
rank then picks the same scales and clips.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from loguru import logger

from llmc import distributed as dist
from llmc.algorithms.awq_clip import clipped_qparams, search_clip
from llmc.algorithms.base import Algorithm, register_algorithm
from llmc.algorithms.records import AWQRecord
from llmc.context import BlockContext, first_tensor, flatten_rows, hidden_input
from llmc.models.layout import LayerGroup
from llmc.plan import Role
from llmc.quant.primitives import (
    QuantSpec,
    rtn_fake_quantize,
    to_groups,
)
from llmc.quant.scaling import fold_scales
from llmc.strict import ConfigError

LossFn = Callable[[torch.Tensor], float]


@dataclass
class AWQOptions:
    """``quant.special`` keys of AWQ (see the module docstring)."""

    trans: bool = True
    trans_version: Literal["v1", "v2"] = "v2"
    n_grid: int = 20
    search_calls: int | None = None
    propagate: Literal["quantized", "float"] = "quantized"
    weight_clip: bool = True
    clip_sym: bool = True
    clip_grid: int = 20
    max_shrink: float = 0.5
    clip_n_tokens: int = 512
    load_scales: str | None = None
    save_scales: bool = True

    def __post_init__(self) -> None:
        for key in ("n_grid", "clip_grid", "clip_n_tokens", "search_calls"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ConfigError(f"quant.special.{key}: {getattr(self, key)} must be >= 1")
        if not 0.0 <= self.max_shrink < 1.0:
            raise ConfigError(f"quant.special.max_shrink: {self.max_shrink} must be in [0, 1)")
        if self.load_scales is not None and not Path(self.load_scales).is_file():
            raise ConfigError(f"quant.special.load_scales: {self.load_scales} is not a file")


# ----------------------------------------------------------------------------------- scale search
def weighted_abs_mean(xs: Sequence[torch.Tensor], weights: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """Per-channel mean of ``|x|`` over all rows of all calls, rows weighted (weight 0 rows ignored).

    Distributed: the weighted sums and the total weight are summed over ranks before dividing."""
    total, norm = None, 0.0
    for x, w in zip(xs, weights):
        rows, rw = flatten_rows(x, w)
        a = rows.float().abs()
        s = a.sum(0) if rw is None else (a * rw[:, None]).sum(0)
        total = s if total is None else total + s
        norm += float(rows.shape[0]) if rw is None else float(rw.sum())
    if total is not None:
        total, norm = dist.all_reduce_sum(total), dist.sum_float(norm)
    if total is None or norm <= 0:
        raise ValueError("no calibration rows with a non-zero token weight")
    return total / norm


def weight_mean(weights: Sequence[torch.Tensor], group_len: int) -> torch.Tensor:
    """llm-awq's ``get_weight_scale``: ``|W| / absmax(group)``, averaged over all consumers' rows."""
    w = torch.cat([x.detach().float() for x in weights], dim=0)
    g = to_groups(w.abs(), group_len)
    g = g / g.amax(dim=-1, keepdim=True).clamp(min=1e-8)
    return g.reshape(w.shape).mean(0)


def grid_scales(x_mean: torch.Tensor, ratio: float, w_mean: torch.Tensor | None = None) -> torch.Tensor:
    """``x_mean^r`` (v2) or ``x_mean^r / w_mean^(1-r)`` (v1), normalised by ``sqrt(max * min)``."""
    s = x_mean.float().pow(ratio)
    if w_mean is not None:
        s = s / w_mean.float().clamp(min=1e-4).pow(1 - ratio)
    s = s.clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def search_scales(x_mean: torch.Tensor, loss_fn: LossFn, n_grid: int,
                  w_mean: torch.Tensor | None = None) -> tuple[torch.Tensor, float, list[float]]:
    """Best scales over ratios ``i / n_grid``: ``(scales, ratio, losses)``; ratio 0 gives all-ones."""
    best, best_ratio, best_loss, losses = torch.ones_like(x_mean, dtype=torch.float32), 0.0, float("inf"), []
    for i in range(n_grid):
        ratio = i / n_grid
        s = grid_scales(x_mean, ratio, w_mean)
        loss = float(loss_fn(s))
        losses.append(loss)
        if loss < best_loss:
            best, best_ratio, best_loss = s, ratio, loss
    return best, best_ratio, losses


def search_subset(count: int, n: int) -> list[int]:
    """Indices of this rank's ``count`` calls among ``n`` evenly strided over every rank's calls (in the
    order of the unsplit calls: the same calls as one process)."""
    offsets, total = dist.global_offsets([1] * count)
    if total <= n:
        return list(range(count))
    keep = {round(i * (total - 1) / max(n - 1, 1)) for i in range(n)}
    return [j for j, off in enumerate(offsets) if off in keep]


def sample_rows(xs: Sequence[torch.Tensor], weights: Sequence[torch.Tensor | None],
                n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """At most ``n`` rows evenly strided over all non-padding rows of ``xs`` (and their weights).

    Distributed: strided over the rows of every rank's calls in the order of the unsplit calls;
    each rank returns those of its own calls (the union is the single-process sample)."""
    flat = [flatten_rows(x, w) for x, w in zip(xs, weights)]
    offsets, total = dist.global_offsets([r.shape[0] for r, _ in flat])
    if total == 0:
        raise ValueError("no calibration rows with a non-zero token weight")
    idx = torch.arange(0, total, max(1, total // n))[:n]
    rows, rws = [], []
    for (r, rw), off in zip(flat, offsets):
        local = idx[(idx >= off) & (idx < off + r.shape[0])] - off
        rows.append(r[local.to(r.device)])
        rws.append(None if rw is None else rw[local.to(rw.device)])
    has_w = any(rw is not None for rw in rws)
    weights_out = torch.cat([rw if rw is not None else torch.ones(r.shape[0], device=r.device)
                             for r, rw in zip(rows, rws)]) if has_w else None
    return torch.cat(rows), weights_out


def clip_skipped(ctx: BlockContext) -> set[str]:
    """Query/key linears of the block (the plan's ``Role.QUERY_KEY``), left unclipped as in llm-awq."""
    return {n for n in ctx.layout.linears() if ctx.has_role(n, Role.QUERY_KEY)}


def _scaled_fq(w0: torch.Tensor, spec: QuantSpec, s: torch.Tensor) -> torch.Tensor:
    """``fq(W * s) / s`` in ``w0``'s dtype: a consumer's weight while scale ``s`` is tried.

    ``W * s`` is rounded to ``w0``'s dtype first, as :func:`fold_scales` stores it: the search
    scores the very weights that will be quantized (in a bf16 model the rounding moves the
    min/max grid of a group, and the per-ratio losses differ by a few percent without it)."""
    sd = s.to(w0.device)[None, :]
    scaled = (w0.float() * sd).to(w0.dtype).float()
    return (rtn_fake_quantize(scaled, spec) / sd).to(w0.dtype)


def _linear_loss(lin: torch.nn.Linear, spec: QuantSpec, xs: Sequence[torch.Tensor],
                 weights: Sequence[torch.Tensor | None]) -> LossFn:
    """The loss when the inspected module is the group's only linear, without running it per ratio.

    Its output error is ``x D`` with ``D = (W_q - W)^T``, so the token-weighted mean over rows of
    the mean squared error over outputs is ``sum(D * (H D)) / (out * sum w)`` with
    ``H = sum_i w_i x_i^T x_i``, accumulated once: each ratio then costs ``in^2 * out`` instead of
    ``tokens * in * out``. The same quantity as running the linear, without rounding its outputs.
    Distributed: each rank's error ``sum(D * (H_r D))`` and weight are summed over ranks.
    """
    H = torch.zeros(lin.in_features, lin.in_features, dtype=torch.float32, device=lin.weight.device)
    norm = 0.0
    for x, w in zip(xs, weights):
        rows, rw = flatten_rows(x, w)
        rows = rows.float()
        if rw is not None:
            rows = rows * rw.sqrt()[:, None]
        norm += float(rows.shape[0] if rw is None else rw.sum())
        H.addmm_(rows.t(), rows)
    w0 = lin.weight.detach()
    norm = dist.sum_float(norm)

    @torch.no_grad()
    def loss(s: torch.Tensor) -> float:
        D = (_scaled_fq(w0, spec, s).float() - w0.float()).t()
        return dist.sum_float(float((D * (H @ D)).sum())) / (lin.out_features * max(norm, 1e-12))

    return loss


def _group_loss(ctx: BlockContext, group: LayerGroup, calls: list[tuple[tuple, dict]],
                weights: Sequence[torch.Tensor | None]) -> LossFn:
    """Token-weighted MSE of ``inspect`` vs its float output, consumers set to ``fq(W * s) / s``."""
    lins = [(ctx.get(n), ctx.spec(n)) for n in group.linears]
    if group.linears == (group.inspect,) and lins[0][1] is not None:
        return _linear_loss(lins[0][0], lins[0][1], [hidden_input(a, k) for a, k in calls], weights)
    return _module_loss(ctx.get(group.inspect), lins, calls, weights)


def _module_loss(inspect: torch.nn.Module, lins: list[tuple[torch.nn.Module, QuantSpec | None]],
                 calls: list[tuple[tuple, dict]], weights: Sequence[torch.Tensor | None]) -> LossFn:
    """The loss by running ``inspect`` on every call for each ratio (any module: attention, MLP).

    Distributed: each rank runs its own calls; errors and weights are summed over ranks."""
    orig = [lin.weight.detach().clone() for lin, _ in lins]
    with torch.no_grad():
        refs = [first_tensor(inspect(*a, **k)).float() for a, k in calls]
    flat = [None if w is None else w.reshape(-1).float() for w in weights]
    norm = sum(float(r.shape[:-1].numel()) if w is None else float(w.sum()) for r, w in zip(refs, flat))
    norm = dist.sum_float(norm)

    @torch.no_grad()
    def loss(s: torch.Tensor) -> float:
        try:
            for (lin, spec), w0 in zip(lins, orig):
                if spec is not None:
                    lin.weight.copy_(_scaled_fq(w0, spec, s))
            err = 0.0
            for (a, k), ref, w in zip(calls, refs, flat):
                sq = first_tensor(inspect(*a, **k)).float().sub_(ref).pow_(2).mean(-1).reshape(-1)
                err += float(sq.sum() if w is None else sq @ w.to(sq.device))  # padding rows: weight 0
            return dist.sum_float(err) / max(norm, 1e-12)
        finally:
            for (lin, _), w0 in zip(lins, orig):
                lin.weight.copy_(w0)

    return loss


@register_algorithm
class AWQ(Algorithm):
    name = "AWQ"
    Options = AWQOptions
    Record = AWQRecord
    load_option, save_option = "load_scales", "save_scales"

    def process_block(self, ctx: BlockContext) -> None:
        if self.loaded is not None:
            self._replay(ctx)
            return
        if self.options.trans:
            for group in ctx.layout.groups:
                if group.producer is not None and any(ctx.spec(n) is not None for n in group.linears):
                    self._scale_group(ctx, group)
        if self.options.weight_clip and ctx.calls:
            self._clip_block(ctx)
        for name in ctx.layout.linears():
            ctx.quantize(name)

    def propagates_float(self) -> bool:
        return self.options.propagate == "float"

    def _scale_group(self, ctx: BlockContext, group: LayerGroup) -> None:
        """Search the group's scales on freshly recorded calls (earlier folds included), then fold them."""
        rec = ctx.record_calls(list(dict.fromkeys([group.inspect, group.input_of])))
        weights = ctx.weights_for(group.input_of)
        x_mean = weighted_abs_mean([hidden_input(a, k) for a, k in rec[group.input_of]], weights)
        w_mean = None
        if self.options.trans_version == "v1":
            spec = next(ctx.spec(n) for n in group.linears if ctx.spec(n) is not None)
            lins = [ctx.get(n).weight for n in group.linears]
            w_mean = weight_mean(lins, spec.group_len(lins[0].shape[1]))
        calls, loss_weights = rec[group.inspect], weights
        if self.options.search_calls is not None:
            keep = search_subset(len(calls), self.options.search_calls)
            calls, loss_weights = [calls[i] for i in keep], [weights[i] for i in keep]
        loss = _group_loss(ctx, group, calls, loss_weights)
        s, ratio, losses = search_scales(x_mean, loss, self.options.n_grid, w_mean)
        fold_scales(ctx.block, group, s)
        self.record.scales[f"{ctx.prefix}.{group.name}"] = s.detach().cpu()
        logger.debug(f"AWQ {ctx.prefix}.{group.name}: ratio {ratio:.2f}, loss {losses[0]:.3g} -> {min(losses):.3g}")

    def _clip_block(self, ctx: BlockContext) -> None:
        """Search clip ratios on the (scaled, still float) block's inputs and quantize with them."""
        skip = clip_skipped(ctx)
        todo = [g for g in ctx.layout.groups if any(n not in skip and ctx.spec(n) for n in g.linears)]
        if not todo:
            return
        inputs = ctx.inputs([g.input_of for g in todo])
        o = self.options
        ratios = torch.linspace(1.0, 1.0 - o.max_shrink, o.clip_grid)
        for g in todo:
            x, xw = sample_rows(inputs[g.input_of], ctx.weights_for(g.input_of), o.clip_n_tokens)
            for name in g.linears:
                spec = ctx.spec(name)
                if name in skip or spec is None:
                    continue
                w = ctx.get(name).weight.detach()
                clip = search_clip(w, x, spec, ratios, xw, separate=not o.clip_sym)
                self.record.clips[ctx.full_name(name)] = clip.cpu()
                ctx.quantize(name, *clipped_qparams(w, spec, clip))

    def _replay(self, ctx: BlockContext) -> None:
        """Fold the loaded scales and quantize with the loaded clips (RTN where none was recorded)."""
        scales, clips = self.loaded.scales, self.loaded.clips
        pre = f"{ctx.prefix}."
        if not any(k.startswith(pre) for k in (*scales, *clips)):
            raise ValueError(f"quant.special.load_scales: {self.options.load_scales} has no record for "
                             f"block {ctx.prefix}; it holds e.g. {sorted(scales)[:3] or sorted(clips)[:3]}")
        for group in ctx.layout.groups:
            key = f"{ctx.prefix}.{group.name}"
            if key in scales:
                fold_scales(ctx.block, group, scales[key])
                self.record.scales[key] = scales[key]
        for name in ctx.layout.linears():
            clip, spec = clips.get(ctx.full_name(name)), ctx.spec(name)
            if clip is not None and spec is not None:
                w = ctx.get(name).weight.detach()
                ctx.quantize(name, *clipped_qparams(w, spec, clip.to(w.device)))
                self.record.clips[ctx.full_name(name)] = clip
            else:
                ctx.quantize(name)
