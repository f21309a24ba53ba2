#!/usr/bin/env python
"""Check llmc's GGUF export with llama.cpp itself: llama.cpp's greedy tokens vs llmc's fake-quant model.

Not a CI test: it needs llama.cpp, built once from the PyPI source package of llama-cpp-python
(llama.cpp + its mtmd/clip library; 30-50 min on 2 cores)::

    /work/main/.venv/bin/python tools/verify_gguf.py setup            # into /work/envs/llamacpp
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH=. \\
        /work/main/.venv/bin/python tools/verify_gguf.py run --out /tmp/gguf-verify [--cases a,b] [--control]

``run`` (in llmc's Python) quantizes each case with llmc (GPTQ / AWQ / RTN, group 32), writes it with
``export_gguf``, runs the fake-quant model's greedy decoding in transformers, then starts
``worker JOB.json`` in the llama.cpp venv: llama.cpp loads ``model.gguf`` (+ ``mmproj.gguf``) and
decodes greedily from the same token ids; images go through llama.cpp's own clip encoder
(``mtmd_helper_eval_chunk_single``) at the position of HF's image tokens. Reported per prompt: the
answer (HF's tokens through the first end-of-turn) and the common prefix of the two 16-token greedy
sequences, the first step's logits (max abs difference, cosine), llama.cpp's image embeddings vs the
projected features transformers feeds its language model (per image token), llama.cpp's
tokenization of the prompt text vs HF's ids, non-finite logits. ``--control`` repeats it with the
same fake-quant weights exported as F32: what differs there is llama.cpp's runtime, not the blocks.
Random tiny models are first made sensitive (``prepare_random``); the trained tiny Qwen2-VL
(``llmc/assets/tiny_qwen2vl_mme``) is used as it is.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

VENV = Path("/work/envs/llamacpp")
LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
CMAKE_ARGS = "-DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAVA_BUILD=ON"
ROOT = Path(__file__).resolve().parent.parent
ASSET = str(ROOT / "llmc" / "assets" / "tiny_qwen2vl_mme")
N_NEW = 16
TEXT_PROMPTS = ["What color is the circle in the picture?", "Describe the picture.",
                "How many squares are there? Answer with a number."]
# name -> (adapter type, model path or tiny:<family>, method, bits, symmetric, image side in px or 0)
CASES = {
    "qwen2vl_mme_gptq_q4_0": ("qwen2_vl", ASSET, "GPTQ", 4, True, 56),
    "qwen2vl_mme_awq_q4_1": ("qwen2_vl", ASSET, "AWQ", 4, False, 56),
    "qwen2vl_mme_rtn_q8_0": ("qwen2_vl", ASSET, "RTN", 8, True, 56),
    "qwen2_vl_rtn_q4_0": ("qwen2_vl", "tiny:qwen2_vl", "RTN", 4, True, 112),
    "qwen2_5_vl_rtn_q4_1": ("qwen2_5_vl", "tiny:qwen2_5_vl", "RTN", 4, False, 56),  # one 56 px window
    "llava_clip_llama_rtn_q4_0": ("llava", "tiny:llava_clip_llama", "RTN", 4, True, 28),
    "llava_siglip_qwen2_rtn_q4_1": ("llava", "tiny:llava_siglip_qwen2", "RTN", 4, False, 28),
    "gemma3_rtn_q4_0": ("gemma3", "tiny:gemma3", "RTN", 4, True, 56),
    "qwen2_rtn_q4_1": ("qwen2", "tiny:qwen2", "RTN", 4, False, 0),
    "llama_rtn_q4_0": ("llama", "tiny:llama", "RTN", 4, True, 0),
}
SPECIAL = {"GPTQ": {"percdamp": 0.01, "blocksize": 128, "actorder": False, "static_groups": False,
                    "true_sequential": True},
           "AWQ": {"trans": True, "trans_version": "v2", "n_grid": 20, "weight_clip": True, "clip_sym": True,
                   "clip_grid": 20, "max_shrink": 0.5, "clip_n_tokens": 512}}


# ------------------------------------------------------------------------------------------ setup
def setup(venv: Path) -> None:
    """Build llama-cpp-python (llama.cpp + mtmd) from source into ``venv``; skipped when importable."""
    py = venv / "bin" / "python"
    if py.exists() and subprocess.run([str(py), "-c", "import llama_cpp.mtmd_cpp"], check=False).returncode == 0:
        print(f"{venv}: llama_cpp and mtmd already importable")
        return
    subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
    pip = [str(py), "-m", "pip", "install"]
    subprocess.run([*pip, "numpy", "typing-extensions", "diskcache", "jinja2", "scikit-build-core"], check=True)
    env = {**os.environ, "CMAKE_ARGS": CMAKE_ARGS, "CMAKE_BUILD_PARALLEL_LEVEL": "2"}
    subprocess.run(["nice", "-n", "10", *pip, "-v", "--no-build-isolation", "--no-deps",
                    "--no-binary=llama-cpp-python", LLAMA_CPP_PYTHON], check=True, env=env)
    subprocess.run([str(py), "-c", "import llama_cpp.mtmd_cpp; print('llama_cpp + mtmd ok')"], check=True)


# ------------------------------------------------------------------------------- llmc side (run)
def prepare_random(model, factor: float = 8.0) -> None:
    """Make a random tiny model a sensitive test. Its weights are ~ N(0, 0.02), so it attends almost
    uniformly and a wrong rope layout or head split hardly changes its outputs: scale the query/key
    projections (attention logits x factor^2). Its biases, Gemma's norms and Gemma's image projection
    are initialised to zero, so their export would go untested: give every all-zero tensor N(0, 0.02)."""
    import torch
    from torch import nn

    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "qkv"):
                mod.weight.mul_(factor)
                if mod.bias is not None:
                    mod.bias.mul_(factor)


def quantize_case(name: str, work: Path):
    """(adapter with fake-quant layers, the case's image side) for case ``name``."""
    import torch

    from llmc.config import parse_config
    from llmc.data.mme_synth import generate
    from llmc.models import load_adapter
    from llmc.runner import quantize_model
    from llmc.testing.tiny_models import ensure_tiny_model

    mtype, path, method, bits, sym, side = CASES[name]
    if path.startswith("tiny:"):
        path = str(ensure_tiny_model(path[5:], work / "tiny"))
    calib = work / "calib"
    if not calib.exists():
        generate(calib, "calib", n_images=8, seed=0)
    objects = ["vision", "language"] if side else ["language"]
    cfg = {"base": {"seed": 42}, "model": {"type": mtype, "path": path, "dtype": "float32"},
           "calib": {"name": "custom_mm", "path": str(calib), "n_samples": 16, "bs": 4, "seq_len": 256},
           "quant": {"method": method, "quant_objects": objects,
                     "weight": {"bit": bits, "symmetric": sym, "granularity": "per_group", "group_size": 32},
                     **({"special": SPECIAL[method]} if method in SPECIAL else {})},
           "save": {"save_path": str(work / "unused")}}
    cfg = parse_config(cfg)
    adapter = load_adapter(mtype, path, dtype="float32")
    if CASES[name][1].startswith("tiny:"):
        prepare_random(adapter.model)
    quantize_model(cfg, adapter, torch.device("cpu"))
    return adapter, side


def prompts(adapter, side: int, work: Path) -> list[dict]:
    """Text prompts (chat template) and image prompts (mme_synth test images) as HF token ids."""
    from PIL import Image

    from llmc.data.mme_synth import generate
    from llmc.testing.tiny_models import tiny_image

    proc, out = adapter.processor, []
    tok = getattr(proc, "tokenizer", proc)
    for i, q in enumerate(TEXT_PROMPTS):
        msgs = [{"role": "user", "content": [{"type": "text", "text": q}]}]
        text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        ids = (proc(text=[text], return_tensors="pt") if side else tok([text], return_tensors="pt"))["input_ids"]
        out.append({"name": f"text{i}", "text": text, "ids": ids[0].tolist(), "inputs": {"input_ids": ids}})
    if not side:
        return out
    bench = work / "mme_test"
    if not bench.exists():
        generate(bench, "test", n_images=4, seed=7)
    samples = json.loads((bench / "samples.json").read_text())[:4]
    img_id = adapter.model.config.image_token_id if hasattr(adapter.model.config, "image_token_id") \
        else adapter.model.config.image_token_index
    for i, s in enumerate(samples):
        img = Image.open(bench / s["image"]).convert("RGB")
        if img.size != (side, side):  # random tiny models: a picture of the size their processor keeps
            img = Image.open(tiny_image(work / f"img{side}_{i}.png", (side, side), seed=i)).convert("RGB")
        path = work / f"prompt_img_{side}_{i}.png"
        img.save(path)
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s["question"]}]}]
        text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        inputs = proc(text=[text], images=[img], return_tensors="pt")
        ids = inputs["input_ids"][0].tolist()
        pos = [j for j, t in enumerate(ids) if t == img_id]
        assert pos == list(range(pos[0], pos[-1] + 1)), "image tokens must be one run"
        out.append({"name": f"image{i}", "image": str(path), "prefix": ids[:pos[0]], "n_image": len(pos),
                    "suffix": ids[pos[-1] + 1:], "inputs": dict(inputs)})
    return out


