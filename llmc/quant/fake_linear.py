"""Fake-quant linear: a float ``nn.Linear`` that computes with its quantized weight.

It is a subclass of ``nn.Linear`` so that model code and ``save_pretrained``
see the same ``weight``/``bias`` parameters; the quantization parameters are
non-persistent buffers (exporters read them, checkpoints do not carry them).
``weight`` holds the transformed float weight (after AWQ scaling, rotation, or
GPTQ's error compensation); ``enabled=False`` evaluates the transformed model.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from llmc.quant.primitives import (
    QuantSpec,
    compute_qparams,
    fake_quantize,
    quantize,
    quantize_per_token,
)

if TYPE_CHECKING:
    from llmc.plan import LayerPlan


class FakeQuantLinear(nn.Linear):
    """``y = x @ fq(W)^T + b`` with ``fq`` the quantize-dequantize of its plan entry's spec.

    ``layer`` is the layer's :class:`llmc.plan.LayerPlan` (name, part, spec, activation bits):
    the module reads how it is quantized from the plan, it never decides it.
    """

    layer: "LayerPlan"

    @property
    def spec(self) -> QuantSpec:
        return self.layer.spec

    @property
    def act_bits(self) -> int | None:
        return self.layer.act_bits

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        layer: "LayerPlan",
        scale: torch.Tensor | None = None,
        zero: torch.Tensor | None = None,
        g_idx: torch.Tensor | None = None,
    ) -> "FakeQuantLinear":
        """Wrap ``linear`` (sharing its parameters). Missing ``scale``/``zero`` are min/max RTN."""
        if layer.spec is None:
            raise ValueError(f"{layer.name}: the plan keeps this layer float; it cannot be fake-quantized")
        w = linear.weight
        fq = cls.__new__(cls)
        nn.Module.__init__(fq)
        fq.in_features, fq.out_features = linear.in_features, linear.out_features
        fq.weight, fq.bias = linear.weight, linear.bias
        fq.layer, fq.enabled = layer, True
        if scale is None or zero is None:
            scale, zero = compute_qparams(w.detach(), layer.spec)
        fq.register_buffer("scale", scale.to(w.device, torch.float32), persistent=False)
        fq.register_buffer("zero", zero.to(w.device, torch.float32), persistent=False)
        fq.register_buffer("g_idx", None if g_idx is None else g_idx.to(w.device), persistent=False)
        return fq

    def quantized_weight(self) -> torch.Tensor:
        """The fake-quantized (dequantized) weight, in the weight's dtype.

        Cached until the weight (or its quantization parameters) change: the
        key holds the tensors' identities and in-place version counters.
        """
        key = (self.weight.data_ptr(), self.weight._version, self.weight.dtype, self.weight.device,
               id(self.scale), self.scale._version, id(self.zero), self.zero._version,
               id(self.g_idx), None if self.g_idx is None else self.g_idx._version)
        cached = getattr(self, "_fq_cache", None)
        if cached is None or cached[0] != key:
            with torch.no_grad():
                wq = fake_quantize(self.weight, self.scale, self.zero, self.spec, self.g_idx)
            object.__setattr__(self, "_fq_cache", (key, wq))
            return wq
        return cached[1]

    def int_weight(self) -> torch.Tensor:
        """Integer weight ``[out, in]`` (int32) for exporters."""
        return quantize(self.weight.detach(), self.scale, self.zero, self.spec, self.g_idx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return F.linear(x, self.weight, self.bias)
        if self.act_bits is not None:
            x = quantize_per_token(x, self.act_bits)
        return F.linear(x, self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        act = f", a{self.act_bits}" if self.act_bits else ""
        return f"{super().extra_repr()}, {self.spec.describe()}{act}, enabled={self.enabled}"


def set_fake_quant(model: nn.Module, enabled: bool) -> int:
    """Switch every ``FakeQuantLinear`` in ``model`` on or off; returns how many."""
    n = 0
    for m in model.modules():
        if isinstance(m, FakeQuantLinear):
            m.enabled = enabled
            n += 1
    return n


@contextmanager
def fake_quant_off(model: nn.Module) -> Iterator[None]:
    """Every ``FakeQuantLinear`` in ``model`` computes with its float weight inside the block, as before."""
    layers = [m for m in model.modules() if isinstance(m, FakeQuantLinear)]
    before = [m.enabled for m in layers]
    for m in layers:
        m.enabled = False
    try:
        yield
    finally:
        for m, e in zip(layers, before):
            m.enabled = e
