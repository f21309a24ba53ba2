"""Runner: transformers ``from_pretrained`` (the reference, compressed-tensors, and GPTQ/AWQ through
transformers' own quantizers, which call gptqmodel + optimum).

Job keys: ``folder``, ``dtype``, ``prompts``, ``max_new_tokens``, ``images``; ``loader``:
``plain`` (``from_pretrained(folder, dtype=...)``, the folder's own ``quantization_config``) or
``ct_dequantize`` (``CompressedTensorsConfig(dequantize=True)``: the compressed weights are
decompressed into float Linear layers at load).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import report_and_score, run_main, torch_dtype


def auto_class(folder: str):
    import transformers

    cfg = json.loads((Path(folder) / "config.json").read_text())
    vlm = "vision_config" in cfg
    return transformers.AutoModelForImageTextToText if vlm else transformers.AutoModelForCausalLM


def load(job: dict[str, Any]):
    kwargs: dict[str, Any] = {"dtype": torch_dtype(job["dtype"])}
    if job.get("loader") == "ct_dequantize":
        from transformers import CompressedTensorsConfig

        kwargs["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    if job.get("device_map"):
        kwargs["device_map"] = job["device_map"]
    return auto_class(job["folder"]).from_pretrained(job["folder"], **kwargs).eval()


def runner(job: dict[str, Any], res: dict[str, Any]) -> None:
    t0 = time.time()
    model = load(job)
    report_and_score(model, job, res, time.time() - t0)


if __name__ == "__main__":
    sys.exit(run_main(runner))
