"""Wall time and peak memory of RTN, AWQ and GPTQ (W4A16 g128) on a mid-size Qwen2-VL.

The model has the Qwen2-VL architecture, random init (text hidden 1024, 8 layers by default),
saved once to a temporary folder and loaded like a user's checkpoint; calibration is
``--samples`` random token sequences of ``--seq-len`` tokens; only the language model is
quantized. Each method runs in its own process so peak memory is its own.

    python bench/bench_algorithms.py                       # the full setting
    python bench/bench_algorithms.py --samples 32 --seq-len 256 --methods RTN GPTQ

Prints one line per method and a markdown table. No assertion: a benchmark, not a test.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build_model(out: Path, hidden: int, layers: int, inter: int, heads: int, kv_heads: int) -> Path:
    import torch
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLProcessor,
    )

    from llmc.testing import tiny_models as tm
    from llmc.testing import tiny_tokenizers as tt

    tok = tt.qwen_tokenizer(vision=True)
    head_dim = hidden // heads
    q = head_dim // 8  # mrope sections sum to head_dim / 2, split 2:3:3 like the real [16, 24, 24]
    text = {"hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv_heads, "vocab_size": len(tok),
            "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [q, q * 3 // 2, q * 3 // 2]}}
    vision = {"depth": 2, "embed_dim": 256, "hidden_size": hidden, "mlp_ratio": 4, "num_heads": 4,
              "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}
    torch.manual_seed(0)
    cfg = Qwen2VLConfig(text_config=text, vision_config=vision, **tm._qwen_vl_ids(tok))
    model = Qwen2VLForConditionalGeneration(cfg).to(torch.bfloat16)
    model.save_pretrained(out)
    tm._qwen_vl_processor(Qwen2VLProcessor, tok).save_pretrained(out)
    return out


def run_one(args: argparse.Namespace) -> dict:
    import torch

    from llmc.config import parse_config
    from llmc.models import load_adapter
    from llmc.pipeline import resolve_device
    from llmc.runner import quantize_model

    torch.manual_seed(0)
    device = resolve_device(args.device)
    cfg = parse_config({
        "model": {"type": "qwen2_vl", "path": args.model, "dtype": "bfloat16"},
        "quant": {"method": args.one, "weight": {"bit": 4, "group_size": 128}},
        "save": {"save_path": str(Path(args.model).parent / "unused")},
    })
    adapter = load_adapter("qwen2_vl", args.model, dtype="bfloat16")
    vocab = adapter.model.config.text_config.vocab_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, min(vocab, 470), (args.samples, args.seq_len), generator=gen)
    batches = [{"input_ids": ids[i:i + args.bs], "attention_mask": torch.ones_like(ids[i:i + args.bs])}
               for i in range(0, args.samples, args.bs)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    layers = quantize_model(cfg, adapter, device, batches=batches)
    wall = time.perf_counter() - t0
    res = {"method": args.one, "wall_s": round(wall, 1), "layers": len(layers),
           "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}
    if device.type == "cuda":
        res["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--bs", type=int, default=8)
    p.add_argument("--methods", nargs="+", default=["RTN", "AWQ", "GPTQ"])
    p.add_argument("--device", default="auto")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_one(args)))
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(Path(tmp) / "qwen2vl-mid", args.hidden, args.layers, args.intermediate,
                            args.heads, args.kv_heads)
        for m in args.methods:
            cmd = [sys.executable, __file__, "--one", m, "--model", str(model)] + [
                f"--{k}={v}" for k, v in (("samples", args.samples), ("seq-len", args.seq_len), ("bs", args.bs),
                                          ("device", args.device))]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                print(out.stderr[-2000:], file=sys.stderr)
                return 1
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    import torch
    dev = torch.cuda.get_device_name() if args.device != "cpu" and torch.cuda.is_available() else \
        f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
    print(f"\nQwen2-VL architecture, text hidden {args.hidden}, {args.layers} layers, bf16, W4A16 g128, "
          f"{args.samples} x {args.seq_len} tokens, bs {args.bs}, on {dev}, torch threads {torch.get_num_threads()}\n")
    print("| method | wall (s) | peak RSS (GiB) |" + (" peak GPU (GiB) |" if "peak_gpu_gib" in rows[0] else ""))
    print("|---|---|---|" + ("---|" if "peak_gpu_gib" in rows[0] else ""))
    for r in rows:
        gpu = f" {r['peak_gpu_gib']} |" if "peak_gpu_gib" in r else ""
        print(f"| {r['method']} | {r['wall_s']} | {r['peak_rss_gib']} |{gpu}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
