"""Shared pieces of the packed (real-quant) exporters.

* which modules are quantized / float, and their names in the checkpoint
  (transformers 5 renames on save: ``model.language_model.layers`` is written
  as ``model.layers``, ``model.visual`` as ``visual``; loaders see the
  in-memory names, vLLM maps the checkpoint names);
* bit packing of unsigned integers into ``int32`` words (AutoAWQ, GPTQ).

Folders are written by :mod:`llmc.export.base` / :mod:`llmc.export.writer`.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
from loguru import logger
from torch import nn

from llmc.quant.fake_linear import FakeQuantLinear

StateDict = dict[str, torch.Tensor]


# ------------------------------------------------------------------------------------------ modules
def quantized_layers(model: nn.Module) -> dict[str, FakeQuantLinear]:
    """Every fake-quant linear by its in-memory name, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)}


def float_weight_modules(model: nn.Module) -> list[str]:
    """Float modules a loader could mistake for a quantizable layer (linears, convolutions)."""
    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    return [n for n, m in model.named_modules() if isinstance(m, kinds) and not isinstance(m, FakeQuantLinear)]


def checkpoint_names(model: nn.Module, names: Iterable[str]) -> dict[str, str]:
    """In-memory module name -> the name ``save_pretrained`` writes (identity when nothing is renamed).

    Uses transformers' own reverse renaming, one key at a time so the pairing is exact.
    """
    names = list(names)
    try:
        from transformers.core_model_loading import revert_weight_conversion

        out = {}
        for n in names:
            keys = list(revert_weight_conversion(model, {f"{n}.weight": torch.zeros(1)}).keys())
            if len(keys) != 1:
                raise ValueError(f"{n} is not renamed one-to-one: {keys}")
            out[n] = keys[0].removesuffix(".weight")
        return out
    except Exception as exc:  # pragma: no cover - depends on the transformers version
        logger.warning(f"could not derive checkpoint names ({exc}); using in-memory names only")
        return {n: n for n in names}


def spellings(name_map: dict[str, str], names: Iterable[str]) -> list[str]:
    """Both spellings (in-memory and checkpoint) of ``names``, in order, without duplicates."""
    return list(dict.fromkeys(s for n in names for s in (n, name_map.get(n, n))))


def has_act_order(m: FakeQuantLinear) -> bool:
    """True when the layer's groups are not contiguous runs of input channels (GPTQ ``desc_act``)."""
    if m.g_idx is None:
        return False
    gl = m.spec.group_len(m.in_features)
    contiguous = torch.arange(m.in_features, device=m.g_idx.device) // gl
    return not torch.equal(m.g_idx.long(), contiguous)


# ------------------------------------------------------------------------------------------ packing
def pack_int32(q: torch.Tensor, bits: int, order: Sequence[int] | None = None) -> torch.Tensor:
    """Pack unsigned ``bits``-bit integers along the last dim: ``[..., n] -> [..., n * bits // 32]`` int32.

    Word ``j`` holds elements ``j*k .. j*k+k-1`` (``k = 32 // bits``); slot ``i``
    (bits ``i*bits .. i*bits+bits-1``) holds element ``j*k + order[i]``
    (``order`` defaults to ``0..k-1``, the sequential order of GPTQ).
    """
    if 32 % bits:
        raise ValueError(f"{bits}-bit values do not tile an int32 word; packable: 2, 4, 8")
    k = 32 // bits
    if q.shape[-1] % k:
        raise ValueError(f"last dim {q.shape[-1]} is not divisible by the pack factor {k}")
    if q.min() < 0 or q.max() >= 2**bits:
        raise ValueError(f"values outside the unsigned {bits}-bit range [0, {2**bits - 1}]")
    order = list(range(k)) if order is None else list(order)
    words = q.to(torch.int64).reshape(*q.shape[:-1], -1, k)[..., order]
    shifts = torch.arange(k, dtype=torch.int64, device=q.device) * bits
    packed = (words << shifts).sum(dim=-1)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def unpack_int32(packed: torch.Tensor, bits: int, order: Sequence[int] | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: ``[..., w] -> [..., w * 32 // bits]`` int32 in ``[0, 2^bits)``."""
    k = 32 // bits
    order = list(range(k)) if order is None else list(order)
    shifts = torch.arange(k, dtype=torch.int64, device=packed.device) * bits
    slots = (packed.to(torch.int64).unsqueeze(-1) >> shifts) & (2**bits - 1)  # [..., w, k] slot-major
    vals = torch.empty_like(slots)
    vals[..., order] = slots
    return vals.reshape(*packed.shape[:-1], -1).to(torch.int32)
