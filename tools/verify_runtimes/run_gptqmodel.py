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
from common import report_and_score, run_main, torch_dtype


def runner(job: dict[str, Any], res: dict[str, Any]) -> None:
    from gptqmodel import BACKEND, GPTQModel

    kwargs: dict[str, Any] = {"device": "cpu", "dtype": torch_dtype(job["dtype"])}
    if job.get("backend"):
        kwargs["backend"] = BACKEND[job["backend"]]
    t0 = time.time()
    qmodel = GPTQModel.load(job["folder"], **kwargs)
    report_and_score(qmodel.model.eval(), job, res, time.time() - t0)


if __name__ == "__main__":
    sys.exit(run_main(runner))
