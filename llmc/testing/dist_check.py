"""Quantize a tiny model with several methods and keep what a comparison needs (tests, torchrun).

``run(model_dir, calib_dir, variants, out)`` quantizes a fresh copy of the model once per variant
(:data:`VARIANTS`: a method and its options; ``quantize_model``, CPU) and writes
``out/<variant>.pt``: every fake-quant linear's integer codes, scales, zeros and g_idx, and the
logits on fixed calibration batches. In a torchrun job every rank computes
and rank 0 writes; without torchrun it is the single-process reference::

    python -m torch.distributed.run --nproc_per_node 2 -m llmc.testing.dist_check MODEL CALIB OUT GPTQ AWQ
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from llmc import distributed as dist

CALIB = {"name": "custom_mm", "n_samples": 8, "bs": 2, "seq_len": 256}  # 4 batches: 2 per rank with 2 ranks
W4G32 = {"bit": 4, "group_size": 32}
VARIANTS: dict[str, dict[str, Any]] = {  # name -> quant section
    "RTN": {"method": "RTN", "weight": W4G32},
    "GPTQ": {"method": "GPTQ", "weight": W4G32},
    "GPTQ-actorder": {"method": "GPTQ", "weight": W4G32, "special": {"actorder": True}},
    "AWQ": {"method": "AWQ", "weight": W4G32, "special": {"clip_n_tokens": 64}},
    "SmoothQuant": {"method": "SmoothQuant", "weight": {"bit": 8, "granularity": "per_channel"}, "act": {"bit": 8}},
}


def config(model_dir: str | Path, calib_dir: str | Path, variant: str, save: str | Path) -> dict[str, Any]:
    """The job config of ``variant`` on the tiny Qwen2-VL (vision + language, image/text token weights)."""
    return {"model": {"type": "qwen2_vl", "path": str(model_dir), "dtype": "float32"},
            "calib": {**CALIB, "path": str(calib_dir)},
            "quant": {"quant_objects": ["vision", "language"], "token_weight": {"image": 0.5, "text": 1.0},
                      **VARIANTS[variant]},
            "save": {"save_path": str(save)}}


def quantize_one(model_dir: str | Path, calib_dir: str | Path, variant: str,
                 device: torch.device | None = None) -> dict[str, Any]:
    """Codes, scales, zeros of every quantized linear and logits on the first 4 calibration samples
    (the blocks are quantized on ``device``, CPU by default; the model ends on CPU)."""
    from llmc.calib import batches, load_samples
    from llmc.config import parse_config
    from llmc.models import load_adapter
    from llmc.quant.fake_linear import FakeQuantLinear
    from llmc.runner import quantize_model, seed_everything

    cfg = parse_config(config(model_dir, calib_dir, variant, Path(model_dir).parent / "unused"))
    seed_everything(cfg.base.seed)
    adapter = load_adapter("qwen2_vl", cfg.model.path, dtype="float32")
    quantize_model(cfg, adapter, device or torch.device("cpu"))
    layers = {n: {"codes": m.int_weight().to(torch.int16), "scale": m.scale.clone(), "zero": m.zero.clone(),
                  "g_idx": m.g_idx} for n, m in adapter.model.named_modules() if isinstance(m, FakeQuantLinear)}
    logits = []
    with torch.no_grad():
        for g in batches(load_samples("custom_mm", calib_dir, 4), 2):
            logits.append(adapter.model(**adapter.batch_process(g, with_answer=True, max_length=256)).logits)
    return {"layers": layers, "logits": logits}


def run(model_dir: str | Path, calib_dir: str | Path, variants: list[str], out: str | Path,
        device: torch.device | None = None) -> None:
    """Every variant in turn; rank 0 (or the single process) saves ``out/<variant>.pt``."""
    out = Path(out)
    for variant in variants:
        res = quantize_one(model_dir, calib_dir, variant, device)
        if dist.is_main():
            out.mkdir(parents=True, exist_ok=True)
            torch.save(res, out / f"{variant}.pt")


def main(argv: list[str]) -> int:
    """``MODEL CALIB OUT [--device=DEV] VARIANT...``; DEV ``cpu`` (gloo) by default, a GPU type: nccl."""
    torch.set_num_threads(1)
    opts = [a for a in argv if a.startswith("--device=")]
    model_dir, calib_dir, out, *variants = [a for a in argv if a not in opts]
    device = dist.init(torch.device(opts[-1].split("=", 1)[1] if opts else "cpu"), timeout_s=120)
    if dist.active() and dist.is_main():
        print(dist.describe(), file=sys.stderr, flush=True)
    run(model_dir, calib_dir, variants, out, device)
    dist.barrier()
    dist.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
