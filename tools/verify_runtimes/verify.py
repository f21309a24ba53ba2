"""Prove that llmc's exports load and match in the runtimes that serve them (a script, not a test).

    export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
    PYTHONPATH=. /work/main/.venv/bin/python tools/verify_runtimes/verify.py [--quick] [--envs /work/envs]

Builds the small models, quantizes them with llmc (RTN W4), writes every export (exports.py), then
runs each export in every runtime that claims its format, each in its own venv (setup_envs.sh) as
a subprocess ``run_<runtime>.py JOB OUT``, and compares with the ``fake/`` reference (compare.py).
One failing cell never stops the matrix. Everything lands under ``--work`` (results/, logs/).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import compare
import exports as E
from prompts import make_prompts

MAX_NEW_TOKENS = 8
KERNEL_LINE = re.compile(r"(Using \w*Kernel\w*|Kernel: selected[^\n]{0,60}|select_quant_linear[^\n]{0,80}|"
                         r"QuantLinear[^\n]{0,60}|Unsupported[^\n]{0,200}|Missing required[^\n]{0,200}|"
                         r"Kernel: loaded[^\n]{0,80}|[^\n|]{0,120}\| MISMATCH \|[^\n]{0,140})")


@dataclass(frozen=True)
class Runtime:
    """A runtime: which venv, which runner, which formats it claims, how it is run."""

    name: str
    env: str | None        # venv under --envs; None: llmc's own interpreter
    script: str
    formats: frozenset[str]
    dtype: str
    extra: tuple[tuple[str, Any], ...] = ()
    only_asym: bool = False
    only: str = ""         # regex on export names this runtime is limited to (time on 2 cores)
    skip: str = ""         # regex on export names left out
    timeout: int = 900

    def python(self, envs: Path) -> Path:
        return Path(sys.executable) if self.env is None else envs / self.env / "bin" / "python"


RUNTIMES = (
    Runtime("transformers", None, "run_hf.py", frozenset({"ct"}), "float32"),
    Runtime("transformers dequantize=True", None, "run_hf.py", frozenset({"ct"}), "float32",
            (("loader", "ct_dequantize"),), only_asym=True),
    # vLLM 0.32 loads no transformers-5 LLaVA-SigLIP folder (float fake/ included): one cell shows it
    Runtime("vllm", "vllm", "run_vllm.py", frozenset({"ct", "awq", "gptq"}), "float16",
            skip=r"^llava-.*/(awq|gptq-auto)$"),
    # bfloat16: in float32 GPTQModel 7.7.0 picks TorchFusedLinear, whose CPU path drops the zero points
    # (wrong output for asymmetric GPTQ; docs/runtimes.md)
    Runtime("gptqmodel", "gptqmodel", "run_gptqmodel.py", frozenset({"awq", "gptq"}), "bfloat16"),
    # ~200 s a cell (its CPU kernels dequantize on every forward): the cells that answer a question
    Runtime("transformers+gptqmodel", "gptqmodel", "run_hf.py", frozenset({"awq", "gptq"}), "float32",
            only=r"^qwen2_vl-asym-g32-l/(awq|gptq-auto)$|^qwen2_vl-sym-g128-l/gptq-auto$|^qwen2_vl-asym-g128-vl/awq$"),
)


def child_env(runtime: Runtime) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if runtime.env is None:
        env["PYTHONPATH"] = os.environ.get("PYTHONPATH", "")
    if runtime.env == "vllm":
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    return env


def run_runner(runtime: Runtime, job: dict[str, Any], out: Path, envs: Path, log: Path) -> dict[str, Any]:
    """Run one runner subprocess; a crash, a timeout or a missing venv becomes an error result."""
    out.parent.mkdir(parents=True, exist_ok=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    job_path = out.with_suffix(".job.json")
    job_path.write_text(json.dumps(job))
    py = runtime.python(envs)
    if not py.exists():
        return {"ok": False, "error": f"venv missing: {py} (run tools/verify_runtimes/setup_envs.sh)"}
    out.unlink(missing_ok=True)
    cmd = [str(py), str(HERE / runtime.script), str(job_path), str(out)]
    t0 = time.time()
    with log.open("w") as fh:
        try:
            rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=child_env(runtime),
                                timeout=runtime.timeout, cwd=str(out.parent), check=False).returncode
        except subprocess.TimeoutExpired:
            return {"ok": False, "error": f"timeout after {runtime.timeout}s (log {log})"}
    if not out.exists():
        tail = log.read_text(errors="replace")[-1500:]
        return {"ok": False, "error": f"runner exited {rc} without a result ({time.time() - t0:.0f}s): {tail}"}
    return json.loads(out.read_text())


def log_notes(res: dict[str, Any], log: Path) -> dict[str, Any]:
    """Add the runner log's telling lines (kernel choice, refusals, size mismatches) to the notes."""
    if log.exists():
        lines = sorted({m.group(0).strip() for m in KERNEL_LINE.finditer(log.read_text(errors="replace"))})
        res.setdefault("notes", []).extend(f"log: {k}" for k in lines[:6])
    return res


