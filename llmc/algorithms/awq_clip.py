"""AWQ's clipping search (llm-awq ``auto_clip``): pure tensor functions, replayable by their results.

``search_clip`` picks, per (output row, group), the clipping ratio of the weight range that minimises
the output error ``(x . (fq(w) - w))^2`` over sampled input rows; :class:`llmc.algorithms.awq.AWQ`
calls it for every linear it clips (``quant.special`` ``weight_clip``, ``clip_sym``, ``clip_grid``,
``max_shrink``, ``clip_n_tokens``).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from llmc import distributed as dist
from llmc.quant.primitives import QuantSpec, compute_qparams, fake_quantize, to_groups


def clipped_qparams(w: torch.Tensor, spec: QuantSpec, clip: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """Quant params with clipping ratios: ``[out, G]`` shared, or ``[out, G, 2]`` (max side, min side)."""
    clip = torch.as_tensor(clip, dtype=torch.float32, device=w.device)
    if clip.dim() < 3:
        return compute_qparams(w, spec, clip)
    return compute_qparams(w, spec, clip[..., 0], None if spec.symmetric else clip[..., 1])


def clip_error(w: torch.Tensor, x: torch.Tensor, spec: QuantSpec, clip: torch.Tensor,
               x_weight: torch.Tensor | None = None) -> torch.Tensor:
    """``[out, G]``: weighted mean over rows of ``(x_g . (fq(w)_g - w_g))^2`` per (row, group).

    Distributed: the weighted sums over rows and the total row weight are summed over ranks."""
    scale, zero = clipped_qparams(w, spec, clip)
    gl = spec.group_len(w.shape[1])
    d = to_groups(fake_quantize(w.float(), scale, zero, spec) - w.float(), gl)  # [o, G, gl]
    xg = x.float().reshape(x.shape[0], -1, gl)  # [T, G, gl]
    out = torch.einsum("tgl,ogl->otg", xg, d).pow(2)  # [o, T, G]
    if dist.active():
        num = out.sum(1) if x_weight is None else (out * x_weight[None, :, None]).sum(1)
        den = float(x.shape[0]) if x_weight is None else float(x_weight.sum())
        return dist.all_reduce_sum(num) / max(dist.sum_float(den), 1e-12)
    if x_weight is None:
        return out.mean(1)
    return (out * x_weight[None, :, None]).sum(1) / x_weight.sum().clamp(min=1e-12)


def _best_over(err_fn: Callable[[torch.Tensor], torch.Tensor], base: torch.Tensor, ratios: torch.Tensor,
               side: int | None) -> torch.Tensor:
    """Per-(row, group) best clip: every ratio on ``side`` (None: the whole entry), starting from ``base``."""
    best = base.clone()
    best_err = err_fn(base) if side is not None else torch.full(base.shape, float("inf"), device=base.device)
    for r in ratios.tolist():
        cand = base.clone()
        if side is None:
            cand.fill_(r)
        else:
            cand[..., side] = r
        err = err_fn(cand)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best[better] = cand[better]
    return best


def search_clip(w: torch.Tensor, x: torch.Tensor, spec: QuantSpec, ratios: torch.Tensor,
                x_weight: torch.Tensor | None = None, separate: bool = False) -> torch.Tensor:
    """Clip ratios minimising ``clip_error``: ``[out, G]``, or ``[out, G, 2]`` when ``separate`` (asymmetric)."""
    out_f, in_f = w.shape
    n_groups = in_f // spec.group_len(in_f)
    chunk = max(1, min(out_f, 2**24 // max(1, x.shape[0] * n_groups)))
    res = []
    for o in range(0, out_f, chunk):
        wc = w[o:o + chunk].float()
        def err(c, wc=wc):
            return clip_error(wc, x, spec, c, x_weight)
        best = _best_over(err, torch.ones(wc.shape[0], n_groups, device=w.device), ratios, None)
        if separate and not spec.symmetric:
            best = torch.stack([best, best], dim=-1)
            for side in (1, 0):
                best = _best_over(err, best, ratios, side)
        res.append(best)
    return torch.cat(res)
