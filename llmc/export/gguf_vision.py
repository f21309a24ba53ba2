"""GGUF export, part two: supported families, tokenizer metadata (for ``model.gguf``), ``mmproj.gguf``.

``mmproj.gguf`` (``general.architecture = clip``) holds the vision tower and the projector in the
layout of llama.cpp's ``clip``/``mtmd`` code for the family's projector type:

* Qwen2-VL -> ``qwen2vl_merger``, Qwen2.5-VL -> ``qwen2.5vl_merger``: the Conv3d patch embedding split
  into its two temporal Conv2d halves (``v.patch_embd.weight``/``.weight.1``), the fused ``qkv`` split
  row-wise into ``attn_q/k/v`` (exact for blocks: rows are independent), merger ``ln_q`` -> ``v.post_ln``,
  merger MLP -> ``mm.0``/``mm.2``.
* LLaVA (CLIP or SigLIP tower) -> ``mlp``: ``mm.0``/``mm.2``; ``clip.vision.feature_layer`` written
  explicitly (HF ``vision_feature_layer`` -2 -> ``n_layer - 1``); the tower's post-layernorm is not
  part of the hidden state LLaVA reads and is left out.
* Gemma 3 -> ``gemma3``: SigLIP + ``mm.input_projection`` + ``mm.soft_emb_norm`` (written as
  ``1 + w``, Gemma's RMSNorm convention); ``clip.vision.projector.scale_factor`` when not 4.

Quantized vision layers are written as blocks like the text model; the rest as F32/F16 (patch and
position embeddings: F32 unless ``float_type="f16"`` for the patch kernel).

Tokenizers: byte-level BPE with Qwen2's pre-tokenizer -> ``gpt2`` model, ``pre = qwen2``, merges;
SentencePiece-style BPE (``▁`` + byte fallback; Llama, Gemma) -> llama.cpp's ``llama`` (SPM) model,
scores ``-(rank + 1)`` of the merge that creates each token (llama.cpp's SPM merges the highest score
first, so the BPE merge order is kept). Tokens are padded with ``[PAD{i}]`` (unused) to the
embedding's row count.
"""
from __future__ import annotations

import itertools
import json
import re
from typing import TYPE_CHECKING, Any

import gguf
from gguf import GGUFWriter
from loguru import logger
from torch import nn

from llmc.export.gguf import (
    TEXT_ARCH,
    GGUFFile,
    KVRecorder,
    file_type,
    float_array,
    linear_entries,
)

if TYPE_CHECKING:
    from llmc.models.base import ModelAdapter

_T = gguf.MODEL_TENSOR
PROJECTOR = {"qwen2_vl": "qwen2vl_merger", "qwen2_5_vl": "qwen2.5vl_merger", "llava": "mlp", "gemma3": "gemma3"}
TEXT_ONLY = ("qwen2", "llama")
FAMILIES = (*PROJECTOR, *TEXT_ONLY)
LLAVA_TOWERS = ("clip_vision_model", "siglip_vision_model")

# (regex on the module path under the tower / projector root, GGUF tensor); the first number is the block
QWEN_VL_RULES = [(r"blocks\.(\d+)\.norm1", _T.V_ENC_INPUT_NORM), (r"blocks\.(\d+)\.norm2", _T.V_ENC_POST_ATTN_NORM),
                 (r"blocks\.(\d+)\.attn\.proj", _T.V_ENC_ATTN_O),
                 (r"blocks\.(\d+)\.mlp\.(fc1|up_proj)", _T.V_ENC_FFN_UP),
                 (r"blocks\.(\d+)\.mlp\.(fc2|down_proj)", _T.V_ENC_FFN_DOWN),
                 (r"blocks\.(\d+)\.mlp\.gate_proj", _T.V_ENC_FFN_GATE), (r"merger\.ln_q", _T.V_POST_NORM),
                 (r"merger\.mlp\.(0|2)", _T.V_MMPROJ)]