def job_for(folder: str, runtime: Runtime, prompts: list[dict], images: bool) -> dict[str, Any]:
    return {"folder": folder, "dtype": runtime.dtype, "prompts": prompts, "max_new_tokens": MAX_NEW_TOKENS,
            "images": images, **dict(runtime.extra)}


def reference(variant: E.Variant, work: Path, prompts: list[dict], images: bool,
              reuse: bool = False) -> tuple[dict, compare.Diff]:
    """The fake folder in transformers float32 (reference) and bfloat16 (its yardstick diff)."""
    folder = str(work / "exports" / variant.name / "fake")
    res = {}
    for dtype in ("float32", "bfloat16"):
        rt = Runtime(f"reference {dtype}", None, "run_hf.py", frozenset(), dtype)
        out = work / "results" / variant.name / f"fake_{dtype}.json"
        if reuse and out.exists():
            res[dtype] = json.loads(out.read_text())
            continue
        res[dtype] = run_runner(rt, job_for(folder, rt, prompts, images), out, Path("/"),
                                work / "logs" / f"{variant.name}__fake_{dtype}.log")
        if not res[dtype].get("ok"):
            raise RuntimeError(f"reference {variant.name} {dtype} failed: {res[dtype].get('error')}")
    return res["float32"], compare.diff(res["float32"], res["bfloat16"])


def claims(runtime: Runtime, exp: E.Export) -> bool:
    if runtime.only and not re.search(runtime.only, exp.name) or runtime.skip and re.search(runtime.skip, exp.name):
        return False
    return exp.fmt in runtime.formats and not (runtime.only_asym and exp.variant.symmetric)


def run_cells(exps: list[E.Export], runtimes: list[Runtime], work: Path, envs: Path,
              written: dict[str, str], reuse: bool = False) -> list[compare.Cell]:
    cells: list[compare.Cell] = []
    for variant in dict.fromkeys(e.variant for e in exps):
        model_dir = E.build_model(variant.model, work)
        prompts = make_prompts(model_dir, work)
        images = any(p["kind"] == "image" for p in prompts)
        ref, yard = reference(variant, work, prompts, images, reuse)
        for exp in (e for e in exps if e.variant == variant):
            folder = written[exp.name]
            for rt in (r for r in runtimes if claims(r, exp)):
                if folder.startswith("EXPORT ERROR"):
                    cells.append(compare.Cell(exp.name, rt.name, "FAIL export", "", error=folder))
                    continue
                slug = f"{exp.name.replace('/', '__')}__{rt.name.replace(' ', '_').replace('=', '')}"
                t0 = time.time()
                out = work / "results" / f"{slug}.json"
                log = work / "logs" / f"{slug}.log"
                if reuse and out.exists():
                    res = json.loads(out.read_text())
                else:
                    res = run_runner(rt, job_for(folder, rt, prompts, images), out, envs, log)
                res = log_notes(res, log)
                cell = compare.judge(exp.name, rt.name, ref, yard, res)
                cell.notes = res.get("notes", [])  # type: ignore[attr-defined]
                print(f"[verify] {exp.name} x {rt.name}: {cell.verdict} {cell.detail} "
                      f"({time.time() - t0:.0f}s) {cell.error or ''}"[:400], flush=True)
                cells.append(cell)
    return cells


