"""bench/gpu_check.sh keeps working without a GPU: its CUDA tests skip, its quantization runs a tiny shape."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_script_runs_tiny_on_cpu():
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run(["bash", "bench/gpu_check.sh", "--tiny"], capture_output=True, text=True, cwd=ROOT,
                         env=env, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = run.stdout
    assert "skipped" in out and "gpu_check: done" in out
    for method in ("GPTQ", "AWQ"):  # one row each: 2 of 2 blocks, 7 linears per block
        assert f"| {method} | 2/2 |" in out, out[-2000:]
    assert "GPTQ block 2/2" in out and "AWQ block 2/2" in out
