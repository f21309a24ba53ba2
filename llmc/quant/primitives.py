"""Quantization primitives: pure tensor functions, no modules, no state.

Conventions (shared by every algorithm and every exporter):

* A weight ``w`` has shape ``[out, in]``. Per-group quantization splits ``in``
  into ``in // group_size`` groups; per-channel is one group of size ``in``.
  Scales and zero points have shape ``[out, n_groups]``.
* Asymmetric: ``q = clamp(round(w / s) + z, 0, 2^b - 1)``, ``w^ = (q - z) * s``
  with ``s = (max - min) / (2^b - 1)``, ``z = round(-min / s)`` where the range is
  widened to contain 0 (GPTQ's convention, so zero is exactly representable).
* Symmetric: ``q = clamp(round(w / s), -2^(b-1), 2^(b-1) - 1)``, ``z = 0`` with
  ``s = absmax / ((2^b - 1) / 2)``: the grid of GPTQ (zero point 2^(b-1) in
  unsigned form) and of compressed-tensors' signed int formats.
* Integer values are returned as ``int32`` tensors (signed for symmetric,
  unsigned range for asymmetric); scales/zeros keep the float dtype given.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Granularity = Literal["per_channel", "per_group"]
VALID_BITS = (2, 3, 4, 8)  # the bit widths a config may ask for (llmc.config.WeightConfig)


@dataclass(frozen=True)
class QuantSpec:
    """How one weight tensor is quantized."""

    bits: int = 4
    symmetric: bool = False
    granularity: Granularity = "per_group"
    group_size: int = 128

    def __post_init__(self) -> None:
        if self.bits not in VALID_BITS:
            raise ValueError(f"bits={self.bits!r} is not supported; valid: {list(VALID_BITS)}")
        if self.granularity not in ("per_channel", "per_group"):
            raise ValueError(
                f"granularity={self.granularity!r} is not valid; valid: ['per_channel', 'per_group']"
            )
        if self.granularity == "per_group" and (
            not isinstance(self.group_size, int) or self.group_size <= 0
        ):
            raise ValueError(f"group_size={self.group_size!r} must be a positive integer")

    def group_len(self, in_features: int) -> int:
        """Number of input channels sharing one scale for a layer of ``in_features``."""
        return in_features if self.granularity == "per_channel" else self.group_size

    def describe(self) -> str:
        g = "ch" if self.granularity == "per_channel" else f"g{self.group_size}"
        return f"w{self.bits}{'s' if self.symmetric else 'a'}{g}"


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer range ``(qmin, qmax)`` of the grid."""
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def to_groups(w: torch.Tensor, group_len: int) -> torch.Tensor:
    """``[out, in] -> [out, in // group_len, group_len]``."""
    out_f, in_f = w.shape
    if in_f % group_len:
        raise ValueError(f"in_features={in_f} is not divisible by group_size={group_len}")
    return w.reshape(out_f, in_f // group_len, group_len)


def compute_qparams(
    w: torch.Tensor, spec: QuantSpec, clip: torch.Tensor | float = 1.0, clip_min: torch.Tensor | float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Min/max scales and zero points, each ``[out, n_groups]``.

    ``clip`` (scalar or ``[out, n_groups]``) shrinks the range, as found by a clipping search
    (AWQ's ``weight_clip``); for asymmetric weights ``clip_min`` shrinks the min side separately
    (default: ``clip`` for both sides). Symmetric weights use ``clip`` on the absmax.
    """
    g = to_groups(w.float(), spec.group_len(w.shape[1]))  # [out, G, gl]
    clip_t = torch.as_tensor(clip, dtype=torch.float32, device=w.device)
    qmin, qmax = qrange(spec.bits, spec.symmetric)
    if spec.symmetric:
        absmax = g.abs().amax(dim=-1) * clip_t
        scale = (absmax / ((qmax - qmin) / 2)).clamp(min=1e-8)
        zero = torch.zeros_like(scale)
    else:
        low = clip_t if clip_min is None else torch.as_tensor(clip_min, dtype=torch.float32, device=w.device)
        wmax = g.amax(dim=-1).clamp(min=0) * clip_t
        wmin = g.amin(dim=-1).clamp(max=0) * low
        scale = ((wmax - wmin) / (qmax - qmin)).clamp(min=1e-8)
        zero = torch.round(-wmin / scale).clamp(qmin, qmax)
    return scale, zero


def _per_channel_params(p: torch.Tensor, in_f: int, g_idx: torch.Tensor | None) -> torch.Tensor:
    """``[out, G]`` -> a view broadcastable against the grouped weight.

    Contiguous groups: ``[out, G, 1]`` against ``[out, G, gl]`` (no copy).
    ``g_idx``: ``[out, in]`` gathered per input channel.
    """
    if g_idx is not None:
        return p[:, g_idx]
    return p.unsqueeze(-1)


def _grouped(w: torch.Tensor, n_groups: int, g_idx: torch.Tensor | None) -> torch.Tensor:
    return w if g_idx is not None else w.reshape(w.shape[0], n_groups, w.shape[1] // n_groups)


def quantize(
    w: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    spec: QuantSpec,
    g_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """Float ``[out, in]`` -> integer ``[out, in]`` (int32) on the grid of ``spec``.

    ``g_idx`` (``[in]``, long) maps input channels to groups when they are not
    contiguous (GPTQ with activation order).
    """
    in_f = w.shape[1]
    s = _per_channel_params(scale.float(), in_f, g_idx)
    z = _per_channel_params(zero.float(), in_f, g_idx)
    qmin, qmax = qrange(spec.bits, spec.symmetric)
    q = torch.clamp(torch.round(_grouped(w.float(), scale.shape[1], g_idx) / s) + z, qmin, qmax)
    return q.reshape(w.shape).to(torch.int32)


def dequantize(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    g_idx: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Integer ``[out, in]`` -> float ``[out, in]``: ``(q - z) * s``."""
    in_f = q.shape[1]
    s = _per_channel_params(scale.float(), in_f, g_idx)
    z = _per_channel_params(zero.float(), in_f, g_idx)
    return ((_grouped(q.float(), scale.shape[1], g_idx) - z) * s).reshape(q.shape).to(dtype)


def fake_quantize(
    w: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    spec: QuantSpec,
    g_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """Quantize then dequantize, in ``w``'s dtype."""
    return dequantize(quantize(w, scale, zero, spec, g_idx), scale, zero, g_idx, w.dtype)


def rtn_fake_quantize(w: torch.Tensor, spec: QuantSpec, clip: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Round-to-nearest fake quantization with min/max parameters."""
    scale, zero = compute_qparams(w, spec, clip)
    return fake_quantize(w, scale, zero, spec)


def quantize_per_token(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Dynamic symmetric per-token fake quantization of activations ``[..., in]``."""
    qmax = 2 ** (bits - 1) - 1
    scale = (x.abs().amax(dim=-1, keepdim=True).float() / qmax).clamp(min=1e-8)
    return (torch.clamp(torch.round(x.float() / scale), -qmax - 1, qmax) * scale).to(x.dtype)
