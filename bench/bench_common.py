"""Shared by both sides of the llmc vs llm-compressor benchmark: model/data builder and input encoding.

Imported by the driver and llmc's side (llmc's venv) and by the peer side (llm-compressor's
venv), so only ``torch``, ``transformers``, ``PIL`` and the standard library are imported at
module level; the builder's use of llmc (its locally trained Qwen tokenizer and sentence
corpus) is imported inside the builder, which only the driver runs.

What is built (seeded, cached under a work directory, see :func:`prepare`):

* ``model/``: a random-init Qwen2-VL (``Qwen2VLForConditionalGeneration``) in bf16 with a
  few *outlier norm channels*: in every decoder layer, ``outlier_channels`` random channels
  of ``input_layernorm`` and ``post_attention_layernorm`` are multiplied by
  ``outlier_scale``, so the inputs of q/k/v and gate/up have the activation outliers of real
  LLMs. The processor keeps every ``image_px`` square image at its size (no resize).
* ``calib/`` and ``heldout/``: ``custom_mm`` folders (``samples.json`` + PNG images) whose
  samples are at least ``seq_len`` tokens long, so that both tools cut them to exactly
  ``seq_len`` tokens.

Both tools read the same folders through :func:`encode_folder` (peer) or llmc's own
``custom_mm`` loader and ``batch_process`` (llmc); :func:`fingerprint` proves the two
gave the same tensors.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

TOKEN_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")
SYSTEM_DEFAULT = "You are a helpful assistant."


@dataclass(frozen=True)
class ModelSpec:
    hidden: int = 1024
    layers: int = 8
    intermediate: int = 2816
    heads: int = 16
    kv_heads: int = 2
    vision_depth: int = 2
    vision_dim: int = 256
    outlier_channels: int = 4
    outlier_scale: float = 32.0
    seed: int = 0


@dataclass(frozen=True)
class DataSpec:
    image_px: int = 448
    seq_len: int = 537
    n_calib: int = 128
    n_heldout: int = 32
    seed: int = 1


def set_threads(n: int = 1) -> None:
    """One intra-op and one inter-op thread (the env vars must also be set before the import)."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(var, str(n))
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(n)
    except RuntimeError:  # already set (torch allows it once)
        pass


class Phases:
    """Wall and process CPU seconds of consecutive phases: ``mark(name)`` ends the phase begun at the
    previous mark (or at creation); ``times`` maps each name to ``{"wall_s", "cpu_s"}``."""

    def __init__(self) -> None:
        self.times: dict[str, dict[str, float]] = {}
        self._clock = (time.perf_counter(), time.process_time())

    def mark(self, name: str) -> None:
        now = (time.perf_counter(), time.process_time())
        self.times[name] = {"wall_s": round(now[0] - self._clock[0], 2), "cpu_s": round(now[1] - self._clock[1], 2)}
        self._clock = now


def _key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(asdict(obj), sort_keys=True).encode()).hexdigest()[:12]


