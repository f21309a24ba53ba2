"""After an export is written, it is loaded again and must compute what the fake-quant model computes.

Two checks, both failing the job with the layers at fault:

* while writing, every packed layer is read back by its format's own rules and compared with its
  fake-quant weight (:meth:`llmc.export.base.Export.decode`: AutoAWQ, GPTQ, fake; GGUF by gguf's reader
  in its tests);
* once a compressed-tensors folder (``vllm/``, ``sgl/``) is complete, transformers loads it (the loader
  llmc's own environment has; ``dequantize=True``) and its logits on a few calibration samples are
  compared with the fake-quant model's: any NaN, or a difference beyond the bf16 yardstick (the bf16
  rounding of the logits, ``2^-8 * max |logit|``), fails and names the layers whose weights differ.
  AutoAWQ and GPTQ need ``gptqmodel`` to load, which llmc does not install: their layers are checked
  by the first check, and their runtimes by ``tools/verify_runtimes`` (docs/runtimes.md).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from loguru import logger
from torch import nn

from llmc.export.base import ExportMismatch

if TYPE_CHECKING:
    from llmc.models.base import ModelAdapter


def yardstick(logits: torch.Tensor) -> float:
    """The bf16 rounding level of ``logits``: the difference two correct runtimes may show."""
    return max(2.0**-8 * float(logits.abs().max()), 1e-5)


@torch.no_grad()
def logits_of(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
    device = next(model.parameters()).device
    return [model(**{k: v.to(device) for k, v in b.items()}, use_cache=False).logits.float().cpu() for b in batches]


def differing_layers(reloaded: nn.Module, reference: nn.Module, tol: float = 0.0) -> list[str]:
    """Linears whose weights differ between the two models (the reference's fake-quant weights)."""
    from llmc.quant.fake_linear import FakeQuantLinear

    mods = dict(reloaded.named_modules())
    out = []
    for name, m in reference.named_modules():
        if isinstance(m, nn.Linear) and name in mods and getattr(mods[name], "weight", None) is not None:
            want = m.quantized_weight() if isinstance(m, FakeQuantLinear) else m.weight
            got = mods[name].weight
            if got.shape != want.shape or float((got.float() - want.float()).abs().max()) > tol:
                out.append(name)
    return out


def check_reload(folder: Path, adapter: "ModelAdapter", batches: list[dict[str, torch.Tensor]],
                 reference: nn.Module) -> float:
    """Load the compressed-tensors folder with transformers; its logits must equal ``reference``'s
    (the fake-quant model) within the bf16 yardstick. Returns the largest difference."""
    from llmc.export.compressed import load_real_quant

    reloaded = load_real_quant(folder, dtype=reference.dtype, auto_class=adapter.auto_model_class())
    want, got = logits_of(reference, batches), logits_of(reloaded, batches)
    tol = min(yardstick(w) for w in want)
    worst = max(float((g - w).abs().max()) for g, w in zip(got, want))
    if not all(torch.isfinite(g).all() for g in got) or worst > tol:
        layers = differing_layers(reloaded, reference)
        raise ExportMismatch(f"{folder.name}: reloaded by transformers its logits differ from the fake-quant "
                             f"model's by {worst:.3g} (yardstick {tol:.3g}) or hold NaN; layers whose weights "
                             f"differ: {layers[:8] or 'none (check the config)'}")
    logger.info(f"{folder.name}/ reloaded by transformers: logits within {worst:.2g} of the fake-quant model "
                f"(yardstick {tol:.2g})")
    return worst
