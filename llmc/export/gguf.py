"""GGUF export for llama.cpp: llmc's own W4/W8 group-32 integers as ``Q4_0``/``Q4_1``/``Q8_0`` blocks.

Block formats (ggml; 32 weights per block along the input dim, fp16 little-endian scales):

* ``Q4_0``: ``d`` (fp16) + 16 bytes of nibbles, ``w = (n - 8) * d``. llmc symmetric 4-bit ``q`` in
  -8..7 (``w = q * s``) -> ``n = q + 8``, ``d = fp16(s)`` (nearest, the best choice: every weight's
  error is ``|q| * |d - s|``).
* ``Q4_1``: ``d``, ``m`` (fp16) + 16 bytes, ``w = n * d + m``. llmc asymmetric ``q`` in 0..15
  (``w = (q - z) * s``) -> ``n = q``; ``(d, m)`` is the fp16 pair, among the two fp16 neighbours of
  ``s`` and the two fp16 neighbours of the least-squares ``m`` for that ``d``, whose ``q * d + m`` is
  closest (sum of squares over the block) to llmc's ``(q - z) * s``.
* ``Q8_0``: ``d`` (fp16) + 32 int8, ``w = q * d``. llmc symmetric 8-bit ``q`` in -128..127 -> ``q``,
  ``d = fp16(s)``.

Byte ``j`` (0..15) of a 4-bit block holds element ``j`` (low nibble) and ``j + 16`` (high nibble).
The integers are llmc's (``FakeQuantLinear.int_weight()``) unchanged; only ``d``/``m`` are rounded to
fp16. Float tensors are F32 (default, exact) or F16 (``float_type="f16"``, 2-D weights only; norms,
biases and position tables stay F32). The vision tower + projector go to a second file, llama.cpp's
``mmproj`` (:mod:`llmc.export.gguf_vision`, which also names the supported families).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QT
from gguf import GGUFWriter
from loguru import logger
from torch import nn

from llmc.export.atomic import atomic_dir
from llmc.export.gguf_blocks import BLOCK, pack_q4_0, pack_q4_1, pack_q8_0
from llmc.export.packing import has_act_order, quantized_layers
from llmc.quant.fake_linear import FakeQuantLinear
from llmc.quant.primitives import QuantSpec

if TYPE_CHECKING:
    from llmc.models.base import ModelAdapter
    from llmc.plan import LayerPlan

QTYPES: dict[tuple[int, bool], QT] = {(4, True): QT.Q4_0, (4, False): QT.Q4_1, (8, True): QT.Q8_0}
HOLDS = ("w4 g32 symmetric (Q4_0), w4 g32 asymmetric (Q4_1), w8 g32 symmetric (Q8_0), "
         "weight-only (no quant.act), contiguous groups (no act-order g_idx)")
FLOAT_TYPES = ("f32", "f16")
Entry = tuple[str, np.ndarray, "QT | None"]  # GGUF name, array (raw bytes for quantized types), raw type


class KVRecorder:
    """Records ``GGUFWriter.add_*`` calls, so that metadata errors surface before any file is opened."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple, dict]] = []

    def __getattr__(self, name: str) -> Callable[..., None]:
        if not (name.startswith("add_") and hasattr(GGUFWriter, name)):
            raise AttributeError(f"GGUFWriter has no {name}")
        return lambda *a, **k: self.calls.append((name, a, k))


@dataclass
class GGUFFile:
    """Everything one ``.gguf`` file holds, built (and checked) before anything is written."""

    arch: str
    kv: KVRecorder = field(default_factory=KVRecorder)
    entries: list[Entry] = field(default_factory=list)
    consumed: set[str] = field(default_factory=set)  # quantized llmc layers written as blocks


# ------------------------------------------------------------------------------------------- plan
def gguf_qtype(spec: QuantSpec, act_bits: int | None = None) -> QT | None:
    """The GGUF block type that holds ``spec`` exactly, or ``None``."""
    if act_bits is not None or spec.granularity != "per_group" or spec.group_size != BLOCK:
        return None
    return QTYPES.get((spec.bits, spec.symmetric))