CLIP_RULES = [(r"embeddings\.patch_embedding", _T.V_ENC_EMBD_PATCH),
              (r"embeddings\.position_embedding", _T.V_ENC_EMBD_POS), (r"pre_layrnorm", _T.V_PRE_NORM),
              (r"encoder\.layers\.(\d+)\.layer_norm1", _T.V_ENC_INPUT_NORM),
              (r"encoder\.layers\.(\d+)\.layer_norm2", _T.V_ENC_POST_ATTN_NORM),
              (r"encoder\.layers\.(\d+)\.self_attn\.q_proj", _T.V_ENC_ATTN_Q),
              (r"encoder\.layers\.(\d+)\.self_attn\.k_proj", _T.V_ENC_ATTN_K),
              (r"encoder\.layers\.(\d+)\.self_attn\.v_proj", _T.V_ENC_ATTN_V),
              (r"encoder\.layers\.(\d+)\.self_attn\.out_proj", _T.V_ENC_ATTN_O),
              (r"encoder\.layers\.(\d+)\.mlp\.fc1", _T.V_ENC_FFN_UP),
              (r"encoder\.layers\.(\d+)\.mlp\.fc2", _T.V_ENC_FFN_DOWN), (r"post_layernorm", _T.V_POST_NORM)]
LLAVA_PROJ_RULES = [(r"linear_1", "mm.0"), (r"linear_2", "mm.2")]  # llama.cpp's LLaVA-1.5 names


# --------------------------------------------------------------------------------------- families
def check_gguf_family(adapter: ModelAdapter) -> str:
    """The model's family (HF ``model_type``); a ``ValueError`` naming the supported ones otherwise."""
    cfg = adapter.model.config
    mt, tmt = cfg.model_type, cfg.get_text_config().model_type
    ok = mt in FAMILIES and tmt in TEXT_ARCH
    if ok and mt == "llava":
        ok = cfg.vision_config.model_type in LLAVA_TOWERS and TEXT_ARCH[tmt] in ("llama", "qwen2")
    if not ok:
        raise ValueError(f"save_gguf: model_type {mt!r} (text {tmt!r}) is not supported; supported families: "
                         f"{', '.join(FAMILIES)} (LLaVA with a CLIP or SigLIP tower and a Llama or Qwen2 "
                         f"text model)")
    return mt


# -------------------------------------------------------------------------------------- tokenizer
def _tokenizer_kind(j: dict[str, Any]) -> str:
    """``gpt2`` (byte-level BPE, Qwen2 pre-tokenizer) or ``llama`` (SentencePiece-style BPE)."""
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    model, text = j["model"], json.dumps(j.get("pre_tokenizer")) + json.dumps(j.get("normalizer"))
    if model["type"] == "BPE" and "ByteLevel" in text and json.dumps(PRETOKENIZE_REGEX) in text:
        return "gpt2"
    if model["type"] == "BPE" and model.get("byte_fallback") and "\u2581" in text.encode().decode("unicode_escape"):
        return "llama"
    raise ValueError("save_gguf: the tokenizer is neither byte-level BPE with Qwen2's pre-tokenizer nor "
                     "SentencePiece-style BPE (\u2581 + byte fallback); these are the ones GGUF export maps")


def _token_table(tok: Any, j: dict[str, Any], kind: str, n_vocab: int) -> tuple[list[str], list[int], list[float]]:
    """Token texts, llama.cpp token types and (SPM) scores, ``n_vocab`` long."""
    TT = gguf.TokenType
    vocab = tok.get_vocab()
    if max(vocab.values()) >= n_vocab:
        raise ValueError(f"save_gguf: token id {max(vocab.values())} is beyond the embedding ({n_vocab} rows)")
    tokens, types, scores = [f"[PAD{i}]" for i in range(n_vocab)], [TT.UNUSED] * n_vocab, [0.0] * n_vocab
    added = {a["id"]: a for a in j.get("added_tokens", [])}
    rank = {"".join(m if isinstance(m, list) else m.split(" ")): r for r, m in enumerate(j["model"]["merges"])}
    for text, i in vocab.items():
        tokens[i], types[i] = text, TT.NORMAL
        if i in added:
            types[i] = TT.CONTROL if added[i]["special"] else TT.USER_DEFINED
        elif kind == "llama" and re.fullmatch(r"<0x[0-9A-F]{2}>", text):
            types[i] = TT.BYTE
        elif kind == "llama" and text in rank:
            scores[i] = -(rank[text] + 1.0)
    if kind == "llama" and tok.unk_token_id is not None:
        types[tok.unk_token_id] = TT.UNKNOWN
    return tokens, [int(t) for t in types], scores