def env_versions(runtimes: list[Runtime], envs: Path) -> dict[str, dict[str, str]]:
    code = "import json, sys; sys.path.insert(0, sys.argv[1]); import common; print(json.dumps(common.versions()))"
    out = {}
    for key in dict.fromkeys(r.env for r in runtimes):
        py = Runtime("", key, "", frozenset(), "").python(envs)
        name = key or "llmc (transformers)"
        try:
            out[name] = json.loads(subprocess.run([str(py), "-c", code, str(HERE)], capture_output=True, text=True,
                                                  timeout=300, check=True).stdout.strip().splitlines()[-1])
        except Exception as exc:  # noqa: BLE001
            out[name] = {"error": str(exc)[:200]}
    return out


def header(runtimes: list[Runtime], envs: Path) -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    mem = int(next(ln.split()[1] for ln in Path("/proc/meminfo").read_text().splitlines()
                   if ln.startswith("MemTotal"))) / 2**20
    lines = [f"date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M UTC}",
             f"machine: {os.cpu_count()} CPU cores ({cpu}), {mem:.0f} GiB RAM, no GPU, {platform.platform()}"]
    for env, v in env_versions(runtimes, envs).items():
        lines.append(f"venv {env}: " + ", ".join(f"{k} {x}" for k, x in v.items()))
    return "\n".join(f"- {ln}" for ln in lines)


def failures(cells: list[compare.Cell]) -> str:
    out = []
    for c in cells:
        if c.verdict != "PASS":
            notes = "".join(f"\n  {n}" for n in getattr(c, "notes", []))
            out.append(f"- {c.export} x {c.runtime}: {c.verdict} {c.detail}\n  error: "
                       f"`{compare.short_error(c.error, 600)}`{notes}")
    return "\n".join(out) or "- none"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="Qwen2-VL only, one export per format question")
    p.add_argument("--envs", type=Path, default=Path(os.environ.get("ENVS", "/work/envs")), help="venvs root")
    p.add_argument("--work", type=Path, default=Path("/tmp/llmc_verify_runtimes"), help="models, exports, results")
    p.add_argument("--runtimes", default=",".join(r.name for r in RUNTIMES), help="comma list of runtime names")
    p.add_argument("--only", default="", help="regex on export names (e.g. 'qwen2_vl-asym')")
    p.add_argument("--reuse", action="store_true",
                   help="keep existing exports (written.json) and cell results under --work; rerun only missing ones")
    p.add_argument("--md", type=Path, help="also write the report here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    names = [n.strip() for n in args.runtimes.split(",") if n.strip()]
    runtimes = [r for r in RUNTIMES if r.name in names]
    exps = [e for e in E.plan(args.quick) if re.search(args.only, e.name)]
    head = header(runtimes, args.envs)
    print(head, flush=True)
    written: dict[str, str] = {}
    for variant in dict.fromkeys(e.variant for e in exps):
        done = args.work / "exports" / variant.name / "written.json"
        if args.reuse and done.exists():
            written |= json.loads(done.read_text())
            continue
        written |= E.write_variant(variant, [e for e in exps if e.variant == variant], args.work)
    cells = run_cells(exps, runtimes, args.work, args.envs, written, args.reuse)
    report = (f"{head}\n- rule: {compare.__doc__.split('Verdict of one cell', 1)[1].strip()}\n\n"
              f"{compare.matrix(cells)}\n\nNot passing:\n{failures(cells)}\n")
    print("\n" + report)
    (args.work / "report.md").write_text(report)
    if args.md:
        args.md.write_text(report)
    notes = {f"{c.export} x {c.runtime}": getattr(c, "notes", []) for c in cells}
    (args.work / "notes.json").write_text(json.dumps(notes, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
