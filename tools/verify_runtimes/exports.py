"""The small models and every llmc export of them (runs in llmc's venv).

Models (random, seeded, float32, built with transformers' real classes and llmc's tiny tokenizer and
processor): ``qwen2_vl`` (text hidden 512 x 4 layers, 8 heads / 2 KV heads, vision 256 x 2 blocks)
and ``qwen2`` (the same text model alone). Quantization is llmc's own (``runner.quantize_model``,
RTN: the formats are under test, not the algorithm); the exporters are called as the runner calls
them (``EXPORTERS``), with the ``save`` options a config sets: ``save.gptq_format``
(``gptq-<format>`` exports) and ``save.pack_vision: true`` (``+vis`` exports).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

TEXT = {"hidden_size": 512, "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 8,
        "num_key_value_heads": 2, "max_position_embeddings": 1024,
        "initializer_range": 0.05}  # std 0.05: varied greedy tokens that bf16 still reproduces (0.02: one token repeated)
VISION = {"depth": 2, "embed_dim": 256, "hidden_size": 512, "mlp_ratio": 2, "num_heads": 4, "patch_size": 14,
          "spatial_merge_size": 2, "temporal_patch_size": 2}
MROPE = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [8, 12, 12]}  # sums to head_dim/2


@dataclass(frozen=True)
class Variant:
    """One quantized model: the reference ``fake/`` folder and the exports written from it."""

    model: str
    symmetric: bool
    group_size: int
    vision: bool

    @property
    def name(self) -> str:
        return f"{self.model}-{'sym' if self.symmetric else 'asym'}-g{self.group_size}-{'vl' if self.vision else 'l'}"


@dataclass(frozen=True)
class Export:
    """One folder written by llmc: ``fmt`` in ct | awq | gptq, ``opts`` passed to the exporter."""

    variant: Variant
    fmt: str
    opts: tuple[tuple[str, Any], ...] = field(default=())

    @property
    def name(self) -> str:
        o = dict(self.opts)
        tail = {"ct": "ct", "awq": "awq", "gptq": "gptq-" + o.get("checkpoint_format", "auto")}[self.fmt]
        if o.get("quantize_vision") or o.get("pack_vision"):
            tail += "+vis"
        return f"{self.variant.name}/{tail}"


def _text_kwargs(tok) -> dict[str, Any]:
    from llmc.testing.tiny_models import _special_ids

    ids = _special_ids(tok)
    return TEXT | {"vocab_size": len(tok), "bos_token_id": ids["bos"], "eos_token_id": ids["eos"],
                   "pad_token_id": ids["pad"], "tie_word_embeddings": True}


VISION_25 = {"depth": 2, "hidden_size": 256, "intermediate_size": 512, "num_heads": 4, "out_hidden_size": 512,
             "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
             "fullatt_block_indexes": [1]}
SIGLIP = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
          "image_size": 28, "patch_size": 14, "vision_use_head": False}


def _build_more(name: str):
    """Qwen2.5-VL and LLaVA (SigLIP + Qwen2) at the same text size, llmc's tiny tokenizers/processors."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2Config,
        SiglipImageProcessor,
        SiglipVisionConfig,
    )

    from llmc.testing import tiny_models as tm
    from llmc.testing import tiny_tokenizers as tt

    if name == "qwen2_5_vl":
        tok = tt.qwen_tokenizer(vision=True)
        text = _text_kwargs(tok) | {"rope_parameters": MROPE}
        cfg = Qwen2_5_VLConfig(text_config=text, vision_config=VISION_25, tie_word_embeddings=True,
                               initializer_range=TEXT["initializer_range"], **tm._qwen_vl_ids(tok))
        return Qwen2_5_VLForConditionalGeneration(cfg), tm._qwen_vl_processor(Qwen2_5_VLProcessor, tok), tok
    tok = tt.qwen_tokenizer(vision=False, extra=("<image>",), chat_template=tt.LLAVA_QWEN_TEMPLATE)
    text = Qwen2Config(**(_text_kwargs(tok) | {"tie_word_embeddings": False}))
    side = SIGLIP["image_size"]
    model, proc, tok = tm._llava(tok, SiglipVisionConfig(**SIGLIP), text,
                                 SiglipImageProcessor(size={"height": side, "width": side}), "full", -1, 0)
    return model, proc, tok


def _build(name: str):
    from transformers import (
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLProcessor,
    )

    from llmc.testing import tiny_models as tm
    from llmc.testing import tiny_tokenizers as tt

    if name in ("qwen2_5_vl", "llava"):
        return _build_more(name)
    if name == "qwen2":
        tok = tt.qwen_tokenizer(vision=False)
        return Qwen2ForCausalLM(Qwen2Config(**_text_kwargs(tok))), tok, tok
    if name == "qwen2_vl":
        tok = tt.qwen_tokenizer(vision=True)
        text = _text_kwargs(tok) | {"rope_parameters": MROPE}
        cfg = Qwen2VLConfig(text_config=text, vision_config=VISION, tie_word_embeddings=True,
                            initializer_range=TEXT["initializer_range"], **tm._qwen_vl_ids(tok))
        return Qwen2VLForConditionalGeneration(cfg), tm._qwen_vl_processor(Qwen2VLProcessor, tok), tok
    raise ValueError(f"unknown model {name!r}: qwen2_vl, qwen2, qwen2_5_vl, llava")


