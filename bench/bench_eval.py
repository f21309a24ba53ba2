"""The one evaluation of bench/vs_llmcompressor.py, identical for both tools (llmc's venv).

Each tool's run leaves ``dequant.safetensors``: every tensor of the language model, the
quantized linears as their dequantized (fake-quantized) bf16 weights, the norms and other
linears as the tool left them (AWQ folds its scales into the norms). The evaluator loads
the float model once (bf16 checkpoint, upcast to float32, SDPA attention), runs it on the
held-out samples (encoded with ``bench_common.encode_folder``), then overwrites its
language tensors with each tool's file and runs it again. Metrics over every position of
every held-out sample (attention mask 1):

* ``kl``: mean KL(p_float || p_quant) of the next-token distribution (nats);
* ``top1``: fraction of positions where both models' most likely next token agree.

float32 compute keeps the metric about the weights: bf16 activations would add rounding
noise of their own to both models.
"""
from __future__ import annotations

from pathlib import Path

import bench_common as bc
import torch


def load_float(model_dir: Path) -> torch.nn.Module:
    from transformers import Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.bfloat16,
                                                            attn_implementation="sdpa")
    return model.float().eval()


@torch.no_grad()
def log_probs(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
    """Per sample, ``[positions, vocab]`` float32 log-softmax at its unmasked positions."""
    out = []
    for b in batches:
        logits = model(**b, use_cache=False).logits[0]
        out.append(logits[b["attention_mask"][0].bool()].float().log_softmax(-1))
    return out


def compare(ref: list[torch.Tensor], cur: list[torch.Tensor]) -> dict[str, float]:
    kl, agree, n = 0.0, 0, 0
    for r, c in zip(ref, cur):
        kl += float((r.exp() * (r - c)).sum(-1).clamp_min(0).double().sum())
        agree += int((r.argmax(-1) == c.argmax(-1)).sum())
        n += r.shape[0]
    return {"kl": kl / n, "top1": agree / n, "positions": n}


@torch.no_grad()
def load_language(model: torch.nn.Module, path: Path, language_keys: set[str]) -> None:
    """Overwrite the language model's tensors with the file's (which must hold all of them)."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    missing, extra = language_keys - set(state), set(state) - language_keys
    if missing or extra:
        raise ValueError(f"{path}: missing {sorted(missing)[:4]}, unexpected {sorted(extra)[:4]}")
    params = dict(model.named_parameters()) | dict(model.named_buffers())
    for key, value in state.items():
        params[key].copy_(value.to(params[key].dtype))


@torch.no_grad()
def rtn_state(model: torch.nn.Module, symmetric: bool) -> dict[str, torch.Tensor]:
    """Round-to-nearest W4 g128 of every language linear, a reference point for the table."""
    from llmc.quant.primitives import QuantSpec, compute_qparams, fake_quantize

    spec = QuantSpec(bits=4, symmetric=symmetric, granularity="per_group", group_size=128)
    state = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.startswith(bc.LANGUAGE_PREFIX):
            w = mod.weight.to(torch.bfloat16).float()
            state[f"{name}.weight"] = fake_quantize(w, *compute_qparams(w, spec), spec).to(torch.bfloat16)
    return state


def evaluate(model_dir: Path, heldout: Path, n: int, seq_len: int, files: dict[str, Path],
             rtn: bool = True) -> dict[str, dict[str, float]]:
    """Metrics of each ``files`` entry (and RTN references) against the float model."""
    model = load_float(model_dir)
    batches = bc.encode_folder(bc.load_processor(model_dir), heldout, n, seq_len)
    ref = log_probs(model, batches)
    float_state = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(bc.LANGUAGE_PREFIX)}
    keys = set(float_state)
    results: dict[str, dict[str, float]] = {}
    for name, path in files.items():
        load_language(model, path, keys)
        results[name] = compare(ref, log_probs(model, batches))
    if rtn:
        for sym in (True, False):
            model.load_state_dict(float_state, strict=False)
            model.load_state_dict(rtn_state(model, sym), strict=False)
            results[f"rtn-{'sym' if sym else 'asym'}"] = compare(ref, log_probs(model, batches))
    results["fingerprint"] = bc.fingerprint(batches)  # type: ignore[assignment]
    return results