def tokenizer_kv(w: GGUFWriter | KVRecorder, adapter: ModelAdapter, n_vocab: int, arch: str) -> None:
    """``tokenizer.ggml.*`` from the model's HF tokenizer (and its chat template)."""
    tok = getattr(adapter.processor, "tokenizer", adapter.processor)
    j = json.loads(tok.backend_tokenizer.to_str())
    kind = _tokenizer_kind(j)
    tokens, types, scores = _token_table(tok, j, kind, n_vocab)
    w.add_tokenizer_model(kind)
    w.add_tokenizer_pre("qwen2" if kind == "gpt2" else "default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    if kind == "gpt2":
        w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in j["model"]["merges"]])
    else:
        w.add_token_scores(scores)
        w.add_add_space_prefix('"prepend_scheme": "first"' in json.dumps(j.get("pre_tokenizer")))
    single = (j.get("post_processor") or {}).get("single") or [{}]
    w.add_add_bos_token("SpecialToken" in single[0])
    w.add_add_eos_token(len(single) > 1 and "SpecialToken" in single[-1])
    tc = adapter.model.config.get_text_config()
    ids = {"bos": tok.bos_token_id if tok.bos_token_id is not None else tc.bos_token_id,
           "eos": tok.eos_token_id, "pad": tok.pad_token_id, "unk": tok.unk_token_id}
    for key, tid in ids.items():
        if tid is not None:
            getattr(w, f"add_{key}_token_id")(int(tid))
    template = getattr(tok, "chat_template", None) or getattr(adapter.processor, "chat_template", None)
    if isinstance(template, str):
        w.add_chat_template(template)


# ----------------------------------------------------------------------------------------- mmproj
def _match(rules: list, rel: str) -> str | None:
    """The GGUF base name of module ``rel`` (a rule's tensor, its block from the first group), or ``None``."""
    for pattern, kind in rules:
        if m := re.fullmatch(pattern, rel):
            return kind if isinstance(kind, str) else gguf.TENSOR_NAMES[kind].format(bid=int(m.group(1))
                                                                                  if m.groups() else None)
    return None


def _module_entries(f: GGUFFile, root: str, mod_root: nn.Module, rules: list, float_type: str,
                    skip: tuple[str, ...] = (), shift: dict[str, float] | None = None) -> None:
    """Every parameter under ``mod_root`` by rule (an error for one no rule names, unless in ``skip``)."""
    for rel, mod in mod_root.named_modules():
        own = dict(mod.named_parameters(recurse=False))
        if not own or rel in skip:
            continue
        name = _match(rules, rel)
        if name is None:
            raise ValueError(f"save_gguf: {root}.{rel} has no tensor in llama.cpp's mmproj")
        if isinstance(mod, nn.Linear):
            linear_entries(f, name, mod, f"{root}.{rel}", float_type)
            continue
        for pname, p in own.items():
            big = float_type if isinstance(mod, (nn.Conv2d, nn.Conv3d)) and pname == "weight" else "f32"
            f.entries.append((f"{name}.{pname}", float_array(p, big, (shift or {}).get(rel, 0.0)), None))