def build_model(name: str, root: Path, seed: int = 0) -> Path:
    """``root/models/<name>`` (built once, seeded): a float32 checkpoint with its processor."""
    from llmc.testing.tiny_models import _generation_config

    out = root / "models" / name
    if (out / "config.json").is_file():
        return out
    torch.manual_seed(seed)
    model, processor, tok = _build(name)
    model = model.to(torch.float32).eval()
    model.generation_config = _generation_config(tok)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def model_type(name: str) -> str:
    return {"qwen2_vl": "qwen2_vl", "qwen2": "qwen2", "qwen2_5_vl": "qwen2_5_vl", "llava": "llava"}[name]


def quantize(variant: Variant, model_dir: Path):
    """llmc adapter with the variant's fake-quant layers (RTN W4, language or vision + language)."""
    from llmc.config import parse_config
    from llmc.models import load_adapter
    from llmc.runner import quantize_model

    objects = ["vision", "language"] if variant.vision else ["language"]
    cfg = parse_config({
        "model": {"type": model_type(variant.model), "path": str(model_dir), "dtype": "float32"},
        "quant": {"method": "RTN", "quant_objects": objects,
                  "weight": {"bit": 4, "symmetric": variant.symmetric, "granularity": "per_group",
                             "group_size": variant.group_size}},
        "save": {"save_path": "unused"},
    })
    adapter = load_adapter(cfg.model.type, cfg.model.path, dtype="float32")
    quantize_model(cfg, adapter, torch.device("cpu"))
    return adapter


def write_export(adapter, exp: Export, out: Path) -> Path:
    """Write one export with llmc's exporter (the ``save_*`` one, with ``opts``)."""
    from llmc.export.awq_gemm import export_autoawq
    from llmc.export.compressed import export_compressed_tensors
    from llmc.export.gptq_pack import export_gptq

    write = {"ct": export_compressed_tensors, "awq": export_autoawq, "gptq": export_gptq}[exp.fmt]
    return write(adapter, out, overwrite=True, **dict(exp.opts))


def write_variant(variant: Variant, exports: list[Export], root: Path) -> dict[str, str]:
    """Quantize once, write ``fake/`` and every export; returns export name -> folder or error text."""
    from llmc.export.hf import save_hf_folder

    base = root / "exports" / variant.name
    adapter = quantize(variant, build_model(variant.model, root))
    save_hf_folder(adapter, base / "fake", fake=True, overwrite=True)
    written: dict[str, str] = {}
    for exp in exports:
        folder = base / exp.name.split("/", 1)[1]
        try:
            written[exp.name] = str(write_export(adapter, exp, folder))
        except Exception as exc:  # noqa: BLE001 - an export llmc refuses is a matrix cell too
            written[exp.name] = f"EXPORT ERROR {type(exc).__name__}: {exc}"
    (base / "written.json").write_text(json.dumps(written, indent=1))
    return written


def plan(quick: bool) -> list[Export]:
    """Every export a config can ask for, on the matrix's models (``quick``: Qwen2-VL, one per question).

    ``gptq`` is ``save_gptq`` with ``gptq_format`` (auto: v1 symmetric, v2 asymmetric; an asymmetric v1 is
    refused, a cell of its own); ``+vis`` is ``save.pack_vision: true`` (the vision tower packed too).
    """
    v = Variant
    gptq = lambda var, fmt="auto", vis=False: Export(var, "gptq", (("checkpoint_format", fmt),) +
                                                     ((("quantize_vision", True),) if vis else ()))
    awq = lambda var, vis=False: Export(var, "awq", (("pack_vision", True),) if vis else ())
    vl_a32, vl_s128 = v("qwen2_vl", False, 32, False), v("qwen2_vl", True, 128, False)
    vl_a128v, vl_s32v = v("qwen2_vl", False, 128, True), v("qwen2_vl", True, 32, True)
    t_a32, t_s128 = v("qwen2", False, 32, False), v("qwen2", True, 128, False)
    if quick:
        return [Export(vl_a32, "ct"), awq(vl_a32), gptq(vl_a32), Export(vl_s128, "ct"), gptq(vl_s128)]
    return [
        Export(vl_a32, "ct"), awq(vl_a32), gptq(vl_a32), gptq(vl_a32, "gptq"),
        Export(vl_s128, "ct"), gptq(vl_s128), gptq(vl_s128, "gptq_v2"),
        Export(vl_a128v, "ct"), awq(vl_a128v), awq(vl_a128v, vis=True), gptq(vl_a128v),
        Export(vl_s32v, "ct"), gptq(vl_s32v), gptq(vl_s32v, vis=True),
        awq(t_a32), gptq(t_a32), gptq(t_s128),
        *[x for m in ("qwen2_5_vl", "llava") for var in [v(m, False, 32, False)]
          for x in (Export(var, "ct"), awq(var), gptq(var))],
    ]