def hf_image_embeddings(adapter, p: dict) -> np.ndarray:
    """The projected image features as transformers feeds them to the language model (image-token rows)."""
    import torch

    lm = adapter.model.get_submodule(adapter.model_parts.language_blocks.rsplit(".", 1)[0])
    seen = {}
    def grab(_m, _a, kwargs):
        seen.setdefault("x", kwargs["inputs_embeds"])

    hook = lm.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            adapter.model(**p["inputs"])
    finally:
        hook.remove()
    n = len(p["prefix"])
    return seen["x"][0, n:n + p["n_image"]].float().numpy()


def hf_greedy(adapter, p: dict) -> tuple[list[int], np.ndarray]:
    """N_NEW greedy tokens of the fake-quant model (not stopping at end-of-turn) and the first step's logits."""
    import torch

    gc = adapter.model.generation_config
    eos, gc.eos_token_id = gc.eos_token_id, None  # decode N_NEW tokens on both sides: a longer comparison
    try:
        with torch.no_grad():
            g = adapter.model.generate(**p["inputs"], max_new_tokens=N_NEW, do_sample=False, pad_token_id=0,
                                       output_logits=True, return_dict_in_generate=True)
    finally:
        gc.eos_token_id = eos
    n = p["inputs"]["input_ids"].shape[1]
    return g.sequences[0, n:].tolist(), g.logits[0][0].float().numpy()


