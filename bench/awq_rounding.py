"""AWQ's scales and the final rounding's arithmetic, measured apart (llmc's venv).

    PYTHONPATH=. .venv/bin/python bench/awq_rounding.py --work /tmp/vsfull --tag final
    PYTHONPATH=. .venv/bin/python bench/awq_rounding.py --work /tmp/vsfull --tag final \\
        --roundings llmc,ct,ct-f32,emu:S,emu:QA,emu:Z,emu:SQA       # which bf16 step matters

Both sides of ``bench/vs_llmcompressor.py`` leave the AWQ scales they chose (``awq_scales.pt``: smooth
layer -> scales and consumers). This script folds each tool's scales into the float bf16 model the way
both tools fold them (producer ``/ s``, consumers ``* s``, each rounded to bf16), rounds every language
linear (W4 asymmetric, group 128) with each arithmetic, and evaluates all of them with the benchmark's
evaluation (``bench_eval``: mean KL and top-1 against the float model on the held-out samples):

* ``llmc``: llmc's RTN (``compute_qparams`` + ``fake_quantize``: float32 qparams and codes); with
  llmc's scales this is llmc's AWQ output bit for bit;
* ``ct``: compressed-tensors' ``calculate_qparams`` + ``fake_quantize`` on the bf16 weights, as
  llm-compressor's QuantizationModifier computes them (bf16 min/max, scale, zero point and quotient);
  with llm-compressor's scales this is its AWQ output;
* ``ct-f32``: the same functions on float32 weights;
* ``emu:STEPS``: the library's formula in float32, with the chosen steps rounded to bf16: ``S`` the
  scale (``(max - min) / 15``), ``Z`` the zero point, ``Q`` the quotient ``w / scale``, ``A`` the sum
  ``w / scale + zero``; ``emu:SZQA`` equals ``ct`` and ``emu:`` equals ``ct-f32``;
* ``jitter:SEED``: llmc's RTN with each group's scale multiplied by ``1 + u * 2^-8`` (``u`` uniform in
  [-1, 1], seeded): equally valid roundings whose spread shows the KL's sensitivity to rounding alone.

Rows: each tool's scales and ``none`` (plain RTN); the tools' own outputs are evaluated alongside.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench_common as bc
import torch

if TYPE_CHECKING:
    from llmc.quant.primitives import QuantSpec

Rounding = Callable[[torch.Tensor], torch.Tensor]
BITS, GROUP = 4, 128
LOW, HIGH = -(2 ** (BITS - 1)), 2 ** (BITS - 1) - 1  # compressed-tensors' signed code range


def llmc_spec() -> QuantSpec:
    from llmc.quant.primitives import QuantSpec

    return QuantSpec(bits=BITS, symmetric=False, granularity="per_group", group_size=GROUP)


def llmc_rtn(w: torch.Tensor) -> torch.Tensor:
    from llmc.quant.primitives import rtn_fake_quantize

    return rtn_fake_quantize(w.float(), llmc_spec()).to(torch.bfloat16)


def ct_rtn(dtype: torch.dtype) -> Rounding:
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    args = QuantizationArgs(num_bits=BITS, type="int", symmetric=False, group_size=GROUP, strategy="group")

    def rnd(w: torch.Tensor) -> torch.Tensor:
        x = w.to(dtype)
        g = x.reshape(x.shape[0], -1, GROUP)
        scale, zero = calculate_qparams(g.amin(-1), g.amax(-1), args)
        return fake_quantize(x, scale, zero, args).to(torch.bfloat16)

    return rnd


def emulated_rtn(steps: str) -> Rounding:
    """compressed-tensors' asymmetric formula in float32, the steps named in ``steps`` rounded to bf16."""
    bad = set(steps) - set("SZQA")
    if bad:
        raise ValueError(f"emu:{steps}: unknown steps {sorted(bad)}; valid: S, Z, Q, A")

    def b(t: torch.Tensor, step: str) -> torch.Tensor:
        return t.to(torch.bfloat16).float() if step in steps else t

    def rnd(w: torch.Tensor) -> torch.Tensor:
        g = w.float().reshape(w.shape[0], -1, GROUP)
        low, high = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
        scale = b(b(high - low, "S") / (HIGH - LOW), "S")
        zero = torch.round(b(LOW - b(low / scale, "Z"), "Z")).clamp(LOW, HIGH)
        v = b(b(g / scale[..., None], "Q") + zero[..., None], "A")
        q = torch.round(v).clamp(LOW, HIGH)
        return ((q - zero[..., None]) * scale[..., None]).reshape(w.shape).to(torch.bfloat16)

    return rnd


def jittered_rtn(seed: int) -> Rounding:
    """llmc's RTN with every group's scale multiplied by ``1 + u * 2^-8``, ``u`` uniform in [-1, 1] (the
    size of a bf16 rounding): an equally valid rounding; its spread is the metric's rounding noise."""
    from llmc.quant.primitives import compute_qparams, fake_quantize

    spec = llmc_spec()
    gen = torch.Generator().manual_seed(seed)

    def rnd(w: torch.Tensor) -> torch.Tensor:
        wf = w.float()
        scale, _ = compute_qparams(wf, spec)
        scale = scale * (1 + (torch.rand(scale.shape, generator=gen) * 2 - 1) * 2**-8)
        low = wf.reshape(w.shape[0], -1, GROUP).amin(-1).clamp(max=0)
        zero = torch.round(-low / scale).clamp(0, 2**BITS - 1)
        return fake_quantize(wf, scale, zero, spec).to(torch.bfloat16)

    return rnd


