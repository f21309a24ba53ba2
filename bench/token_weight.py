"""Does weighting image vs text tokens in calibration help? (``quant.token_weight``)

Quantizes one model several times with AWQ or GPTQ, each with a different
``token_weight``, and reports the fidelity to the float model (mean KL over answer
positions, answer agreement) on held-out mme_synth test questions, plus the mme_synth
score when ``--mme`` is given.

    python bench/token_weight.py --model llmc/assets/tiny_qwen2vl_mme --method GPTQ --bits 3
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

VARIANTS = {"none": None, "image=0": {"image": 0.0, "text": 1.0}, "image=0.5": {"image": 0.5, "text": 1.0},
            "image=2": {"image": 2.0, "text": 1.0}, "text=0": {"image": 1.0, "text": 0.0}}


def main() -> int:
    import torch

    from llmc.builtin import resolve_builtin
    from llmc.calib import load_samples
    from llmc.config import EvalConfig, parse_config
    from llmc.eval.fidelity import collect_reference, fidelity
    from llmc.eval.run import evaluate_position, fidelity_samples
    from llmc.models import load_adapter
    from llmc.runner import quantize_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--type", default="qwen2_vl")
    p.add_argument("--method", default="GPTQ")
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--n-calib", type=int, default=64)
    p.add_argument("--n-fid", type=int, default=64)
    p.add_argument("--mme", action="store_true", help="also score mme_synth (test split)")
    p.add_argument("--limit", type=int, default=300)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS))
    a = p.parse_args()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    calib = resolve_builtin("builtin:mme_synth/calib")
    test = resolve_builtin("builtin:mme_synth/test")
    ev = EvalConfig(eval_pos=["fake_quant"], name="mme_synth", path=test, bs=16, max_new_tokens=2,
                    limit=a.limit, fidelity_samples=a.n_fid)
    samples = fidelity_samples(ev)
    rows = []
    for name in a.variants:
        cfg = parse_config({
            "model": {"type": a.type, "path": a.model, "dtype": "float32"},
            "calib": {"name": "custom_mm", "path": calib, "n_samples": a.n_calib, "bs": 8, "seq_len": 512},
            "quant": {"method": a.method, "quant_objects": ["vision", "language"], "token_weight": VARIANTS[name],
                      "weight": {"bit": a.bits, "group_size": a.group_size}},
            "save": {"save_path": "/tmp/unused-token-weight"},
        })
        adapter = load_adapter(a.type, a.model, dtype="float32")
        ref = collect_reference(adapter, samples, bs=16, max_new_tokens=2)
        quantize_model(cfg, adapter, torch.device("cpu"))
        row = {"token_weight": name, **{k: round(v, 5) for k, v in fidelity(adapter, ref).items()}}
        if a.mme:
            res = evaluate_position(adapter, ev, "fake_quant")
            row["mme_synth_total"] = round(next(iter(res["tasks"].values()))["total"], 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{a.method} W{a.bits} g{a.group_size}, {a.n_calib} calibration samples, model {a.model}\n")
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(str(r[k]) for k in keys) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