def rounding_stats(adapter) -> dict:
    """GGUF blocks (dequantized by gguf-py) vs llmc's fake-quant weights: the fp16 rounding of d / m."""
    from gguf.quants import dequantize

    from llmc.export.gguf import pack_layer
    from llmc.export.packing import quantized_layers

    worst, sq, n, rel = 0.0, 0.0, 0, 0.0
    for m in quantized_layers(adapter.model).values():
        raw, qt = pack_layer(m)
        deq = dequantize(raw, qt).reshape(m.out_features, m.in_features)
        fq = m.quantized_weight().detach().numpy()
        err = np.abs(deq - fq) / np.repeat(m.scale.numpy(), 32, axis=1)
        worst, sq, n = max(worst, float(err.max())), sq + float((err ** 2).sum()), n + err.size
        rel = max(rel, float(np.abs(deq - fq).max() / np.abs(fq).max()))
    return {"max_err_in_steps": worst, "rms_err_in_steps": (sq / n) ** 0.5, "max_err_rel_to_layer_absmax": rel}


def llama_cpp_greedy(venv: Path, work: Path, files: dict, ps: list[dict]) -> dict[str, dict]:
    """Run the worker in the llama.cpp venv on ``files``; its results by prompt name."""
    job = {"model": str(files["model"]), "mmproj": str(files.get("mmproj") or ""), "n_new": N_NEW, "eos": [],
           "prompts": [{k: v for k, v in p.items() if k != "inputs"} for p in ps]}
    (work / "job.json").write_text(json.dumps(job))
    with open(work / "worker.log", "w") as log:  # llama.cpp's own log
        subprocess.run([str(venv / "bin" / "python"), __file__, "worker", str(work / "job.json")], check=True,
                       stderr=log, stdout=log)
    return {r["name"]: r for r in json.loads((work / "job.result.json").read_text())}


