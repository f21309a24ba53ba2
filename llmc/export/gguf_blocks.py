"""GGUF block packing: llmc's integers and scales as ``Q4_0`` / ``Q4_1`` / ``Q8_0`` bytes (pure functions).

32 weights per block along the input dim, fp16 little-endian scales; byte ``j`` (0..15) of a 4-bit
block holds element ``j`` (low nibble) and ``j + 16`` (high nibble). See :mod:`llmc.export.gguf`.
"""
from __future__ import annotations

import numpy as np
import torch

BLOCK = 32


def fp16_neighbours(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The fp16 values just below and just above each float ``x`` (equal when ``x`` is one)."""
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(over="ignore"):
        h = x.astype(np.float16)
    if not np.isfinite(h).all():
        raise ValueError(f"save_gguf: a scale or offset ({np.abs(x).max():.3g}) overflows fp16")
    hd = h.astype(np.float64)
    lo = np.where(hd > x, np.nextafter(h, np.float16(-np.inf)), h)
    hi = np.where(hd < x, np.nextafter(h, np.float16(np.inf)), h)
    return lo, hi


def fp16_scale(scale: torch.Tensor) -> np.ndarray:
    """Nearest fp16 of each scale (``Q4_0``/``Q8_0`` ``d``); a ``ValueError`` on overflow."""
    s = scale.detach().double().cpu().numpy()
    with np.errstate(over="ignore"):
        d = s.astype(np.float16)
    if not np.isfinite(d).all():
        raise ValueError(f"save_gguf: a scale ({np.abs(s).max():.3g}) overflows fp16")
    return d


def q4_1_params(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """fp16 ``(d, m)`` ``[out, G]`` for ``Q4_1``: the candidate pair closest to llmc's ``(q - z) * s``."""
    qg = q.detach().double().cpu().numpy().reshape(q.shape[0], -1, BLOCK)
    s, z = scale.detach().double().cpu().numpy(), zero.detach().double().cpu().numpy()
    target = (qg - z[..., None]) * s[..., None]
    best_err = np.full(s.shape, np.inf)
    best_d, best_m = np.zeros(s.shape, np.float16), np.zeros(s.shape, np.float16)
    for d in fp16_neighbours(s):
        d64 = d.astype(np.float64)[..., None]
        m_ls = (target - qg * d64).mean(-1)
        for m in fp16_neighbours(m_ls):
            err = ((qg * d64 + m.astype(np.float64)[..., None] - target) ** 2).sum(-1)
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_d, best_m = np.where(better, d, best_d), np.where(better, m, best_m)
    return best_d, best_m


def _nibble_bytes(n: np.ndarray) -> np.ndarray:
    """``[out, in]`` values 0..15 -> ``[out, in / 32, 16]`` bytes (element j low, j + 16 high)."""
    g = n.astype(np.uint8).reshape(n.shape[0], -1, BLOCK)
    return g[..., :16] | (g[..., 16:] << 4)


def _fp16_bytes(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.astype("<f2")).view(np.uint8).reshape(*x.shape, 2)


def _check_range(q: np.ndarray, lo: int, hi: int, fmt: str) -> None:
    if q.size and (q.min() < lo or q.max() > hi):
        raise ValueError(f"save_gguf: {fmt} integers must lie in [{lo}, {hi}], got [{q.min()}, {q.max()}]")
    if q.shape[-1] % BLOCK:
        raise ValueError(f"save_gguf: in_features={q.shape[-1]} is not a multiple of the block size {BLOCK}")


def pack_q4_0(q: torch.Tensor, scale: torch.Tensor) -> np.ndarray:
    """Signed 4-bit ``q`` ``[out, in]`` + scales ``[out, in/32]`` -> ``Q4_0`` bytes ``[out, in/32*18]``."""
    qn = q.detach().cpu().numpy().astype(np.int64)
    _check_range(qn, -8, 7, "Q4_0")
    blocks = np.concatenate([_fp16_bytes(fp16_scale(scale)), _nibble_bytes(qn + 8)], axis=-1)
    return blocks.reshape(qn.shape[0], -1)


def pack_q4_1(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> np.ndarray:
    """Unsigned 4-bit ``q`` + scales/zeros ``[out, in/32]`` -> ``Q4_1`` bytes ``[out, in/32*20]``."""
    qn = q.detach().cpu().numpy().astype(np.int64)
    _check_range(qn, 0, 15, "Q4_1")
    d, m = q4_1_params(q, scale, zero)
    blocks = np.concatenate([_fp16_bytes(d), _fp16_bytes(m), _nibble_bytes(qn)], axis=-1)
    return blocks.reshape(qn.shape[0], -1)


def pack_q8_0(q: torch.Tensor, scale: torch.Tensor) -> np.ndarray:
    """Signed 8-bit ``q`` + scales -> ``Q8_0`` bytes ``[out, in/32*34]``."""
    qn = q.detach().cpu().numpy().astype(np.int64)
    _check_range(qn, -128, 127, "Q8_0")
    qs = qn.astype(np.int8).view(np.uint8).reshape(qn.shape[0], -1, BLOCK)
    return np.concatenate([_fp16_bytes(fp16_scale(scale)), qs], axis=-1).reshape(qn.shape[0], -1)