def _qwen_vl_entries(f: GGUFFile, adapter: ModelAdapter, float_type: str) -> None:
    root = adapter.model_parts.vision_tower
    tower = adapter.model.get_submodule(root)
    kernel = tower.patch_embed.proj.weight  # [embed, 3, t=2, p, p]
    if kernel.shape[2] != 2:
        raise ValueError(f"save_gguf: llama.cpp's Qwen-VL takes temporal_patch_size 2, not {kernel.shape[2]}")
    base = gguf.TENSOR_NAMES[_T.V_ENC_EMBD_PATCH]
    f.entries.append((f"{base}.weight", float_array(kernel[:, :, 0], float_type), None))
    f.entries.append((f"{base}.weight.1", float_array(kernel[:, :, 1], float_type), None))
    for i, block in enumerate(tower.blocks):
        qkv, d = block.attn.qkv, block.attn.qkv.out_features // 3
        for j, kind in enumerate((_T.V_ENC_ATTN_Q, _T.V_ENC_ATTN_K, _T.V_ENC_ATTN_V)):
            name = gguf.TENSOR_NAMES[kind].format(bid=i)
            linear_entries(f, name, qkv, f"{root}.blocks.{i}.attn.qkv", float_type, slice(j * d, (j + 1) * d))
    skip = ("patch_embed.proj", *(f"blocks.{i}.attn.qkv" for i in range(len(tower.blocks))))
    _module_entries(f, root, tower, QWEN_VL_RULES, float_type, skip)


def _siglip_like_entries(f: GGUFFile, adapter: ModelAdapter, float_type: str, family: str) -> None:
    root, proj_root = adapter.model_parts.vision_tower, adapter.model_parts.projector
    tower = adapter.model.get_submodule(root)
    cls = getattr(tower.embeddings, "class_embedding", None)
    if cls is not None:
        f.entries.append((gguf.TENSOR_NAMES[_T.V_ENC_EMBD_CLS], float_array(cls, "f32"), None))
    skip = ("embeddings",) + (("post_layernorm",) if family == "llava" else ())
    _module_entries(f, root, tower, CLIP_RULES, float_type, skip)
    proj = adapter.model.get_submodule(proj_root)
    if family == "llava":
        _module_entries(f, proj_root, proj, LLAVA_PROJ_RULES, float_type)
        return
    f.entries.append((gguf.TENSOR_NAMES[_T.V_MM_INP_PROJ] + ".weight",
                      float_array(proj.mm_input_projection_weight, float_type), None))
    f.entries.append((gguf.TENSOR_NAMES[_T.V_MM_SOFT_EMB_NORM] + ".weight",
                      float_array(proj.mm_soft_emb_norm.weight, "f32", 1.0), None))


def _act_kv(w: GGUFWriter | KVRecorder, act: str) -> None:
    """llama.cpp's encoder FFN activation: quick GELU (default), GELU (tanh) or SiLU."""
    if act == "quick_gelu":
        return
    if act in ("gelu", "gelu_pytorch_tanh", "gelu_new"):
        w.add_vision_use_gelu(True)
    elif act == "silu":
        w.add_vision_use_silu(True)
    else:
        raise ValueError(f"save_gguf: vision hidden_act {act!r}; llama.cpp's clip has quick_gelu, gelu, silu")


def _eps(mod: nn.Module) -> float:
    return float(getattr(mod, "eps", None) or mod.variance_epsilon)


