"""llmc vs llm-compressor, side by side: GPTQ and AWQ (W4A16, group 128) on the same model and data.

    export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
    bash bench/setup_llmcompressor.sh                                   # once: the peer's venv
    PYTHONPATH=. .venv/bin/python bench/vs_llmcompressor.py --quick     # pipeline check, minutes
    PYTHONPATH=. .venv/bin/python bench/vs_llmcompressor.py --work /tmp/vs --algos gptq,awq

Builds (once, seeded, cached under ``--work``) a random-init bf16 Qwen2-VL with outlier norm
channels and ``custom_mm`` calibration / held-out folders (``bench_common.prepare``). For each
algorithm row, runs each tool of ``--tools`` in that order, each in its own subprocess with
one torch thread, and measures the child: CPU time (user+sys from ``os.wait4``), wall, peak
RSS (``ru_maxrss``), the load average before and after. Then evaluates every run's saved
weights with the same code (``bench_eval``) and prints the tables. Rows: ``gptq`` (``--n-calib``
samples), ``awq`` (``--awq-samples``), ``awq-full`` (AWQ on ``--n-calib`` samples), ``awq-clip``
(llmc's AWQ as shipped, with its clipping search, beside the peer's AWQ of ``awq-full``: the peer has
no clipping search, so its run is the same job, run once when both rows are asked for).
No assertion on the numbers: a benchmark, not a test.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import bench_common as bc

PEER_PYTHON = "/work/envs/llmcompressor/bin/python"
ROWS = ("gptq", "awq", "awq-full", "awq-clip")
# llmc's quant.special of a row variant, over --llmc-special (the peer's job is the plain row's)
VARIANTS = {"": {}, "clip": {"weight_clip": True}}
SCRIPTS = {"llmc": HERE / "llmc_side.py", "peer": HERE / "peer_llmcompressor.py"}
TOOL_NAMES = {"llmc": "llmc", "peer": "llm-compressor"}
QUICK = {"hidden": 256, "layers": 2, "intermediate": 512, "heads": 4, "kv_heads": 2,
         "image_px": 224, "seq_len": 160, "n_calib": 8, "n_heldout": 4, "awq_samples": 4}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/vs_llmcompressor"),
                   help="cache of model, data and runs (reused when the settings match)")
    p.add_argument("--algos", default="gptq,awq", help="rows, comma-separated: " + ", ".join(ROWS))
    p.add_argument("--tools", default="llmc,peer", help="tools in the order they run: llmc, peer")
    p.add_argument("--n-calib", type=int, default=128, help="calibration samples of gptq and awq-full")
    p.add_argument("--awq-samples", type=int, default=16, help="calibration samples of the awq row")
    p.add_argument("--n-heldout", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=537)
    p.add_argument("--image-px", type=int, default=448)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--attn", default="eager", choices=["eager", "sdpa"],
                   help="llmc's attention (llm-compressor's calibration always runs eager, it forces it)")
    p.add_argument("--bs", type=int, default=1, help="calibration batch size (the peer supports 1)")
    p.add_argument("--peer-python", default=PEER_PYTHON)
    p.add_argument("--llmc-python", default=sys.executable,
                   help="interpreter of llmc's side (e.g. the peer's venv: same torch/transformers)")
    p.add_argument("--quick", action="store_true", help="tiny settings: checks the pipeline in minutes")
    p.add_argument("--skip-existing", action="store_true", help="reuse finished runs of the same settings")
    p.add_argument("--no-rtn", action="store_true", help="skip the RTN reference rows of the evaluation")
    p.add_argument("--no-eval", action="store_true", help="timings only (KL and top-1 shown as -)")
    p.add_argument("--tag", default="", help="name of a separate set of runs (e.g. a repeat) under --work")
    p.add_argument("--llmc-special", default="{}",
                   help='JSON merged into llmc\'s quant.special per algorithm, e.g. \'{"gptq": {"hessian_dtype": '
                        '"bfloat16"}, "awq": {"search_calls": 8}}\' (speed options; their effect is measured)')
    p.add_argument("--json", type=Path, help="also write every figure to this file")
    args = p.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    args.algos = [a.strip() for a in args.algos.split(",") if a.strip()]
    args.tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    bad = [a for a in args.algos if a not in ROWS] + \
          [t for t in args.tools if t not in SCRIPTS]
    if bad:
        p.error(f"unknown algos/tools {bad}")
    return args


def specs(args: argparse.Namespace) -> tuple[bc.ModelSpec, bc.DataSpec]:
    m = bc.ModelSpec(hidden=args.hidden, layers=args.layers, intermediate=args.intermediate,
                     heads=args.heads, kv_heads=args.kv_heads)
    n_pool = max(args.n_calib, args.awq_samples)
    return m, bc.DataSpec(image_px=args.image_px, seq_len=args.seq_len, n_calib=n_pool, n_heldout=args.n_heldout)


def rows(args: argparse.Namespace) -> list[tuple[str, str, int, str]]:
    """(row label, algorithm, calibration samples, row variant: "" or "clip")."""
    table = {"gptq": ("GPTQ", "gptq", args.n_calib, ""), "awq": ("AWQ", "awq", args.awq_samples, ""),
             "awq-full": ("AWQ", "awq", args.n_calib, ""), "awq-clip": ("AWQ, llmc with clip", "awq", args.n_calib, "clip")}
    return [(f"{table[a][0]} ({table[a][2]})", *table[a][1:]) for a in args.algos]


# ------------------------------------------------------------------------------- machine
def machine() -> dict[str, Any]:
    info = {"nproc": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    try:
        text = Path("/proc/cpuinfo").read_text()
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in text.splitlines()
                           if line.startswith("model name"))
        flags = set(next(line for line in text.splitlines() if line.startswith("flags")).split())
        info["avx512_bf16"] = "avx512_bf16" in flags
        info["amx_bf16"] = "amx_bf16" in flags
        mem = Path("/proc/meminfo").read_text().split("\n")[0].split()[1]
        info["mem_gib"] = round(int(mem) / 2**20, 1)
    except (OSError, StopIteration):
        pass
    return info


def llmc_commit() -> str:
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "llmc"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return head + ("+dirty(llmc/)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ------------------------------------------------------------------------------- running
def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
                "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE)])})
    return env


def measure(cmd: list[str], log: Path) -> dict[str, Any]:
    """Run ``cmd`` to completion; its own CPU time, wall time, peak RSS and the load around it."""
    before = os.getloadavg()
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=child_env(), cwd=ROOT)
        _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"rc": proc.returncode, "cpu_s": round(ru.ru_utime + ru.ru_stime, 1), "user_s": round(ru.ru_utime, 1),
            "sys_s": round(ru.ru_stime, 1), "wall_s": round(wall, 1), "rss_gib": round(ru.ru_maxrss / 2**20, 2),
            "load_before": [round(x, 2) for x in before], "load_after": [round(x, 2) for x in os.getloadavg()]}


def run_tool(args: argparse.Namespace, tool: str, algo: str, n: int, paths: dict[str, Path],
             run_dir: Path, variant: str = "") -> dict[str, Any]:
    run_dir.mkdir(parents=True, exist_ok=True)
    done = run_dir / "run.json"
    if args.skip_existing and done.is_file() and (run_dir / "dequant.safetensors").is_file():
        return json.loads(done.read_text()) | {"reused": True}
    job = {"algo": algo, "model": str(paths["model"]), "calib": str(paths["calib"]), "n_calib": n,
           "seq_len": args.seq_len, "bs": args.bs, "out": str(run_dir), "attn": args.attn,
           "special": json.loads(args.llmc_special).get(algo, {}) | (VARIANTS[variant] if tool == "llmc" else {})}
    bc.write_json(run_dir / "job.json", job)
    python = args.llmc_python if tool == "llmc" else args.peer_python
    print(f"[{time.strftime('%H:%M:%S')}] {TOOL_NAMES[tool]} {algo} ({n} samples) ...", flush=True)
    res = measure([python, str(SCRIPTS[tool]), str(run_dir / "job.json")], run_dir / "log.txt")
    if res["rc"]:
        tail = (run_dir / "log.txt").read_text()[-3000:]
        raise RuntimeError(f"{tool} {algo} failed (rc {res['rc']}), log {run_dir / 'log.txt'}:\n{tail}")
    res |= json.loads((run_dir / "result.json").read_text())
    print(f"    cpu {res['cpu_s']} s, wall {res['wall_s']} s, peak RSS {res['rss_gib']} GiB, "
          f"load {res['load_before'][0]} -> {res['load_after'][0]}", flush=True)
    bc.write_json(done, res)
    return res


# ------------------------------------------------------------------------------- tables
def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a is not None and b not in (None, 0) else "-"


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def main_table(results: dict[str, dict[str, dict]]) -> str:
    cols = [("CPU s", "cpu_s", ".0f"), ("wall s", "wall_s", ".0f"), ("peak RSS GiB", "rss_gib", ".2f"),
            ("KL", "kl", ".6f"), ("top-1", "top1", ".4f")]
    head = "| row | " + " | ".join(f"{c} llmc | {c} peer | llmc/peer" for c, _, _ in cols) + " |"
    lines = [head, "|" + "---|" * (1 + 3 * len(cols))]
    for row, by_tool in results.items():
        cells = []
        for _, key, spec in cols:
            a, b = (by_tool.get(t, {}).get(key) for t in ("llmc", "peer"))
            cells += [_fmt(a, spec), _fmt(b, spec), _ratio(a, b)]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def detail_table(results: dict[str, dict[str, dict]]) -> str:
    lines = [("| row | tool | load (wall/cpu s) | data | quantize | save | user s | sys s | "
              "load avg before | load avg after |"), "|" + "---|" * 10]
    for row, by_tool in results.items():
        for tool, r in by_tool.items():
            ph = [f"{r['phases'][k]['wall_s']:.0f}/{r['phases'][k]['cpu_s']:.0f}"
                  for k in ("load", "data", "quantize", "save")]
            lines.append(f"| {row} | {TOOL_NAMES[tool]} | " + " | ".join(ph) + f" | {r['user_s']} | {r['sys_s']} | "
                         f"{' '.join(map(str, r['load_before']))} | {' '.join(map(str, r['load_after']))} |")
    return "\n".join(lines)


def header(args: argparse.Namespace, mspec: bc.ModelSpec, dspec: bc.DataSpec,
           results: dict[str, dict[str, dict]]) -> str:
    m = machine()
    runs = [(tool, r) for by in results.values() for tool, r in by.items()]
    peer_v = next((r["versions"] for tool, r in runs if tool == "peer"), {})
    llmc_v = next((r["versions"] for tool, r in runs if tool == "llmc"), bc.versions())
    yes = {True: "yes", False: "no"}
    stack = (f"llmc {llmc_commit()} (torch {llmc_v.get('torch')}, transformers {llmc_v.get('transformers')}); "
             f"llm-compressor {peer_v.get('llmcompressor', '-')} (torch {peer_v.get('torch', '-')}, "
             f"transformers {peer_v.get('transformers', '-')}, "
             f"compressed-tensors {peer_v.get('compressed-tensors', '-')})")
    model = (f"model: Qwen2-VL random init, bf16, text hidden {mspec.hidden} x {mspec.layers} layers (inter "
             f"{mspec.intermediate}, heads {mspec.heads}/{mspec.kv_heads}), outlier norm channels "
             f"{mspec.outlier_channels} x {mspec.outlier_scale:g}; vision depth {mspec.vision_depth}")
    data = (f"data: {dspec.seq_len} tokens per sample, one {dspec.image_px}x{dspec.image_px} image each; "
            f"held-out {dspec.n_heldout}; calibration bs {args.bs}; 1 torch thread per tool; run order "
            f"{' then '.join(TOOL_NAMES[t] for t in args.tools)}")
    cpu = (f"machine: {m.get('cpu')}, nproc {m['nproc']}, {m.get('mem_gib')} GiB, avx512_bf16 "
           f"{yes[bool(m.get('avx512_bf16'))]}, amx_bf16 {yes[bool(m.get('amx_bf16'))]}; {m['platform']}")
    return "\n".join([
        f"date: {datetime.datetime.now().isoformat(timespec='seconds')}", cpu, stack, model, data,
        ("W4A16 group 128, language model only; GPTQ symmetric, static actorder, damp 0.01; "
         "AWQ asymmetric, duo scaling, 20-point grid, no clip"
         + ("; the 'with clip' row: llmc's AWQ as shipped (weight_clip: true) beside the peer's same AWQ run"
            if any(v for *_, v in rows(args)) else ""))])


def run_dir(runs: Path, algo: str, n: int, tool: str, args: argparse.Namespace, variant: str = "") -> Path:
    """The peer's runs do not depend on ``--attn`` (it calibrates in eager attention regardless) nor on
    the row variant (llmc-only options)."""
    suffix = f"-{args.attn}" if tool == "llmc" and args.attn != "sdpa" else ""
    suffix += f"-{variant}" if tool == "llmc" and variant else ""
    return runs / f"{algo}{n}-{tool}{suffix}"


def run_all(args: argparse.Namespace, paths: dict[str, Path], runs: Path) -> dict[str, dict[str, dict]]:
    results: dict[str, dict[str, dict]] = {}
    done: dict[Path, tuple[str, dict[str, Any]]] = {}  # one job, one run (the peer's AWQ serves awq-full and -clip)
    for row, algo, n, variant in rows(args):
        for tool in args.tools:
            where = run_dir(runs, algo, n, tool, args, variant)
            if where in done:
                first, res = done[where]
                results.setdefault(row, {})[tool] = res | {"same_run_as": first}
                continue
            done[where] = (row, run_tool(args, tool, algo, n, paths, where, variant))
            results.setdefault(row, {})[tool] = done[where][1]
    return results


def evaluate_all(args: argparse.Namespace, paths: dict[str, Path], dspec: bc.DataSpec, runs: Path,
                 results: dict[str, dict[str, dict]]) -> dict[str, dict]:
    """Add KL / top-1 to every run of ``results``; returns the RTN reference rows."""
    import bench_eval

    print(f"[{time.strftime('%H:%M:%S')}] evaluating on {dspec.n_heldout} held-out samples ...", flush=True)
    files = {f"{row}|{tool}": run_dir(runs, algo, n, tool, args, variant) / "dequant.safetensors"
             for row, algo, n, variant in rows(args) for tool in args.tools}
    unique = {str(f): f for f in files.values()}  # a run shared by two rows is evaluated once
    metrics = bench_eval.evaluate(paths["model"], paths["heldout"], dspec.n_heldout, dspec.seq_len, unique,
                                  rtn=not args.no_rtn)
    for key, f in files.items():
        row, tool = key.split("|")
        results[row][tool] = results[row][tool] | metrics[str(f)]
    return {k: v for k, v in metrics.items() if k.startswith("rtn")}


def report(args: argparse.Namespace, mspec: bc.ModelSpec, dspec: bc.DataSpec,
           results: dict[str, dict[str, dict]], rtn: dict[str, dict]) -> None:
    print("\n" + header(args, mspec, dspec, results) + "\n")
    print(main_table(results) + "\n")
    print(detail_table(results) + "\n")
    for k, v in rtn.items():
        print(f"reference {k} (W4 g128 round-to-nearest, no calibration): KL {v['kl']:.6f}, top-1 {v['top1']:.4f}")
    prints = {f"{row} {t}": r["fingerprint"] for row, by in results.items() for t, r in by.items()}
    same = all(len({json.dumps(r["fingerprint"], sort_keys=True) for r in by.values()}) == 1
               for by in results.values())
    print(f"calibration inputs identical across tools (sha256 of input_ids, pixel_values, ...): "
          f"{'yes' if same else 'NO: ' + json.dumps(prints)}")
    for row, by in results.items():
        for t, r in by.items():
            print(f"{row} {TOOL_NAMES[t]}: attn {r['attn_implementation']}, image processor {r['image_processor']}, "
                  f"threads {r['threads']}{', pin_memory patched' if r.get('pin_memory_patched') else ''}"
                  f"{' (reused run)' if r.get('reused') else ''}"
                  f"{' (same run as ' + r['same_run_as'] + ')' if r.get('same_run_as') else ''}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    mspec, dspec = specs(args)
    print(f"[{time.strftime('%H:%M:%S')}] preparing model and data under {args.work} ...", flush=True)
    paths = bc.prepare(args.work, mspec, dspec)
    stack = "" if args.llmc_python == sys.executable else "_llmc-" + Path(args.llmc_python).parent.parent.name
    tag = f"_{args.tag}" if args.tag else ""
    runs = args.work / "runs" / f"{paths['model'].name}_{paths['calib'].parent.name}_bs{args.bs}{stack}{tag}"
    results = run_all(args, paths, runs)
    rtn = {} if args.no_eval else evaluate_all(args, paths, dspec, runs, results)
    report(args, mspec, dspec, results, rtn)
    if args.json:
        bc.write_json(args.json, {"results": results, "rtn": rtn, "machine": machine(),
                                  "args": vars(args) | {"work": str(args.work), "json": str(args.json)}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