def check_gguf_plan(layers: Iterable[LayerPlan]) -> dict[str, QT]:
    """The planned layers -> ``{layer: GGUF type}``; a ``ValueError`` naming what GGUF holds.

    Callable before quantizing (``QuantPlan.quantized()``), so a job can refuse early.
    """
    out, bad = {}, {}
    for lp in layers:
        if not lp.quantized:
            continue
        qt = gguf_qtype(lp.spec, lp.act_bits)
        if qt is None:
            bad[lp.name] = lp.describe()
        else:
            out[lp.name] = qt
    if bad:
        shown = "; ".join(f"layer {n} is {d}" for n, d in list(bad.items())[:3])
        raise ValueError(f"save_gguf: GGUF holds {HOLDS}; {len(bad)} layer(s) differ: {shown}"
                         + (f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""))
    return out


def pack_layer(m: FakeQuantLinear, rows: torch.Tensor | slice | None = None) -> tuple[np.ndarray, QT]:
    """A fake-quant linear's blocks (its own integers/scales), ``rows`` selecting/permuting output rows."""
    qt = gguf_qtype(m.spec, m.act_bits)
    if qt is None or has_act_order(m):
        raise ValueError(f"save_gguf: GGUF holds {HOLDS}; a layer is {m.layer.describe()}"
                         + (" with act-order g_idx" if qt is not None else ""))
    sel = slice(None) if rows is None else rows
    q, s, z = m.int_weight()[sel], m.scale[sel], m.zero[sel]
    if qt == QT.Q4_0:
        return pack_q4_0(q, s), qt
    if qt == QT.Q4_1:
        return pack_q4_1(q, s, z), qt
    return pack_q8_0(q, s), qt


# ---------------------------------------------------------------------------------------- tensors
def float_array(t: torch.Tensor, float_type: str, shift: float = 0.0) -> np.ndarray:
    """A float tensor as F32, or F16 for 2-D+ tensors when ``float_type == "f16"``."""
    a = (t.detach().float() + shift).cpu().numpy()
    return a.astype(np.float16) if float_type == "f16" and a.ndim >= 2 else a


def linear_entries(f: GGUFFile, name: str, mod: nn.Module, layer_name: str, float_type: str,
                   rows: torch.Tensor | slice | None = None) -> None:
    """Add ``{name}.weight`` (blocks for a fake-quant linear, float otherwise) and ``{name}.bias``."""
    sel = slice(None) if rows is None else rows
    if isinstance(mod, FakeQuantLinear):
        raw, qt = pack_layer(mod, rows)
        f.entries.append((f"{name}.weight", raw, qt))
        f.consumed.add(layer_name)
    else:
        f.entries.append((f"{name}.weight", float_array(mod.weight[sel], float_type), None))
    if getattr(mod, "bias", None) is not None:
        f.entries.append((f"{name}.bias", float_array(mod.bias[sel], "f32"), None))


def write_gguf(path: Path, f: GGUFFile) -> Path:
    """Write one GGUF file: header, metadata, tensors."""
    w = GGUFWriter(str(path), f.arch)
    for name, args, kwargs in f.kv.calls:
        getattr(w, name)(*args, **kwargs)
    for name, arr, raw in f.entries:
        w.add_tensor(name, arr, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ------------------------------------------------------------------------------------ text model
TEXT_ARCH = {"qwen2_vl_text": "qwen2vl", "qwen2_5_vl_text": "qwen2vl", "qwen2": "qwen2", "llama": "llama",
             "gemma3_text": "gemma3"}
_T = gguf.MODEL_TENSOR
BLOCK_TENSORS = {"self_attn.q_proj": _T.ATTN_Q, "self_attn.k_proj": _T.ATTN_K, "self_attn.v_proj": _T.ATTN_V,
                 "self_attn.o_proj": _T.ATTN_OUT, "mlp.gate_proj": _T.FFN_GATE, "mlp.up_proj": _T.FFN_UP,
                 "mlp.down_proj": _T.FFN_DOWN, "input_layernorm": _T.ATTN_NORM,
                 "post_attention_layernorm": _T.FFN_NORM}
GEMMA3_TENSORS = {**BLOCK_TENSORS, "post_attention_layernorm": _T.ATTN_POST_NORM,
                  "pre_feedforward_layernorm": _T.FFN_PRE_NORM, "post_feedforward_layernorm": _T.FFN_POST_NORM,
                  "self_attn.q_norm": _T.ATTN_Q_NORM, "self_attn.k_norm": _T.ATTN_K_NORM}


def tensor_name(arch: str, kind: gguf.MODEL_TENSOR, bid: int | None = None) -> str:
    """llama.cpp's base name of ``kind`` (no ``.weight``), checked against the architecture's tensors."""
    enum = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch]
    if kind not in gguf.MODEL_TENSORS[enum]:
        raise ValueError(f"save_gguf: llama.cpp's {arch} has no {kind.name} tensor")
    return gguf.TENSOR_NAMES[kind].format(bid=bid)