def _family_kv(w: GGUFWriter | KVRecorder, adapter: ModelAdapter, family: str) -> dict[str, Any]:
    """Projector-specific keys; returns the tower's sizes for the common keys."""
    cfg, vc = adapter.model.config, adapter.model.config.vision_config
    tower = adapter.model.get_submodule(adapter.model_parts.vision_tower)
    if family in ("qwen2_vl", "qwen2_5_vl"):
        block = tower.blocks[0]
        w.add_vision_spatial_merge_size(vc.spatial_merge_size)
        if family == "qwen2_5_vl":
            full = list(vc.fullatt_block_indexes)
            pattern = full[0] + 1
            if any(b - a != pattern for a, b in itertools.pairwise(full)):
                raise ValueError(f"save_gguf: fullatt_block_indexes {full} are not evenly spaced")
            w.add_vision_n_wa_pattern(pattern)
            w.add_vision_window_size(vc.window_size)
            if vc.window_size != 112:
                logger.warning(f"gguf: llama.cpp's qwen2.5vl_merger uses 112 px windows; this model uses "
                               f"{vc.window_size} (same result only for images within one window)")
        return {"image_size": 560, "patch": vc.patch_size, "embd": block.norm1.weight.shape[0],
                "ff": block.mlp.down_proj.in_features if hasattr(block.mlp, "down_proj") else block.mlp.fc2.in_features,
                "heads": vc.num_heads, "eps": _eps(block.norm1), "act": vc.hidden_act}
    layer = tower.encoder.layers[0]
    if family == "llava":
        layers, strategy = len(tower.encoder.layers), cfg.vision_feature_select_strategy
        feat = cfg.vision_feature_layer
        if not isinstance(feat, int) or (strategy == "full") != (vc.model_type == "siglip_vision_model"):
            raise ValueError(f"save_gguf: llama.cpp's LLaVA takes one feature layer and drops a CLS token only "
                             f"when there is one; this model has vision_feature_layer {feat}, strategy {strategy}")
        w.add_array("clip.vision.feature_layer", [feat if feat >= 0 else layers + 1 + feat])
    else:  # gemma3: pooled to mm_tokens_per_image
        side = round(cfg.mm_tokens_per_image ** 0.5)
        if (vc.image_size // vc.patch_size) // side != 4:
            w.add_vision_projector_scale_factor((vc.image_size // vc.patch_size) // side)
    return {"image_size": vc.image_size, "patch": vc.patch_size, "embd": vc.hidden_size,
            "ff": vc.intermediate_size, "heads": vc.num_attention_heads, "eps": _eps(layer.layer_norm1),
            "act": vc.hidden_act}


def _mmproj_kv(w: GGUFWriter | KVRecorder, adapter: ModelAdapter, family: str, ftype: int) -> None:
    w.add_type(gguf.GGUFType.MMPROJ)
    w.add_file_type(ftype)
    w.add_clip_has_vision_encoder(True)
    w.add_clip_projector_type(PROJECTOR[family])
    sizes = _family_kv(w, adapter, family)
    w.add_vision_projection_dim(adapter.model.config.get_text_config().hidden_size)
    w.add_vision_image_size(sizes["image_size"])
    w.add_vision_patch_size(sizes["patch"])
    w.add_vision_embedding_length(sizes["embd"])
    w.add_vision_feed_forward_length(sizes["ff"])
    w.add_vision_block_count(len(adapter.model.get_submodule(adapter.model_parts.vision_blocks)))
    w.add_vision_head_count(sizes["heads"])
    w.add_vision_attention_layernorm_eps(sizes["eps"])
    _act_kv(w, sizes["act"])
    images = adapter.processor.image_processor
    w.add_vision_image_mean([float(x) for x in images.image_mean])
    w.add_vision_image_std([float(x) for x in images.image_std])


def build_mmproj_file(adapter: ModelAdapter, float_type: str) -> GGUFFile:
    """``mmproj.gguf``: the vision tower and projector in llama.cpp's clip layout for the family."""
    family = check_gguf_family(adapter)
    if family not in PROJECTOR:
        raise ValueError(f"save_gguf: {family} has no vision tower; VLM families: {', '.join(PROJECTOR)}")
    f = GGUFFile("clip")
    if family in ("qwen2_vl", "qwen2_5_vl"):
        _qwen_vl_entries(f, adapter, float_type)
    else:
        _siglip_like_entries(f, adapter, float_type, family)
    ftype = file_type(f)
    f.kv.add_name(str(getattr(adapter, "path", "model")).rstrip("/").split("/")[-1])
    _mmproj_kv(f.kv, adapter, family, ftype)
    return f
