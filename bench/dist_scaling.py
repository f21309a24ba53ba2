"""One quantization on 1 process vs N processes (torchrun): wall time, speedup and CPU time.

The model is ``bench_algorithms.build_model`` (Qwen2-VL architecture, random init, bf16, saved
once to a temporary folder); calibration is ``--samples`` random token sequences of
``--seq-len`` tokens in batches of ``--bs``, only the language model is quantized (W4A16 g128).
The single-process baseline runs without a launcher (exactly today's job); the N-process run is
``python -m torch.distributed.run --nproc_per_node N`` (gloo on CPU, one thread per process;
nccl on GPUs, one GPU per process). Timed: ``quantize_model`` alone, between barriers; CPU time is
the sum over the processes of their CPU time during it.

    python bench/dist_scaling.py                                   # 1 vs 2 processes on CPU
    python bench/dist_scaling.py --nproc 8 --device cuda --hidden 3584 --layers 4   # 8 GPUs

Prints one JSON line per run and a markdown table. A benchmark, not a test.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH)]
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def worker(args: argparse.Namespace) -> None:
    """One process of a run (under torchrun, or alone): quantize, rank 0 prints the figures."""
    import torch

    torch.set_num_threads(args.threads)
    from llmc import distributed as dist
    from llmc.config import parse_config
    from llmc.models import load_adapter
    from llmc.pipeline import resolve_device
    from llmc.runner import quantize_model

    device = dist.init(resolve_device(args.device), timeout_s=1800)
    cfg = parse_config({"model": {"type": "qwen2_vl", "path": args.model, "dtype": "bfloat16"},
                        "quant": {"method": args.method, "weight": {"bit": 4, "group_size": 128}},
                        "save": {"save_path": str(Path(args.model).parent / "unused")}})
    adapter = load_adapter("qwen2_vl", args.model, dtype="bfloat16")
    gen = torch.Generator().manual_seed(0)  # the same batches on every rank; quantize_model shards them
    ids = torch.randint(0, min(adapter.model.config.text_config.vocab_size, 470), (args.samples, args.seq_len),
                        generator=gen)
    batches = [{"input_ids": ids[i:i + args.bs], "attention_mask": torch.ones_like(ids[i:i + args.bs])}
               for i in range(0, args.samples, args.bs)]
    if device.type != "cpu":
        torch.cuda.reset_peak_memory_stats(device)
    dist.barrier()
    t0, c0 = time.perf_counter(), time.process_time()
    quantize_model(cfg, adapter, device, batches=batches)
    cpu = time.process_time() - c0
    dist.barrier()
    wall = time.perf_counter() - t0
    mine = {"cpu_s": cpu, "rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "gpu_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type != "cpu" else None}
    every = dist.gather_objects(mine)
    if dist.is_main():
        print("RESULT " + json.dumps({
            "method": args.method, "procs": dist.world(), "threads": args.threads, "wall_s": round(wall, 1),
            "cpu_s": round(sum(e["cpu_s"] for e in every), 1), "cpu_s_per_proc": [round(e["cpu_s"], 1) for e in every],
            "peak_rss_gib_per_proc": round(max(e["rss_gib"] for e in every), 2),
            "peak_gpu_gib_per_proc": None if every[0]["gpu_gib"] is None else
            round(max(e["gpu_gib"] for e in every), 2),
            "load": round(os.getloadavg()[0], 1)}), flush=True)
    dist.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: argparse.Namespace, model: Path, method: str, procs: int, threads: int) -> dict:
    own = [__file__, "--worker", "--model", str(model), "--method", method, "--threads", str(threads),
           "--device", args.device, "--samples", str(args.samples), "--seq-len", str(args.seq_len),
           "--bs", str(args.bs)]
    if procs == 1:
        cmd = [sys.executable, *own]  # the baseline: no launcher, no process group
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), *own]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    res = json.loads(next(ln for ln in out.stdout.splitlines() if ln.startswith("RESULT "))[7:])
    res["process_wall_s"] = round(time.perf_counter() - t0, 1)  # with start-up and model loading
    print(json.dumps(res), flush=True)
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=2, help="processes of the distributed run (GPUs on CUDA)")
    p.add_argument("--device", default="cpu", help="cpu, or cuda (each process takes cuda:LOCAL_RANK)")
    p.add_argument("--methods", nargs="+", default=["GPTQ", "AWQ"])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=1408)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--bs", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--same-cores", action="store_true",
                   help="also run 1 process with nproc x threads threads (CPU: the same cores used by one process)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return 0
    from bench_algorithms import build_model

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(Path(tmp) / "qwen2vl-mid", args.hidden, args.layers, args.intermediate, args.heads,
                            args.kv_heads)
        for m in args.methods:
            runs = [(1, args.threads), (args.nproc, args.threads)]
            if args.same_cores:
                runs.append((1, args.threads * args.nproc))
            rows += [launch(args, model, m, procs, threads) for procs, threads in runs]
    import torch

    dev = torch.cuda.get_device_name() if args.device != "cpu" else \
        f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
    print(f"\nQwen2-VL architecture, text hidden {args.hidden}, {args.layers} layers, bf16, W4A16 g128, "
          f"{args.samples} x {args.seq_len} tokens, bs {args.bs}, on {dev}\n")
    print("| method | processes x threads | quantize wall (s) | speedup | CPU (s), per process | CPU (s), all "
          "| job wall (s) | peak RSS / process (GiB) | load avg |")
    print("|---|---|---|---|---|---|---|---|---|")
    base = {}
    for r in rows:
        key = r["method"]
        base.setdefault(key, r["wall_s"])
        per = ", ".join(map(str, r["cpu_s_per_proc"]))
        print(f"| {key} | {r['procs']} x {r['threads']} | {r['wall_s']} | {base[key] / r['wall_s']:.2f} | {per} | "
              f"{r['cpu_s']} | {r['process_wall_s']} | {r['peak_rss_gib_per_proc']} | {r['load']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