# ------------------------------------------------------------------------------------ model
def build_model(out: Path, spec: ModelSpec, image_px: int) -> Path:
    """Save the random-init bf16 Qwen2-VL with outlier norm channels and its processor to ``out``."""
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )
    from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

    from llmc.testing import tiny_models as tm
    from llmc.testing import tiny_tokenizers as tt

    tok = tt.qwen_tokenizer(vision=True)
    tok.model_max_length = 1 << 16
    q = spec.hidden // spec.heads // 8  # mrope sections sum to head_dim / 2, split 2:3:3 like [16, 24, 24]
    text = {"hidden_size": spec.hidden, "intermediate_size": spec.intermediate,
            "num_hidden_layers": spec.layers, "num_attention_heads": spec.heads,
            "num_key_value_heads": spec.kv_heads, "vocab_size": len(tok), "max_position_embeddings": 4096,
            **{f"{k}_token_id": v for k, v in tm._special_ids(tok).items() if k != "gen_eos"},
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                                "mrope_section": [q, q * 3 // 2, q * 3 // 2]}}
    vision = {"depth": spec.vision_depth, "embed_dim": spec.vision_dim, "hidden_size": spec.hidden,
              "mlp_ratio": 4, "num_heads": 4, "patch_size": 14, "spatial_merge_size": 2,
              "temporal_patch_size": 2}
    torch.manual_seed(spec.seed)
    cfg = Qwen2VLConfig(text_config=text, vision_config=vision, **tm._qwen_vl_ids(tok))
    model = Qwen2VLForConditionalGeneration(cfg).to(torch.bfloat16)
    add_outlier_norms(model, spec)
    model.save_pretrained(out)
    size = {"shortest_edge": 28 * 28, "longest_edge": image_px * image_px}  # image_px^2 stays unresized
    Qwen2VLProcessor(image_processor=Qwen2VLImageProcessorPil(size=size), tokenizer=tok,
                     video_processor=Qwen2VLVideoProcessor(size=size),
                     chat_template=tok.chat_template).save_pretrained(out)
    return out


@torch.no_grad()
def add_outlier_norms(model: torch.nn.Module, spec: ModelSpec) -> dict[str, list[int]]:
    """Scale ``outlier_channels`` random channels of each decoder layer's two pre-norms (seeded)."""
    gen = torch.Generator().manual_seed(spec.seed + 1)
    chosen: dict[str, list[int]] = {}
    for name, mod in model.named_modules():
        if name.endswith(("input_layernorm", "post_attention_layernorm")) and "visual" not in name:
            idx = torch.randperm(mod.weight.shape[0], generator=gen)[:spec.outlier_channels]
            mod.weight[idx] *= spec.outlier_scale
            chosen[name] = sorted(idx.tolist())
    return chosen


# ------------------------------------------------------------------------------------- data
def _image(rng: random.Random, px: int) -> Image.Image:
    img = Image.new("RGB", (px, px), tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(3, 8)):
        x0, y0 = rng.randrange(px - 20), rng.randrange(px - 20)
        box = (x0, y0, rng.randint(x0 + 10, px), rng.randint(y0 + 10, px))
        color = tuple(rng.randrange(256) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=color)
    return img


def _image_tokens(px: int) -> int:
    return (px // 14) ** 2 // 4  # 14 px patches, 2x2 merge


def make_folder(out: Path, n: int, spec: DataSpec, seed: int, processor: Any) -> Path:
    """Write a ``custom_mm`` folder of ``n`` samples, each at least ``spec.seq_len`` tokens long."""
    from llmc.testing import tiny_tokenizers as tt

    rng = random.Random(seed)
    sentences = tt.corpus(4000, seed=seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(n):
        _image(rng, spec.image_px).save(out / "images" / f"{i:04d}.png")
        answer = " ".join(rng.choice(sentences) for _ in range(2))
        words: list[str] = []
        while True:
            words.append(rng.choice(sentences))
            text = processor.apply_chat_template(conversation(" ".join(words), answer), tokenize=False)
            if len(processor.tokenizer(text)["input_ids"]) - 1 + _image_tokens(spec.image_px) >= spec.seq_len + 8:
                break
        entries.append({"image": f"images/{i:04d}.png", "question": " ".join(words), "answer": answer})
    (out / "samples.json").write_text(json.dumps(entries, indent=1))
    return out


def prepare(work: Path, mspec: ModelSpec, dspec: DataSpec) -> dict[str, Path]:
    """Build (or reuse) the model and the two data folders; returns their paths."""
    model_dir = work / f"model-{_key(mspec)}-{dspec.image_px}px"
    if not (model_dir / "config.json").is_file():
        tmp = model_dir.with_name(model_dir.name + ".tmp")
        build_model(tmp, mspec, dspec.image_px)
        (tmp / "bench_spec.json").write_text(json.dumps(asdict(mspec), indent=1))
        tmp.rename(model_dir)
    data_dir = work / f"data-{_key(dspec)}"
    if not (data_dir / "done").is_file():
        processor = load_processor(model_dir)
        make_folder(data_dir / "calib", dspec.n_calib, dspec, dspec.seed, processor)
        make_folder(data_dir / "heldout", dspec.n_heldout, dspec, dspec.seed + 1000, processor)
        (data_dir / "spec.json").write_text(json.dumps(asdict(dspec), indent=1))
        (data_dir / "done").write_text("ok\n")
    return {"model": model_dir, "calib": data_dir / "calib", "heldout": data_dir / "heldout"}


# --------------------------------------------------------------------------------- encoding
def pil_image_processor(model_dir: str | Path) -> Any:
    """The PIL-backend Qwen2-VL image processor (torchvision's needs a CUDA-matched build)."""
    from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil.from_pretrained(model_dir)


def load_processor(model_dir: str | Path) -> Any:
    """Tokenizer + PIL image processor of the model folder, built the same way in both venvs.

    Not ``AutoProcessor``: in the peer's venv (no torchvision) its video processor cannot be
    built, so the processor is made without one (images only).
    """
    from transformers import AutoTokenizer, Qwen2VLProcessor

    class ImageOnlyProcessor(Qwen2VLProcessor):
        def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    tok = AutoTokenizer.from_pretrained(model_dir)
    return ImageOnlyProcessor(image_processor=pil_image_processor(model_dir), tokenizer=tok,
                              video_processor=None, chat_template=tok.chat_template)


def conversation(question: str, answer: str | None) -> list[dict[str, Any]]:
    """llmc's message format for one image + question (+ answer) sample."""
    msgs: list[dict[str, Any]] = [{"role": "user", "content": [{"type": "image"},
                                                               {"type": "text", "text": question}]}]
    if answer is not None:
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return msgs


def read_entries(folder: str | Path, n: int) -> list[dict[str, Any]]:
    entries = json.loads((Path(folder) / "samples.json").read_text())
    if n > len(entries):
        raise ValueError(f"{folder}: {n} samples asked, {len(entries)} available")
    return entries[:n]


def encode_entry(processor: Any, folder: Path, entry: dict[str, Any], max_len: int) -> dict[str, torch.Tensor]:
    """One sample -> model inputs (batch of 1), cut to ``max_len`` tokens like llmc's ``batch_process``."""
    text = processor.apply_chat_template(conversation(entry["question"], entry.get("answer")),
                                         tokenize=False, add_generation_prompt=entry.get("answer") is None)
    with Image.open(folder / entry["image"]) as im:
        image = im.convert("RGB")
    enc = dict(processor(text=[text], images=[image], return_tensors="pt"))
    for key in TOKEN_KEYS:
        if key in enc:
            enc[key] = enc[key][..., :max_len]
    return enc


def encode_folder(processor: Any, folder: str | Path, n: int, max_len: int) -> list[dict[str, torch.Tensor]]:
    """The first ``n`` samples of a ``custom_mm`` folder, one batch each."""
    folder = Path(folder)
    return [encode_entry(processor, folder, e, max_len) for e in read_entries(folder, n)]


def fingerprint(batches: list[dict[str, torch.Tensor]]) -> dict[str, str]:
    """sha256 per input key over all batches (values as contiguous CPU bytes, dtype and shape)."""
    hashes: dict[str, Any] = {}
    for batch in batches:
        for key, value in sorted(batch.items()):
            if not isinstance(value, torch.Tensor):
                continue
            h = hashes.setdefault(key, hashlib.sha256())
            t = value.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.dtype != torch.bool else t.numpy().tobytes())
    return {k: h.hexdigest()[:16] for k, h in hashes.items()}


# ----------------------------------------------------------------------------------- output
LANGUAGE_PREFIX = "model.language_model."


def save_language_weights(state: dict[str, torch.Tensor], path: Path) -> int:
    """Save the language model's tensors (dequantized weights, changed norms) as safetensors."""
    from safetensors.torch import save_file

    keep = {k: v.detach().to("cpu").contiguous() for k, v in state.items() if k.startswith(LANGUAGE_PREFIX)}
    if not keep:
        raise ValueError(f"no tensor under {LANGUAGE_PREFIX!r}: keys look like {sorted(state)[:3]}")
    save_file(keep, str(path))
    return len(keep)


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "transformers", "llmcompressor", "compressed-tensors", "llmc"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)