def rope_rows(n_head: int, head_dim: int) -> torch.Tensor:
    """Row order of llama.cpp's LLaMA q/k (interleaved rope pairs): HF row ``perm[i]`` goes to row ``i``."""
    return torch.arange(n_head * head_dim).reshape(n_head, 2, head_dim // 2).transpose(1, 2).reshape(-1)


def text_rope(tc: Any) -> tuple[dict, dict]:
    """(global, sliding-window) rope parameters; only the default and linear rope types map to llama.cpp."""
    rp = dict(getattr(tc, "rope_parameters", None) or {})
    full, swa = (rp.get("full_attention", {}), rp.get("sliding_attention", {})) if "full_attention" in rp else (rp, {})
    for r in (full, swa):
        if r.get("rope_type", "default") not in ("default", "linear"):
            raise ValueError(f"save_gguf: rope_type {r['rope_type']!r} is not supported; valid: default, linear")
    return full, swa


def text_blocks(f: GGUFFile, adapter: ModelAdapter, arch: str, tc: Any, float_type: str) -> None:
    """Every parameter of every decoder block, by llama.cpp name (an error for one it has no name for)."""
    table = GEMMA3_TENSORS if arch == "gemma3" else BLOCK_TENSORS
    root = adapter.model_parts.language_blocks
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    for i, block in enumerate(adapter.model.get_submodule(root)):
        for rel, mod in block.named_modules():
            own = dict(mod.named_parameters(recurse=False))
            if not own:
                continue
            if rel not in table:
                raise ValueError(f"save_gguf: {root}.{i}.{rel} has no llama.cpp {arch} tensor")
            name = tensor_name(arch, table[rel], i)
            if rel.endswith("norm") or not isinstance(mod, nn.Linear):
                shift = 1.0 if arch == "gemma3" else 0.0  # Gemma3RMSNorm scales by (1 + w)
                f.entries.append((f"{name}.weight", float_array(own["weight"], "f32", shift), None))
                continue
            rows = None
            if arch == "llama" and rel in ("self_attn.q_proj", "self_attn.k_proj"):
                n = tc.num_attention_heads if rel.endswith("q_proj") else tc.num_key_value_heads
                rows = rope_rows(n, head_dim)
            linear_entries(f, name, mod, f"{root}.{i}.{rel}", float_type, rows)


def text_kv(w: GGUFWriter | KVRecorder, arch: str, tc: Any, n_vocab: int, ftype: int) -> None:
    """The architecture's hyper-parameters."""
    full, swa = text_rope(tc)
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    w.add_context_length(tc.max_position_embeddings)
    w.add_embedding_length(tc.hidden_size)
    w.add_block_count(tc.num_hidden_layers)
    w.add_feed_forward_length(tc.intermediate_size)
    w.add_head_count(tc.num_attention_heads)
    w.add_head_count_kv(tc.num_key_value_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(tc.rms_norm_eps)
    w.add_rope_freq_base(full.get("rope_theta", 10000.0))
    if full.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(full["factor"])
    w.add_vocab_size(n_vocab)
    if arch == "qwen2vl":
        w.add_rope_dimension_sections((list(full["mrope_section"]) + [0, 0, 0, 0])[:4])
    if arch == "gemma3":
        w.add_sliding_window(tc.sliding_window)
        w.add_sliding_window_pattern([t == "sliding_attention" for t in tc.layer_types])
        w.add_rope_freq_base_swa(swa.get("rope_theta", 10000.0))
        if getattr(tc, "final_logit_softcapping", None):
            w.add_final_logit_softcapping(tc.final_logit_softcapping)
    w.add_file_type(ftype)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _check_text(arch: str, tc: Any) -> None:
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    if arch == "gemma3" and getattr(tc, "query_pre_attn_scalar", head_dim) != head_dim:
        raise ValueError("save_gguf: llama.cpp's gemma3 scales attention by 1/sqrt(head_dim); this model uses "
                         f"query_pre_attn_scalar={tc.query_pre_attn_scalar} (head_dim {head_dim})")
    if arch == "gemma3" and getattr(tc, "attn_logit_softcapping", None):
        raise ValueError("save_gguf: llama.cpp's gemma3 has no attention logit soft-capping")
    text_rope(tc)


def file_type(f: GGUFFile) -> int:
    """``general.file_type``: the most common block type (else all-F32 / mostly-F16)."""
    kinds = [e[2] for e in f.entries if e[2] is not None]
    by = {QT.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0, QT.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1,
          QT.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0}
    if kinds:
        return int(by[max(set(kinds), key=kinds.count)])
    f16 = any(e[1].dtype == np.float16 for e in f.entries)
    return int(gguf.LlamaFileType.MOSTLY_F16 if f16 else gguf.LlamaFileType.ALL_F32)


def build_text_file(adapter: ModelAdapter, float_type: str) -> GGUFFile:
    """``model.gguf``: token embeddings, blocks, final norm, ``output`` (unless tied), tokenizer."""
    from llmc.export.gguf_vision import tokenizer_kv

    model, parts = adapter.model, adapter.model_parts
    tc = model.config.get_text_config()
    arch = TEXT_ARCH[tc.model_type]
    _check_text(arch, tc)
    f = GGUFFile(arch)
    embed = model.get_submodule(parts.embed_tokens).weight
    f.entries.append((tensor_name(arch, _T.TOKEN_EMBD) + ".weight", float_array(embed, float_type), None))
    text_blocks(f, adapter, arch, tc, float_type)
    norm = model.get_submodule(parts.final_norm).weight
    f.entries.append((tensor_name(arch, _T.OUTPUT_NORM) + ".weight",
                      float_array(norm, "f32", 1.0 * (arch == "gemma3")), None))
    head = model.get_submodule(parts.lm_head)
    tied = head.weight is embed or bool(getattr(model.config, "tie_word_embeddings", False))
    if isinstance(head, FakeQuantLinear) or not tied:
        linear_entries(f, tensor_name(arch, _T.OUTPUT), head, parts.lm_head, float_type)
    n_vocab = embed.shape[0]
    ftype = file_type(f)
    f.kv.add_name(Path(str(adapter.path)).name)
    text_kv(f.kv, arch, tc, n_vocab, ftype)
    tokenizer_kv(f.kv, adapter, n_vocab, arch)
    return f


# ------------------------------------------------------------------------------------------ export
def export_gguf(adapter: ModelAdapter, out_dir: str | Path, overwrite: bool = False,
                float_type: str = "f32", mmproj: bool = True) -> dict[str, Path]:
    """Write ``out_dir/model.gguf`` (text model + tokenizer) and, for a VLM, ``out_dir/mmproj.gguf``.

    Every check (family, layer specs, act-order, fp16 range) runs before anything is written; the
    folder appears whole or not at all. Returns ``{"model": path, "mmproj": path}`` (no ``mmproj``
    for a text-only model or ``mmproj=False``).
    """
    from llmc.export.gguf_vision import build_mmproj_file, check_gguf_family

    if float_type not in FLOAT_TYPES:
        raise ValueError(f"save_gguf: float_type={float_type!r}; valid: {list(FLOAT_TYPES)}")
    check_gguf_family(adapter)
    layers = quantized_layers(adapter.model)
    check_gguf_plan(m.layer for m in layers.values())
    if bad := [n for n, m in layers.items() if has_act_order(m)]:
        raise ValueError(f"save_gguf: GGUF holds {HOLDS}; layer {bad[0]} has act-order g_idx "
                         f"({len(bad)} layer(s)); quantize with GPTQ act_order false")
    files = {"model": build_text_file(adapter, float_type)}
    if mmproj and adapter.model_parts.vision_tower is not None:
        files["mmproj"] = build_mmproj_file(adapter, float_type)
    left = set(layers) - set().union(*(f.consumed for f in files.values()))
    if left:
        raise ValueError(f"save_gguf: {len(left)} quantized layer(s) have no GGUF tensor, e.g. {sorted(left)[:3]}"
                         + ("; pass mmproj=True to write the vision tower" if not mmproj else ""))
    out = Path(out_dir)
    with atomic_dir(out, overwrite) as tmp:
        for key, f in files.items():
            write_gguf(tmp / f"{key}.gguf", f)
    n_q = sum(1 for f in files.values() for e in f.entries if e[2] is not None)
    logger.info(f"gguf: {n_q} quantized tensors, files {sorted(files)} in {out}")
    return {key: out / f"{key}.gguf" for key in files}
