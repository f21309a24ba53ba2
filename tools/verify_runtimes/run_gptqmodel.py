"""Runner: ``GPTQModel.load(folder)`` (GPTQModel's own loader and kernels, CPU).

The returned ``BaseQModel`` wraps the transformers model (``.model``); prompts are scored on that.
Job keys as in ``common``; ``backend`` (optional) names a GPTQModel ``BACKEND`` member.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_processor, nan_report, run_main, score_all, torch_dtype


def runner(job: dict[str, Any], res: dict[str, Any]) -> None:
    from gptqmodel import BACKEND, GPTQModel

    kwargs: dict[str, Any] = {"device": "cpu", "dtype": torch_dtype(job["dtype"])}
    if job.get("backend"):
        kwargs["backend"] = BACKEND[job["backend"]]
    t0 = time.time()
    qmodel = GPTQModel.load(job["folder"], **kwargs)
    res["load_s"] = round(time.time() - t0, 1)
    model = qmodel.model.eval()
    kinds = sorted({type(m).__name__ for m in model.modules() if "Linear" in type(m).__name__})
    res["notes"].append(f"linear classes: {', '.join(kinds)}")
    bad = nan_report(model)
    if bad:
        res["notes"].append(f"non-finite tensors after load: {len(bad)}, e.g. {bad[:3]}")
    score_all(model, load_processor(job["folder"], job.get("images", False)), job, res)


if __name__ == "__main__":
    sys.exit(run_main(runner))