def compare(case: str, p: dict, hf: tuple[list[int], np.ndarray], r: dict, eos: list[int]) -> dict:
    """One report row: common prefix, the answer (HF's tokens through its first end-of-turn), logits."""
    (hf_toks, hf_logits), lc = hf, np.asarray(r["logits0"], dtype=np.float32)
    same = next((i for i, (a, b) in enumerate(zip(hf_toks, r["tokens"])) if a != b), len(hf_toks))
    answer = next((i + 1 for i, t in enumerate(hf_toks) if t in eos), len(hf_toks))
    a, b = lc - lc.mean(), hf_logits - hf_logits.mean()
    return {"case": case, "prompt": p["name"], "hf": hf_toks, "llama_cpp": r["tokens"], "equal": same,
            "n": len(hf_toks), "answer_equal": same >= answer, "answer_len": answer,
            "logits_max_abs_diff": float(np.abs(lc - hf_logits).max()), "logits_scale": float(np.abs(hf_logits).max()),
            "logits_cos": float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))), "finite": r["finite"],
            "tokenizer_equal": r.get("tokenizer_equal")}


def image_rows(rows: list[dict], ps: list[dict], got: dict, adapter) -> list[dict]:
    """Add llama.cpp's clip output vs transformers' projected features (per image token) to image rows."""
    for row, p in zip(rows, ps):
        if "image" in p:
            ours = np.asarray(got[p["name"]]["image_embd"]).reshape(p["n_image"], -1)
            theirs = hf_image_embeddings(adapter, p)
            cos = (ours * theirs).sum(-1) / (np.linalg.norm(ours, axis=-1) * np.linalg.norm(theirs, axis=-1))
            row.update(image_embd_min_cos=float(cos.min()), image_embd_max_abs_diff=float(np.abs(ours - theirs).max()),
                       image_embd_scale=float(np.abs(theirs).max()))
    return rows


def float_control(adapter) -> None:
    """Replace every fake-quant linear by a float linear holding its fake-quant weight (the F32 control)."""
    from llmc.export.packing import quantized_layers

    for name, m in quantized_layers(adapter.model).items():
        parent, child = name.rsplit(".", 1)
        setattr(adapter.model.get_submodule(parent), child, m.to_linear(fake=True))


def export_effect(adapter, ps: list[dict], ref: dict) -> float:
    """Largest first-step logit change in transformers when llmc's fake-quant weights are replaced by the
    GGUF blocks as gguf-py dequantizes them: the export's own effect, without llama.cpp's runtime."""
    import copy

    import torch
    from gguf.quants import dequantize

    from llmc.export.gguf import pack_layer
    from llmc.export.packing import quantized_layers

    model = copy.deepcopy(adapter.model)
    for name, m in quantized_layers(model).items():
        lin = m.to_linear(fake=False)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(dequantize(*pack_layer(m)).reshape(lin.weight.shape)))
        parent, child = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), child, lin)
    worst = 0.0
    with torch.no_grad():
        for p in ps:
            logits = model(**p["inputs"]).logits[0, -1].float().numpy()
            worst = max(worst, float(np.abs(logits - ref[p["name"]][1]).max()))
    return worst


def run_case(name: str, out: Path, venv: Path, control: bool) -> list[dict]:
    """Quantize, export, compare; with ``control`` also the same fake-quant weights exported as F32."""
    from llmc.export.gguf import export_gguf

    work = out / name
    work.mkdir(parents=True, exist_ok=True)
    adapter, side = quantize_case(name, out)
    stats = rounding_stats(adapter)
    print(f"{name}: fp16 rounding of d/m vs llmc's fake-quant weights: {stats}")
    files = export_gguf(adapter, work / "gguf", overwrite=True)
    ps = prompts(adapter, side, out)
    ref = {p["name"]: hf_greedy(adapter, p) for p in ps}
    gen = adapter.model.generation_config.eos_token_id
    eos = [gen] if isinstance(gen, int) else list(gen or [])
    stats["export_logit_effect"] = export_effect(adapter, ps, ref)
    print(f"{name}: first-step logits, GGUF-dequantized vs fake-quant weights (transformers): "
          f"max abs diff {stats['export_logit_effect']:.5f}")
    got = llama_cpp_greedy(venv, work, files, ps)
    rows = image_rows([{**compare(name, p, ref[p["name"]], got[p["name"]], eos), **stats} for p in ps], ps, got,
                      adapter)
    if control:
        float_control(adapter)
        ctl = work / "f32_control"
        ctl.mkdir(exist_ok=True)
        got = llama_cpp_greedy(venv, ctl, export_gguf(adapter, ctl / "gguf", overwrite=True), ps)
        rows += image_rows([compare(name + " (F32 control)", p, ref[p["name"]], got[p["name"]], eos) for p in ps],
                           ps, got, adapter)
    (work / "report.json").write_text(json.dumps(rows, indent=1))
    return rows


