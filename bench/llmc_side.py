"""llmc's side of bench/vs_llmcompressor.py: quantize the bench model with llmc's Python API.

    PYTHONPATH=. python bench/llmc_side.py JOB.json       (llmc's venv; JOB written by the driver)

JOB keys: ``algo`` ("gptq" | "awq"), ``model``, ``calib``, ``n_calib``, ``seq_len``, ``bs``,
``out`` (folder). Writes ``out/dequant.safetensors`` (the language model's tensors with
fake-quantized linear weights) and ``out/result.json`` (phase times, input fingerprint,
versions, the config used).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import json

import bench_common as bc
import torch

# quant.special of each algorithm, matched to the peer's recipe (see docs/performance.md)
SPECIAL = {
    # llm-compressor: actorder "static" (order by Hessian diagonal, qparams of the original weight
    # up front), block 128, dampening 0.01, one Hessian pass per decoder layer (not true-sequential)
    "gptq": {"actorder": True, "static_groups": True, "percdamp": 0.01, "blocksize": 128,
             "true_sequential": False},
    # llm-compressor: duo_scaling=True (x_mean^r / w_mean^(1-r)), n_grid 20, no clipping search
    "awq": {"trans": True, "trans_version": "v1", "n_grid": 20, "weight_clip": False},
}
SYMMETRIC = {"gptq": True, "awq": False}  # W4A16 (symmetric) and W4A16_ASYM


def llmc_config(job: dict[str, Any]) -> dict[str, Any]:
    algo = job["algo"]
    return {
        "base": {"seed": 42},
        "model": {"type": "qwen2_vl", "path": job["model"], "dtype": "bfloat16",
                  "attn_implementation": job.get("attn", "eager")},
        "calib": {"name": "custom_mm", "path": job["calib"], "n_samples": job["n_calib"], "bs": job["bs"],
                  "seq_len": job["seq_len"], "shuffle": False},
        "quant": {"method": algo.upper(), "quant_objects": ["language"],
                  "weight": {"bit": 4, "symmetric": SYMMETRIC[algo], "granularity": "per_group",
                             "group_size": 128},
                  "special": {**SPECIAL[algo], **job.get("special", {})}},
        "save": {"save_path": str(Path(job["out"]) / "unused")},
        "run": {"device": "cpu", "log_level": "WARNING"},
    }


def awq_scales(adapter: Any, scales: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    """llmc's AWQ record (``{block}.{group}`` -> scales) in the tools' common ``awq_scales.pt`` format:
    producer (smooth layer) name -> ``{"scales", "consumers"}`` (bench/awq_rounding.py)."""
    out = {}
    for key, s in scales.items():
        prefix, group_name = key.rsplit(".", 1)
        layout = adapter.block_layout("language", adapter.model.get_submodule(prefix))
        group = next(g for g in layout.groups if g.name == group_name)
        out[f"{prefix}.{group.producer.name}"] = {"scales": s.float().cpu(),
                                                  "consumers": [f"{prefix}.{n}" for n in group.linears]}
    return out


def main(job_path: str) -> None:
    from llmc.algorithms import build_algorithms
    from llmc.config import parse_config
    from llmc.export.hf import export_state_dict
    from llmc.models import load_adapter
    from llmc.models.qwen_vl import Qwen2VLAdapter
    from llmc.runner import calibration_batches, quantize_model, seed_everything

    bc.set_threads(1)
    job = json.loads(Path(job_path).read_text())
    out = Path(job["out"])
    phases = bc.Phases()

    raw = llmc_config(job)
    cfg = parse_config(raw)
    seed_everything(cfg.base.seed)
    # the peer's processor object (PIL image backend, no video processor): identical inputs, and
    # llmc runs in a venv without torchvision too (the peer's, for a same-stack control run)
    Qwen2VLAdapter.load_processor = lambda self: bc.load_processor(self.path)
    adapter = load_adapter("qwen2_vl", job["model"], cfg.model.dtype, cfg.model.attn_implementation)
    phases.mark("load")
    batches = calibration_batches(cfg, adapter)  # for the fingerprint: the job builds its own, as run_job does,
    fingerprint, n_batches = bc.fingerprint(batches), len(batches)  # and frees them before its block loop
    del batches
    phases.mark("data")
    algos = build_algorithms(cfg.quant)
    with torch.no_grad():
        quantize_model(cfg, adapter, torch.device("cpu"), algos=algos)
    phases.mark("quantize")
    n = bc.save_language_weights(export_state_dict(adapter.model, fake=True), out / "dequant.safetensors")
    if job["algo"] == "awq":
        torch.save(awq_scales(adapter, algos[-1].record.scales), out / "awq_scales.pt")
    phases.mark("save")
    bc.write_json(out / "result.json", {
        "tool": "llmc", "algo": job["algo"], "phases": phases.times, "fingerprint": fingerprint,
        "n_batches": n_batches, "saved_tensors": n, "versions": bc.versions(),
        "attn_implementation": adapter.model.config._attn_implementation,
        "image_processor": type(adapter.processor.image_processor).__name__,
        "threads": torch.get_num_threads(), "config": raw})


if __name__ == "__main__":
    main(sys.argv[1])
