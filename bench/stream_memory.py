"""Peak memory and time of GPTQ W4A16 on checkpoints of growing depth, streamed vs eager.

Builds random-init Qwen2-VL checkpoints (real transformers classes, bf16, sharded safetensors with an
index) of one width and 4, 8, 16, 32 language layers, then runs the llmc job (GPTQ W4A16 g128, language
model, ``save_fake`` written) once with ``run.stream: true`` and once with ``false``, each in its own
process, and prints peak RSS (the child's ``ru_maxrss``), wall and CPU time. A child that only imports
what a job imports gives the baseline RSS of the process itself; "model memory" is peak minus baseline.
It also prints the bound of the issue, (one block + non-block modules + activations) x 1.3, and checks
that both paths wrote the same fake-quant weights.

    PYTHONPATH=. .venv/bin/python bench/stream_memory.py --work /tmp/streammem [--layers 4,8,16,32]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
IMPORTS = "import llmc.runner, llmc.eval.job, transformers, torch; from transformers import Qwen2VLForConditionalGeneration"


def build(folder: Path, layers: int, hidden: int, intermediate: int) -> Path:
    """A random Qwen2-VL checkpoint (bf16, shards of 64 MB) with the tiny model's processor."""
    import torch
    from transformers import (
        AutoProcessor,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
    )

    from llmc.testing.tiny_models import ensure_tiny_model

    out = folder / f"qwen2vl-h{hidden}-l{layers}"
    if (out / "config.json").exists():
        return out
    tiny = ensure_tiny_model("qwen2_vl", folder / "tiny")
    cfg = Qwen2VLConfig.from_pretrained(tiny)
    text = cfg.text_config
    text.hidden_size, text.intermediate_size, text.num_hidden_layers = hidden, intermediate, layers
    text.num_attention_heads, text.num_key_value_heads = hidden // 64, 2
    text.layer_types = ["full_attention"] * layers
    text.rope_parameters = {**text.rope_parameters, "mrope_section": [8, 12, 12]}  # head_dim 64
    cfg.vision_config.hidden_size = hidden  # the merger writes into the text stream
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(cfg).to(torch.bfloat16)
    model.save_pretrained(out, max_shard_size="64MB")
    AutoProcessor.from_pretrained(tiny).save_pretrained(out)
    return out


def measure(cmd: list[str], env: dict) -> dict:
    """Run ``cmd``; its peak RSS (GiB), wall and CPU seconds (from wait4)."""
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    err = proc.stderr.read()
    if status != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    return {"rss_gib": usage.ru_maxrss / 2**20, "wall": time.time() - t0, "cpu": usage.ru_utime + usage.ru_stime}


def job(model: Path, calib: str, save: Path, stream: bool, method: str = "GPTQ") -> dict:
    return {"model": {"type": "qwen2_vl", "path": str(model), "dtype": "bfloat16"},
            "calib": {"name": "custom_mm", "path": calib, "n_samples": 16, "bs": 4, "seq_len": 256},
            "quant": {"method": method, "quant_objects": ["language"],
                      "weight": {"bit": 4, "symmetric": True, "group_size": 128}},
            "save": {"save_path": str(save), "save_fake": True}, "run": {"stream": stream}}


def sizes(model: Path) -> dict:
    """Bytes of one language block and of everything else, from the checkpoint's index."""
    from safetensors import safe_open

    index = json.loads((model / "model.safetensors.index.json").read_text())["weight_map"]
    block = rest = 0
    for name, shard in index.items():
        with safe_open(model / shard, "pt") as f:
            t = f.get_slice(name)
            n = 1
            for d in t.get_shape():
                n *= d
            b = n * 2  # bf16
        if ".layers.0." in name and "visual" not in name:
            block += b
        elif ".layers." not in name or "visual" in name:
            rest += b
    return {"block_mib": block / 2**20, "rest_mib": rest / 2**20}


def same_weights(a: Path, b: Path) -> bool:
    """Both folders hold the same tensors, bit for bit (read one tensor at a time: this process stays small)."""
    import torch
    from safetensors import safe_open

    def index(folder: Path) -> dict:
        return {k: f for f in sorted(folder.glob("*.safetensors")) for k in safe_open(f, "pt").keys()}
    x, y = index(a), index(b)
    if x.keys() != y.keys():
        return False
    for k in x:
        with safe_open(x[k], "pt") as fa, safe_open(y[k], "pt") as fb:
            if not torch.equal(fa.get_tensor(k), fb.get_tensor(k)):
                return False
    return True


def main() -> None:
    if sys.argv[1:2] == ["--build"]:
        work, n, hidden, inter = sys.argv[2:6]
        build(Path(work), int(n), int(hidden), int(inter))
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/llmc-stream-memory"))
    p.add_argument("--layers", default="4,8,16,32")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--method", default="GPTQ", help="GPTQ, or RTN: the floor without GPTQ's Hessians")
    a = p.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    from llmc.builtin import resolve_builtin

    calib = resolve_builtin("builtin:mme_synth/calib")
    base = measure([sys.executable, "-c", IMPORTS], env)
    print(f"baseline (imports only): {base['rss_gib']:.2f} GiB; activations: 16 samples x <=256 tokens x "
          f"{a.hidden} (bf16) = {16 * 256 * a.hidden * 2 / 2**20:.1f} MiB at most")
    print(f"method: {a.method} W4A16 g128, language model; hidden {a.hidden}, intermediate {a.intermediate}")
    print("| layers | block MiB | non-block MiB | path | peak RSS GiB | model memory GiB | bound GiB | wall s | CPU s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in [int(x) for x in a.layers.split(",")]:
        # built in a child: a parent that held the model would lend its peak RSS to every job it starts
        # (Linux keeps the forked copy's high-water mark in the child's ru_maxrss across exec)
        subprocess.run([sys.executable, __file__, "--build", str(a.work), str(n), str(a.hidden), str(a.intermediate)],
                       env=env, check=True, stdout=subprocess.DEVNULL)
        model = a.work / f"qwen2vl-h{a.hidden}-l{n}"
        sz = sizes(model)
        bound = 1.3 * (sz["block_mib"] + sz["rest_mib"] + 16 * 256 * a.hidden * 2 / 2**20) / 1024
        outs = {}
        for stream in (True, False):
            save = a.work / f"out-{a.method}-l{n}-{'stream' if stream else 'eager'}"
            cfg = a.work / f"job-{a.method}-l{n}-{stream}.yml"
            cfg.write_text(yaml.safe_dump(job(model, calib, save, stream, a.method)))
            r = measure([sys.executable, "-m", "llmc", str(cfg), "--overwrite"], env)
            outs[stream] = save / "fake"
            print(f"| {n} | {sz['block_mib']:.0f} | {sz['rest_mib']:.0f} | {'streamed' if stream else 'eager'} | "
                  f"{r['rss_gib']:.2f} | {r['rss_gib'] - base['rss_gib']:.2f} | {bound:.2f} | {r['wall']:.0f} | "
                  f"{r['cpu']:.0f} |", flush=True)
        print(f"| {n} | | | same fake-quant weights: {same_weights(outs[True], outs[False])} | | | | | |", flush=True)


if __name__ == "__main__":
    main()