def print_rows(rows: list[dict]) -> None:
    """The report as a markdown table."""
    print("| case | prompt | answer equal | tokens equal | first-step logits: max abs diff (max abs logit), "
          "cosine | image embeddings: min cosine, max abs diff (max abs) | finite | llama.cpp tokenizer = HF ids |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        img = (f"{r['image_embd_min_cos']:.5f}, {r['image_embd_max_abs_diff']:.4f} ({r['image_embd_scale']:.2f})"
               if "image_embd_min_cos" in r else "-")
        print(f"| {r['case']} | {r['prompt']} | {r['answer_equal']} ({r['answer_len']}) | {r['equal']}/{r['n']} | "
              f"{r['logits_max_abs_diff']:.4f} ({r['logits_scale']:.2f}), {r['logits_cos']:.5f} | {img} | {r['finite']} | "
              f"{'-' if r['tokenizer_equal'] is None else r['tokenizer_equal']} |")


# --------------------------------------------------------------------------- llama.cpp side (worker)
def _decode(L, ctx, ids: list[int], pos0: int, n_vocab: int) -> np.ndarray:
    batch = L.llama_batch_init(len(ids), 0, 1)
    for i, t in enumerate(ids):
        batch.token[i], batch.pos[i], batch.n_seq_id[i] = t, pos0 + i, 1
        batch.seq_id[i][0], batch.logits[i] = 0, int(i == len(ids) - 1)
    batch.n_tokens = len(ids)
    rc = L.llama_decode(ctx, batch)
    L.llama_batch_free(batch)
    if rc != 0:
        raise RuntimeError(f"llama_decode returned {rc}")
    return np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, -1), shape=(n_vocab,)).copy()


def _image(L, M, mctx, ctx, p: dict, n_vocab: int) -> tuple[np.ndarray, int, list[float]]:
    """Prefix ids, then the image through llama.cpp's clip encoder, then suffix ids (+ the image embeddings)."""
    _decode(L, ctx, p["prefix"], 0, n_vocab)
    bitmap = M.mtmd_helper_bitmap_init_from_file(mctx, p["image"].encode(), False)  # PNG, decoded by llama.cpp
    chunks = M.mtmd_input_chunks_init()
    text = M.mtmd_input_text(M.mtmd_default_marker(), len(M.mtmd_default_marker()), False, True)
    if M.mtmd_tokenize(mctx, chunks, ctypes.byref(text), (M.mtmd_bitmap_p_ctypes * 1)(bitmap), 1) != 0:
        raise RuntimeError("mtmd_tokenize failed")
    img = [M.mtmd_input_chunks_get(chunks, i) for i in range(M.mtmd_input_chunks_size(chunks))]
    img = next(c for c in img if M.mtmd_input_chunk_get_type(c) == M.MTMD_INPUT_CHUNK_TYPE_IMAGE)
    if M.mtmd_input_chunk_get_n_tokens(img) != p["n_image"]:
        raise RuntimeError(f"llama.cpp made {M.mtmd_input_chunk_get_n_tokens(img)} image tokens, HF {p['n_image']}")
    if M.mtmd_encode_chunk(mctx, img) != 0:
        raise RuntimeError("mtmd_encode_chunk failed")
    n_embd = L.llama_model_n_embd_inp(L.llama_get_model(ctx))
    embd = np.ctypeslib.as_array(M.mtmd_get_output_embd(mctx), shape=(p["n_image"] * n_embd,)).tolist()
    new_n_past = L.llama_pos(0)
    if M.mtmd_helper_eval_chunk_single(mctx, ctx, img, len(p["prefix"]), 0, 1024, False, ctypes.byref(new_n_past)):
        raise RuntimeError("mtmd_helper_eval_chunk_single failed")
    M.mtmd_input_chunks_free(chunks)
    M.mtmd_bitmap_free(bitmap)
    n_past = new_n_past.value
    return _decode(L, ctx, p["suffix"], n_past, n_vocab), n_past + len(p["suffix"]), embd


