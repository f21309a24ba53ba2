"""CUDA checks (marker ``cuda``; skipped without a GPU; ``bench/gpu_check.sh`` runs them).

The block loop on the GPU quantizes like the CPU; torch.distributed with NCCL (one process per GPU)
gives the single-process result within the CPU test's bounds.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_distributed import compare, free_port

from llmc.testing.dist_check import quantize_one

pytestmark = pytest.mark.cuda
ROOT = Path(__file__).resolve().parent.parent
GPU = torch.device("cuda")


def _float_logits(model_dir: Path, calib_dir: Path) -> list[torch.Tensor]:
    from llmc.calib import batches, load_samples
    from llmc.models import load_adapter

    adapter = load_adapter("qwen2_vl", str(model_dir), dtype="float32")
    with torch.no_grad():
        return [adapter.model(**adapter.batch_process(g, with_answer=True, max_length=256)).logits
                for g in batches(load_samples("custom_mm", calib_dir, 4), 2)]


def test_rtn_on_gpu_is_the_cpu_result(tiny_model, calib_dir):
    gpu, cpu = (quantize_one(tiny_model("qwen2_vl"), calib_dir, "RTN", d) for d in (GPU, None))
    for name, layer in cpu["layers"].items():
        assert torch.equal(gpu["layers"][name]["codes"], layer["codes"]), name


@pytest.mark.parametrize("variant", ["GPTQ", "AWQ", "SmoothQuant"])
def test_gpu_quantizes_as_well_as_cpu(tiny_model, calib_dir, variant):
    """Blocks visit the GPU one at a time (the model ends on CPU); the output error against the float
    model is the CPU run's (GPU sums round differently, so codes are not compared bit for bit)."""
    ref = _float_logits(tiny_model("qwen2_vl"), calib_dir)
    gpu, cpu = (quantize_one(tiny_model("qwen2_vl"), calib_dir, variant, d) for d in (GPU, None))

    def err(run: dict) -> float:
        return sum(float((x - y).pow(2).mean()) for x, y in zip(run["logits"], ref))

    assert err(gpu) <= 1.5 * err(cpu) + 1e-8, (err(gpu), err(cpu))
    assert compare(gpu, cpu)[0] > 0.9


def test_nccl_job_equals_single_process(tiny_model, calib_dir, tmp_path):
    """``torchrun --nproc_per_node G`` with NCCL (G = GPUs, at most 4) keeps the CPU test's bounds
    against the plain single-process GPU run (with one GPU: the collectives on CUDA tensors work)."""
    gpus = min(torch.cuda.device_count(), 4)
    variants = ["RTN", "GPTQ", "AWQ", "SmoothQuant"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(gpus), "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "llmc.testing.dist_check", str(tiny_model("qwen2_vl")),
           str(calib_dir), str(tmp_path), "--device=cuda", *variants]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    assert f"torch.distributed: world size {gpus}, backend nccl" in run.stderr
    for variant in variants:  # one GPU: every collective is the identity; GPU kernels may still differ run to run
        got, ref = torch.load(tmp_path / f"{variant}.pt"), quantize_one(tiny_model("qwen2_vl"), calib_dir, variant, GPU)
        equal, rel = compare(got, ref)
        print(f"{variant}: {gpus} GPU(s) vs 1 process: codes equal {equal:.6f}, logits {rel:.2e}")
        assert equal >= 0.999 and rel <= 1e-4, (variant, equal, rel)
