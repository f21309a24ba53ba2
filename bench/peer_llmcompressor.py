"""llm-compressor's side of bench/vs_llmcompressor.py (run with the venv of bench/setup_llmcompressor.sh).

    /work/envs/llmcompressor/bin/python bench/peer_llmcompressor.py JOB.json

Same JOB keys and outputs as ``bench/llmc_side.py``: ``oneshot`` with a GPTQModifier
(scheme W4A16: symmetric int4, group 128; actorder static, dampening 0.01, block 128) or
an AWQModifier (duo_scaling, n_grid 20; llm-compressor's AWQ has no clipping search)
followed by a QuantizationModifier (W4A16_ASYM), language model only, the sequential pipeline over ``Qwen2VLDecoderLayer``.
Calibration batches come from ``bench_common.encode_folder`` (same folder, processor,
chat template and length as llmc) and are handed to ``oneshot`` as a DataLoader.

CPU-only patch: llm-compressor 0.14.0.1's AWQ pins the cached activations of each mapping
(``IntermediatesCache.pin_memory``) unconditionally, and ``Tensor.pin_memory`` raises
"Cannot access accelerator device when none is available" without an accelerator.
:func:`patch_pin_memory` makes that method a no-op when no accelerator exists (pinning
only speeds up host-to-device copies, and on CPU there are none).
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

import json

import bench_common as bc
import torch

IGNORE = ["lm_head", "re:.*visual.*"]  # language model only, as llmc's quant_objects: [language]


def patch_pin_memory() -> bool:
    """No-op ``IntermediatesCache.pin_memory`` without an accelerator; True when patched.

    ``BENCH_PEER_NO_PIN_PATCH=1`` leaves it alone (to see the failure it works around).
    """
    if torch.accelerator.is_available() or os.environ.get("BENCH_PEER_NO_PIN_PATCH") == "1":
        return False
    from llmcompressor.pipelines.cache import IntermediatesCache

    IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None
    return True


def record_awq_scales(store: dict[str, dict[str, Any]]) -> None:
    """Wrap ``AWQModifier._compute_best_scale`` (not edited) so that each mapping's chosen scales land
    in ``store``: smooth layer name -> ``{"scales", "consumers"}``, the format of ``awq_scales.pt``
    (see bench/awq_rounding.py)."""
    from llmcompressor.modifiers.transform.awq import base

    search = base.AWQModifier._compute_best_scale

    def recorded(self, mapping, *args, **kwargs):
        scales = search(self, mapping, *args, **kwargs)
        store[mapping.smooth_name] = {"scales": scales.detach().float().cpu(),
                                      "consumers": list(mapping.balance_names)}
        return scales

    base.AWQModifier._compute_best_scale = recorded


def recipe(algo: str) -> Any:
    if algo == "gptq":
        from llmcompressor.modifiers.gptq import GPTQModifier

        return GPTQModifier(targets="Linear", scheme="W4A16", ignore=IGNORE, actorder="static",
                            dampening_frac=0.01, block_size=128)
    if algo == "awq":
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from llmcompressor.modifiers.transform.awq import AWQModifier

        # 0.14: AWQ only smooths; the QuantizationModifier after it sets the scheme and quantizes
        return [AWQModifier(duo_scaling=True, n_grid=20),
                QuantizationModifier(targets="Linear", scheme="W4A16_ASYM", ignore=IGNORE)]
    raise ValueError(f"unknown algo {algo!r}")


@torch.no_grad()
def dequantized_state(model: torch.nn.Module, keys: set[str]) -> dict[str, torch.Tensor]:
    """The model's tensors named ``keys`` (those of the float model: no scales, zero points)
    with every quantized weight replaced by its fake-quantized value."""
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    state = {k: v for k, v in model.state_dict().items() if k in keys}
    done = 0
    for name, mod in model.named_modules():
        args = getattr(getattr(mod, "quantization_scheme", None), "weights", None)
        if args is None or not hasattr(mod, "weight_scale"):
            continue
        state[f"{name}.weight"] = forward_quantize(mod, mod.weight, "weight", args).to(mod.weight.dtype)
        done += 1
    if not done:
        raise RuntimeError("no quantized module found after oneshot")
    return state


def main(job_path: str) -> None:
    from llmcompressor import oneshot
    from torch.utils.data import DataLoader
    from transformers import Qwen2VLForConditionalGeneration

    bc.set_threads(1)
    job = json.loads(Path(job_path).read_text())
    out = Path(job["out"])
    if job["bs"] != 1:
        raise ValueError("the peer side calibrates with batch size 1 (llm-compressor's default)")
    patched = patch_pin_memory()
    awq_scales: dict[str, dict[str, Any]] = {}
    if job["algo"] == "awq":
        record_awq_scales(awq_scales)
    phases = bc.Phases()

    torch.manual_seed(42)
    model = Qwen2VLForConditionalGeneration.from_pretrained(job["model"], dtype=torch.bfloat16,
                                                            attn_implementation="sdpa")
    model.eval()
    float_keys = set(model.state_dict())
    processor = bc.load_processor(job["model"])
    phases.mark("load")
    batches = bc.encode_folder(processor, job["calib"], job["n_calib"], job["seq_len"])
    phases.mark("data")
    oneshot(model=model, processor=processor, recipe=recipe(job["algo"]),
            dataset=DataLoader(batches, batch_size=None, shuffle=False),
            pipeline="sequential", sequential_targets=["Qwen2VLDecoderLayer"])
    phases.mark("quantize")
    n = bc.save_language_weights(dequantized_state(model, float_keys), out / "dequant.safetensors")
    if awq_scales:
        torch.save(awq_scales, out / "awq_scales.pt")
    phases.mark("save")
    bc.write_json(out / "result.json", {
        "tool": "llm-compressor", "algo": job["algo"], "phases": phases.times, "fingerprint": bc.fingerprint(batches),
        "n_batches": len(batches), "saved_tensors": n, "versions": bc.versions(),
        # llm-compressor's calibration_forward_context forces eager attention while calibrating
        "attn_implementation": f"eager in calibration (loaded {model.config._attn_implementation})",
        "image_processor": type(processor.image_processor).__name__, "pin_memory_patched": patched,
        "threads": torch.get_num_threads(), "recipe": repr(recipe(job["algo"]))})


if __name__ == "__main__":
    main(sys.argv[1])
