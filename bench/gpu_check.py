"""GPTQ and AWQ W4A16 g128 on a random-init Qwen2.5-VL of 7B shape: wall time, peak GPU memory, peak RSS.

The model is built in memory with the real transformers classes (``Qwen2_5_VLConfig`` with the
published 7B dimensions, bf16, random init on the GPU, then moved to CPU like a loaded checkpoint:
llmc moves one block at a time to the GPU); calibration is ``--samples`` random token sequences of
``--seq-len`` tokens; only the language model is quantized. Each method runs in its own process
(its own peak RSS). ``--blocks K`` quantizes the first K language blocks only (every block still
runs, to chain the inputs); the per-block times are printed as they come, so a run stopped by a
time limit still says how long a block takes.

    python bench/gpu_check.py                  # CUDA: 7B shape, 128 x 2048 tokens
    python bench/gpu_check.py --tiny           # tiny shape, 4 x 64 tokens, CPU (the default without CUDA)

``bench/gpu_check.sh`` runs it after the CUDA tests.
"""
from __future__ import annotations

import argparse
import json
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Qwen2.5-VL-7B-Instruct's config.json (text and vision towers); token ids of its tokenizer
SHAPE_7B = {
    "text": {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
             "num_key_value_heads": 4, "vocab_size": 152064, "max_position_embeddings": 128000,
             "rms_norm_eps": 1e-6, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                                                       "mrope_section": [16, 24, 24]}},
    "vision": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "out_hidden_size": 3584,
               "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
               "fullatt_block_indexes": [7, 15, 23, 31]},
    "ids": {"image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
            "vision_end_token_id": 151653},
    "max_token": 151000,  # random calibration ids stay below the special (vision) tokens
}
SHAPE_TINY = {
    "text": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 512, "bos_token_id": 1,
             "eos_token_id": 2,
             "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]}},
    "vision": {"depth": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 4, "out_hidden_size": 128,
               "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 56,
               "fullatt_block_indexes": [1]},
    "ids": {"image_token_id": 500, "video_token_id": 501, "vision_start_token_id": 502, "vision_end_token_id": 503},
    "max_token": 470,
}


def build_adapter(shape: dict, device: str):
    """A Qwen2.5-VL adapter around a random-init bf16 model of ``shape`` (initialised on ``device``, left on CPU)."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from llmc.models.qwen_vl import Qwen25VLAdapter
    from llmc.testing import tiny_tokenizers as tt

    torch.manual_seed(0)
    cfg = Qwen2_5_VLConfig(text_config=shape["text"], vision_config=shape["vision"], tie_word_embeddings=False,
                           **shape["ids"])
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(cfg, dtype=torch.bfloat16)
    model = model.to("cpu").eval()
    # calibration is token ids: the processor is never called (a tokenizer: no torchvision needed)
    tok = tt.qwen_tokenizer(vision=True)
    return Qwen25VLAdapter(tempfile.gettempdir(), dtype="bfloat16", model=model, processor=tok)


def run_one(args: argparse.Namespace) -> dict:
    import torch
    from loguru import logger

    from llmc.config import parse_config
    from llmc.runner import quantize_model

    shape = SHAPE_TINY if args.tiny else SHAPE_7B
    device = torch.device("cpu" if args.tiny else "cuda")
    blocks_seen: list[float] = []

    def sink(msg) -> None:  # the block loop logs one line per block (file_only): print them now
        m = re.search(r"language block (\d+)/(\d+): ([\d.]+)s", msg.record["message"])
        if m:
            blocks_seen.append(float(m.group(3)))
            print(f"  {args.one} block {m.group(1)}/{m.group(2)}: {m.group(3)}s", flush=True)

    logger.remove()
    logger.add(sink, level="INFO")
    logger.add(sys.stderr, level="WARNING")
    t0 = time.perf_counter()
    adapter = build_adapter(shape, device.type)
    build_s = time.perf_counter() - t0
    layers = shape["text"]["num_hidden_layers"]
    k = min(args.blocks or layers, layers)
    skip = [f"model.language_model.layers.{i}.*" for i in range(k, layers)]
    cfg = parse_config({"model": {"type": "qwen2_5_vl", "path": tempfile.gettempdir(), "dtype": "bfloat16"},
                        "quant": {"method": args.one, "weight": {"bit": 4, "group_size": 128},
                                  "quant_objects": ["language"], "skip_layers": skip},
                        "save": {"save_path": str(Path(tempfile.gettempdir()) / "llmc-gpu-check-unused")}})
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, shape["max_token"], (args.samples, args.seq_len), generator=gen)
    batches = [{"input_ids": ids[i:i + args.bs], "attention_mask": torch.ones_like(ids[i:i + args.bs])}
               for i in range(0, args.samples, args.bs)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t1 = time.perf_counter()
    done = quantize_model(cfg, adapter, device, batches=batches)
    wall = time.perf_counter() - t1
    per_q = sum(blocks_seen[:k]) / max(1, len(blocks_seen[:k]))
    res = {"method": args.one, "quantized_blocks": f"{k}/{layers}", "linears": len(done),
           "build_s": round(build_s, 1), "wall_s": round(wall, 1), "s_per_quantized_block": round(per_q, 2),
           "est_all_blocks_s": round(wall - sum(blocks_seen) + per_q * layers, 1),
           "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
           "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny shape on CPU (automatic without CUDA)")
    p.add_argument("--methods", nargs="+", default=["GPTQ", "AWQ"])
    p.add_argument("--samples", type=int, default=None, help="calibration sequences (128; tiny: 4)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (2048; tiny: 64)")
    p.add_argument("--bs", type=int, default=8)
    p.add_argument("--blocks", type=int, default=0, help="quantize the first K language blocks (0: all)")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    import torch

    args.tiny = args.tiny or not torch.cuda.is_available()
    args.samples = args.samples or (4 if args.tiny else 128)
    args.seq_len = args.seq_len or (64 if args.tiny else 2048)
    if args.one:
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return 0
    import transformers

    where = "CPU (tiny shape)" if args.tiny else torch.cuda.get_device_name()
    print(f"gpu_check: torch {torch.__version__}, transformers {transformers.__version__}, {where}; "
          f"{args.samples} x {args.seq_len} tokens, bs {args.bs}, W4A16 g128", flush=True)
    rows = []
    for m in args.methods:
        cmd = [sys.executable, __file__, "--one", m, f"--samples={args.samples}", f"--seq-len={args.seq_len}",
               f"--bs={args.bs}", f"--blocks={args.blocks}"] + (["--tiny"] if args.tiny else [])
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        for line in proc.stdout:
            if line.startswith("RESULT "):
                rows.append(json.loads(line[7:]))
                print(json.dumps(rows[-1]), flush=True)
            else:
                print(line, end="", flush=True)
        if proc.wait():
            print(f"gpu_check: {m} failed (exit {proc.returncode})", flush=True)
            return 1
    print("\n| method | blocks quantized | wall (s) | s / quantized block | est. all blocks (s) | peak GPU (GiB) "
          "| peak RSS (GiB) | model build (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['quantized_blocks']} | {r['wall_s']} | {r['s_per_quantized_block']} | "
              f"{r['est_all_blocks_s']} | {r['peak_gpu_gib']} | {r['peak_rss_gib']} | {r['build_s']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