def _tokenize(L, vocab, text: str) -> list[int]:
    buf = (L.llama_token * 4096)()
    n = L.llama_tokenize(vocab, text.encode(), len(text.encode()), buf, 4096, L.llama_vocab_get_add_bos(vocab), True)
    return list(buf[:n])


def worker(job_path: str) -> None:
    """(llama.cpp venv) Greedy decoding of every prompt of the job; results next to the job file."""
    import llama_cpp as L
    import llama_cpp.mtmd_cpp as M

    job = json.loads(Path(job_path).read_text())
    L.llama_backend_init()
    mparams = L.llama_model_default_params()
    mparams.use_extra_bufts = False  # no AMX/AVX weight repacking: AMX tiles fault (SIGILL) on this VM
    model = L.llama_model_load_from_file(job["model"].encode(), mparams)
    cp = L.llama_context_default_params()
    cp.n_ctx = cp.n_batch = cp.n_ubatch = 1024
    cp.n_threads = cp.n_threads_batch = 2
    cp.type_k = cp.type_v = L.GGML_TYPE_F32  # F32 KV cache: keep the runtime's own rounding out of the comparison
    ctx = L.llama_init_from_model(model, cp)
    vocab = L.llama_model_get_vocab(model)
    n_vocab = L.llama_vocab_n_tokens(vocab)
    mctx = None
    if job["mmproj"]:
        mp = M.mtmd_context_params_default()
        mp.use_gpu, mp.n_threads, mp.print_timings = False, 2, False
        mp.image_min_tokens = 4  # Qwen-VL: llama.cpp's default minimum (8 tokens) would upscale a 56 px image
        mctx = M.mtmd_init_from_file(job["mmproj"].encode(), model, mp)
    results = []
    for p in job["prompts"]:
        L.llama_memory_clear(L.llama_get_memory(ctx), True)
        embd = None
        if "image" in p:
            logits, n_past, embd = _image(L, M, mctx, ctx, p, n_vocab)
        else:
            logits, n_past = _decode(L, ctx, p["ids"], 0, n_vocab), len(p["ids"])
        first, toks, finite = logits.tolist(), [], bool(np.isfinite(logits).all())
        while finite and len(toks) < job["n_new"]:
            toks.append(int(np.argmax(logits)))
            if toks[-1] in job["eos"]:
                break
            logits = _decode(L, ctx, [toks[-1]], n_past, n_vocab)
            n_past += 1
            finite = bool(np.isfinite(logits).all())
        res = {"name": p["name"], "tokens": toks, "logits0": first, "finite": finite, "image_embd": embd}
        if "text" in p:
            res["tokenizer_equal"] = _tokenize(L, vocab, p["text"]) == p["ids"]
        results.append(res)
    Path(job_path).with_suffix(".result.json").write_text(json.dumps(results))


def main() -> None:
    """``setup`` | ``run`` | ``worker JOB``."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["setup", "run", "worker"])
    ap.add_argument("job", nargs="?")
    ap.add_argument("--venv", type=Path, default=VENV)
    ap.add_argument("--out", type=Path, default=Path("/tmp/gguf-verify"))
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from: {', '.join(CASES)}")
    ap.add_argument("--control", action="store_true", help="also run the same fake-quant weights exported as F32")
    a = ap.parse_args()
    if a.command == "setup":
        return setup(a.venv)
    if a.command == "worker":
        return worker(a.job)
    rows = []
    for name in a.cases.split(","):
        rows += run_case(name, a.out, a.venv, a.control)
        print_rows([r for r in rows if r["case"] == name])
    (a.out / "report.json").write_text(json.dumps(rows, indent=1))
    print_rows(rows)
    bad = [r for r in rows if not r["finite"]]
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
