"""Quantize one model under several settings and score each on held-out mme_synth questions.

Four sweeps, each printing a markdown table (mme_synth per category + total, and fidelity to the
float model: mean KL over answer positions, answer agreement):

* ``--sweep bits``: the quantization sensitivity table: float, RTN W8/W4/W3/W2 (g32), language
  model only and language + vision;
* ``--sweep methods``: float, RTN W4/W3/W2, AWQ and GPTQ W4/W3 (language + vision): can the
  benchmark tell a good method from a bad one at the same bit width?
* ``--sweep noise``: float and Gaussian noise of 0.3-1.5 x the weight std added to every linear
  but the lm_head: how robust is the model itself?
* ``--sweep token_weight``: one method (``--method``, ``--bits``) with different
  ``quant.token_weight`` settings (image vs text tokens in the calibration statistics).

    python bench/mme_sweep.py --sweep bits
    python bench/mme_sweep.py --sweep methods
    python bench/mme_sweep.py --sweep noise --outlier-scale 0.0625   # the trained weights, no outlier columns
    python bench/mme_sweep.py --sweep token_weight --method GPTQ --bits 3

The figures in ``docs/evaluation.md`` and ``docs/tiny_vlm.md`` use ``--limit 400 --n-fid 64 --n-calib 64``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TOKEN_WEIGHTS = {"none": None, "image=0": {"image": 0.0, "text": 1.0}, "image=0.5": {"image": 0.5, "text": 1.0},
                 "image=2": {"image": 2.0, "text": 1.0}, "text=0": {"image": 1.0, "text": 0.0}}


def settings(a: argparse.Namespace) -> list[tuple[str, dict | None]]:
    """(label, quant section or None for the float model)."""
    if a.sweep == "bits":
        out: list[tuple[str, dict | None]] = [("float", None)]
        for objs in (["language"], ["vision", "language"]):
            for bits in (8, 4, 3, 2):
                out.append((f"RTN W{bits} {'+'.join(objs)}", {"method": "RTN", "quant_objects": objs,
                                                                "weight": weight(a, bits)}))
        return out
    if a.sweep == "methods":
        out = [("float", None)]
        for method, bits in (("RTN", 4), ("RTN", 3), ("RTN", 2), ("AWQ", 4), ("AWQ", 3), ("GPTQ", 4), ("GPTQ", 3)):
            out.append((f"{method} W{bits} vision+language", {"method": method, "quant_objects": ["vision", "language"],
                                                              "weight": weight(a, bits)}))
        return out
    if a.sweep == "noise":
        return [("float", None)] + [(f"weight noise {r:g} std", {"noise": r}) for r in (0.3, 0.6, 1.0, 1.5)]
    return [(f"{a.method} W{a.bits} token_weight {k}",
             {"method": a.method, "quant_objects": ["vision", "language"], "token_weight": v,
              "weight": weight(a, a.bits)}) for k, v in TOKEN_WEIGHTS.items()]


def add_weight_noise(model, rel_std: float, skip: str, seed: int = 0) -> None:
    """``W += rel_std * std(W) * N(0, 1)`` in every linear but ``skip`` (the lm_head): how robust is the model?"""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and name != skip:
                mod.weight += rel_std * mod.weight.std() * torch.randn(mod.weight.shape, generator=gen)


def weight(a: argparse.Namespace, bits: int) -> dict:
    """``quant.weight``: per group of ``--group-size``, or per channel when it is 0."""
    if a.group_size == 0:
        return {"bit": bits, "granularity": "per_channel"}
    return {"bit": bits, "group_size": a.group_size}


def main() -> int:
    import torch

    from llmc.builtin import resolve_builtin
    from llmc.config import EvalConfig, parse_config
    from llmc.eval.fidelity import collect_reference, fidelity
    from llmc.eval.run import evaluate_position, fidelity_samples
    from llmc.models import load_adapter
    from llmc.runner import quantize_model
    from llmc.testing.outliers import plant_outlier_columns

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sweep", choices=("bits", "methods", "noise", "token_weight"), default="bits")
    p.add_argument("--model", default="builtin:tiny_vlm")
    p.add_argument("--type", default="qwen2_vl")
    p.add_argument("--method", default="GPTQ")
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--group-size", type=int, default=32, help="0: per channel")
    p.add_argument("--n-calib", type=int, default=64)
    p.add_argument("--n-fid", type=int, default=64)
    p.add_argument("--limit", type=int, default=600, help="mme_synth questions (whole pairs)")
    p.add_argument("--outlier-scale", type=float, default=0.0,
                   help="first rescale outlier columns (llmc.testing.outliers); 0.0625 undoes the shipped model's x16")
    p.add_argument("--outlier-channels", type=int, default=4)
    p.add_argument("--outlier-seed", type=int, default=0)
    p.add_argument("--categories", nargs="+", default=["existence", "count", "color", "OCR"])
    a = p.parse_args()
    calib, test = resolve_builtin("builtin:mme_synth/calib"), resolve_builtin("builtin:mme_synth/test")
    if a.model.startswith("builtin:"):
        a.model = resolve_builtin(a.model)
    ev = EvalConfig(eval_pos=["fake_quant"], name="mme_synth", path=test, bs=32, max_new_tokens=2,
                    limit=a.limit, fidelity_samples=a.n_fid, categories=a.categories)
    fid_samples = fidelity_samples(ev)
    rows = []
    for label, quant in settings(a):
        adapter = load_adapter(a.type, a.model, dtype="float32")
        if a.outlier_scale:
            plant_outlier_columns(adapter, a.outlier_scale, a.outlier_channels, seed=a.outlier_seed)
        ref = collect_reference(adapter, fid_samples, bs=32, max_new_tokens=2)
        row: dict = {"setting": label}
        if quant is not None and "noise" in quant:
            add_weight_noise(adapter.model, quant["noise"], adapter.model_parts.lm_head)
        elif quant is not None:
            cfg = parse_config({
                "model": {"type": a.type, "path": a.model, "dtype": "float32"},
                "calib": {"name": "custom_mm", "path": calib, "n_samples": a.n_calib, "bs": 8, "seq_len": 512},
                "quant": quant, "save": {"save_path": "/tmp/unused-mme-sweep"}})
            quantize_model(cfg, adapter, torch.device("cpu"))
        if quant is not None:
            f = fidelity(adapter, ref)
            row.update(kl=f"{f['kl']:.3g}", answer_agreement=round(f["answer_agreement"], 3))
        res = next(iter(evaluate_position(adapter, ev, label)["tasks"].values()))
        row.update({c: round(v, 1) for c, v in res["categories"].items()}, total=round(res["total"], 1))
        rows.append(row)
        print(json.dumps(row), flush=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    print(f"\nmodel {a.model}; mme_synth test split, {a.limit} questions; {a.n_calib} calibration samples; "
          f"{'per channel' if a.group_size == 0 else f'group {a.group_size}'}\n")
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(str(r.get(k, "—")) for k in keys) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