def rounding(name: str) -> Rounding:
    if name.startswith("emu:"):
        return emulated_rtn(name[4:])
    if name.startswith("jitter:"):
        return jittered_rtn(int(name[7:]))
    table = {"llmc": lambda: llmc_rtn, "ct": lambda: ct_rtn(torch.bfloat16), "ct-f32": lambda: ct_rtn(torch.float32)}
    if name not in table:
        raise ValueError(f"unknown rounding {name!r}; valid: {sorted(table)} or emu:STEPS (S, Z, Q, A) or jitter:SEED")
    return table[name]()


@torch.no_grad()
def folded_and_rounded(base: dict[str, torch.Tensor], scales: dict[str, dict], rnd: Rounding) -> dict[str, torch.Tensor]:
    """``base`` (bf16 language tensors) with ``scales`` folded, then every decoder linear rounded."""
    state = dict(base)
    for producer, entry in scales.items():
        s = entry["scales"].float()
        w = state[f"{producer}.weight"].float()
        state[f"{producer}.weight"] = (w / s if w.dim() == 1 else w / s[:, None]).to(torch.bfloat16)
        bias = state.get(f"{producer}.bias")
        if bias is not None and w.dim() == 2:
            state[f"{producer}.bias"] = (bias.float() / s).to(torch.bfloat16)
        for name in entry["consumers"]:
            state[f"{name}.weight"] = (state[f"{name}.weight"].float() * s[None, :]).to(torch.bfloat16)
    return {k: rnd(v) if ".layers." in k and k.endswith("_proj.weight") else v for k, v in state.items()}


def find_runs(work: Path, tag: str, row: str) -> tuple[Path, Path, list[Path]]:
    """The model folder, the data folder and the ``row`` runs (with ``awq_scales.pt``) of ``tag``."""
    models = sorted(p for p in work.glob("model-*") if p.is_dir())
    data = sorted(p for p in work.glob("data-*") if p.is_dir())
    runs = [r for r in sorted(work.glob(f"runs/*_bs1{'_' + tag if tag else ''}/{row}-*"))
            if (r / "awq_scales.pt").is_file()]
    if len(models) != 1 or len(data) != 1 or not runs:
        raise SystemExit(f"need one model-*, one data-* and runs with awq_scales.pt under {work} "
                         f"(tag {tag!r}, row {row!r}); found {models}, {data}, {runs}")
    return models[0], data[0], runs


def load_sources(runs: list[Path], wanted: list[str] | None) -> dict[str, dict]:
    """Scale source name -> ``awq_scales.pt`` content; ``none`` (plain RTN) is empty."""
    sources = {"none": {}} | {r.name.split("-", 1)[1]: torch.load(r / "awq_scales.pt") for r in runs}
    unknown = set(wanted or []) - set(sources)
    if unknown:
        raise SystemExit(f"--sources: unknown {sorted(unknown)}; valid: {sorted(sources)}")
    return {k: v for k, v in sources.items() if wanted is None or k in wanted}


def evaluate_all(model_dir: Path, data_dir: Path, sources: dict[str, dict], roundings: list[str],
                 runs: list[Path]) -> dict[str, dict[str, float]]:
    """bench_eval's metrics of every (source, rounding) model and of each run's own output."""
    import bench_eval
    from transformers import Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.bfloat16)
    base = {k: v for k, v in model.state_dict().items() if k.startswith(bc.LANGUAGE_PREFIX)}
    del model
    files: dict[str, Path] = {f"{r.name} (the tool's own output)": r / "dequant.safetensors" for r in runs}
    spec = json.loads((data_dir / "spec.json").read_text())
    with tempfile.TemporaryDirectory(prefix="awq-rounding-") as tmp:
        for src, scales in sources.items():
            for rname in roundings:  # a fresh rounding per source: jitter draws the same numbers
                path = Path(tmp) / f"{src}_{len(files)}.safetensors"
                bc.save_language_weights(folded_and_rounded(base, scales, rounding(rname)), path)
                files[f"scales {src}, rounding {rname}"] = path
        return bench_eval.evaluate(model_dir, data_dir / "heldout", spec["n_heldout"], spec["seq_len"], files,
                                   rtn=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="the --work folder of vs_llmcompressor.py")
    ap.add_argument("--tag", default="", help="the runs' --tag")
    ap.add_argument("--row", default="awq128", help="run name prefix (awq128: AWQ on 128 samples, awq16)")
    ap.add_argument("--roundings", default="llmc,ct")
    ap.add_argument("--sources", default=None, help="scale sources (none, llmc..., peer); default: all")
    a = ap.parse_args()
    roundings = a.roundings.split(",")
    for name in roundings:
        rounding(name)  # a bad name fails here, before anything loads
    model_dir, data_dir, runs = find_runs(a.work, a.tag, a.row)
    sources = load_sources(runs, a.sources.split(",") if a.sources else None)
    runs = [r for r in runs if r.name.split("-", 1)[1] in sources]
    res = evaluate_all(model_dir, data_dir, sources, roundings, runs)
    print(f"| scales \\ rounding | {' | '.join(roundings)} |\n|---|{'---|' * len(roundings)}")
    for src in sources:
        cells = [res[f"scales {src}, rounding {r}"] for r in roundings]
        print(f"| {src} | " + " | ".join(f"KL {c['kl']:.6f}, top-1 {c['top1']:.4f}" for c in cells) + " |")
    for r in runs:
        c = res[f"{r.name} (the tool's own output)"]
        print(f"{r.name} (the tool's own output): KL {c['kl']:.6f}, top-1 {c['top1']:.4f}")


if __name__ == "__main__":
    main()
