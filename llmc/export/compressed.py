"""compressed-tensors checkpoints (``save_vllm`` / ``save_sgl``), built with the library itself.

Each quantized layer is compressed by the compressed-tensors compressor the
library picks for its scheme (``infer_module_format``): ``pack-quantized``
(int4/int8 weights packed 32-bit-little-endian into ``weight_packed`` int32
``[out, in*b/32]``, ``weight_scale`` ``[out, groups]``, ``weight_shape``, and
for asymmetric schemes ``weight_zero_point`` packed along the output dim) for
weight-only schemes, ``int-quantized`` (int8 ``weight`` + ``weight_scale``) for
W8A8 with dynamic per-token activations. ``config.json`` gets the library's
``QuantizationConfig`` (written by ``ModelCompressor.update_config``).

Layer selection: the most common scheme targets ``["Linear"]``; other schemes
target their layers by name; ``ignore`` lists every float linear/conv in both
spellings, the in-memory name that transformers matches
(``model.language_model.layers.0.mlp.down_proj``) and the checkpoint name that
vLLM maps (``model.layers.0.mlp.down_proj``), so both skip exactly the float
layers. Integers are llmc's (``FakeQuantLinear.int_weight``): the compressor is
fed the dequantized weight, which re-quantizes to the same integers exactly.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from loguru import logger
from torch import nn

from llmc.export.base import Export
from llmc.export.packing import (
    StateDict,
    checkpoint_names,
    float_weight_modules,
    has_act_order,
    quantized_layers,
    spellings,
)
from llmc.quant.fake_linear import FakeQuantLinear
from llmc.quant.primitives import QuantSpec, dequantize

if TYPE_CHECKING:
    from compressed_tensors.quantization import QuantizationScheme

    from llmc.models.base import ModelAdapter

SchemeKey = tuple[QuantSpec, int | None]


def scheme_of(spec: QuantSpec, act_bits: int | None, targets: list[str]) -> "QuantizationScheme":
    """The compressed-tensors scheme of an llmc spec (weights; dynamic per-token int8 inputs if ``act_bits``)."""
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    group = spec.granularity == "per_group"
    weights = QuantizationArgs(num_bits=spec.bits, type="int", symmetric=spec.symmetric,
                               strategy="group" if group else "channel",
                               group_size=spec.group_size if group else None)
    inputs = None
    if act_bits is not None:
        inputs = QuantizationArgs(num_bits=act_bits, type="int", symmetric=True, strategy="token", dynamic=True)
    scheme = QuantizationScheme(targets=targets, weights=weights, input_activations=inputs)
    scheme.format = infer_module_format(nn.Linear, scheme).value
    return scheme


def why_not_expressible(m: FakeQuantLinear) -> str | None:
    """Why compressed-tensors cannot hold this layer (None: it can)."""
    if has_act_order(m):
        return "non-contiguous groups (g_idx, GPTQ act-order) were removed from compressed-tensors"
    if m.act_bits is not None and not (m.spec.bits == 8 and m.spec.symmetric and m.act_bits == 8):
        return f"W{m.spec.bits}A{m.act_bits} has no int kernel in compressed-tensors; only W8A8 symmetric"
    return None


def compress_layer(m: FakeQuantLinear, scheme: "QuantizationScheme", scale_dtype: torch.dtype) -> StateDict:
    """Local-name tensors of one layer (``weight_packed``, ``weight_scale``, ...) by the library's compressor."""
    from compressed_tensors.compressors import BaseCompressor

    spec = m.spec
    q = m.int_weight()
    scale = m.scale.detach().to(scale_dtype)
    sd: StateDict = {"weight": dequantize(q, scale.float(), m.zero.float(), m.g_idx),
                     "weight_scale": scale}
    if not spec.symmetric:  # library convention: signed zero point, z_ct = z - 2^(b-1)
        sd["weight_zero_point"] = (m.zero.detach() - 2 ** (spec.bits - 1)).round().to(torch.int8)
    out = BaseCompressor.get_value_from_registry(scheme.format).compress(sd, scheme)
    if m.bias is not None:
        out["bias"] = m.bias.detach()
    return {k: v.contiguous() for k, v in out.items()}


def build_config(groups: dict[SchemeKey, list[str]], name_map: dict[str, str], ignore: list[str]):
    """``QuantizationConfig`` with one config group per distinct scheme, status ``compressed``."""
    from compressed_tensors.config import CompressionFormat
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus

    ordered = sorted(groups.items(), key=lambda kv: -len(kv[1]))
    schemes = {}
    for i, ((spec, act), names) in enumerate(ordered):
        targets = ["Linear"] if i == 0 else spellings(name_map, names)
        schemes[f"group_{i}"] = scheme_of(spec, act, targets)
    formats = {s.format for s in schemes.values()}
    fmt = formats.pop() if len(formats) == 1 else CompressionFormat.mixed_precision.value
    return QuantizationConfig(config_groups=schemes, format=fmt, ignore=ignore,
                              quantization_status=QuantizationStatus.COMPRESSED), schemes, ordered


class CompressedExport(Export):
    """``save_vllm`` / ``save_sgl``: compressed-tensors, each layer compressed by the library's compressor.

    ``scale_dtype`` defaults to each layer's weight dtype (as llm-compressor writes). Layers the
    format cannot hold are written as their fake-quant float weight and listed in ``ignore``.
    """

    key, folder = "save_vllm", "vllm"

    def __init__(self, adapter: "ModelAdapter", scale_dtype: torch.dtype | None = None) -> None:
        super().__init__(adapter)
        self.scale_dtype = scale_dtype
        self.schemes: dict[SchemeKey, "QuantizationScheme"] = {}

    def why_not(self, name: str, m: FakeQuantLinear) -> str | None:
        return why_not_expressible(m)

    def layer(self, name: str, m: FakeQuantLinear) -> StateDict:
        key = (m.spec, m.act_bits)
        if key not in self.schemes:
            self.schemes[key] = scheme_of(m.spec, m.act_bits, ["Linear"])
        return compress_layer(m, self.schemes[key], self.scale_dtype or m.weight.dtype)

    def quantization_config(self):
        from compressed_tensors.compressors import ModelCompressor

        if not self.written:
            raise ValueError(f"compressed-tensors cannot express any quantized layer: {sorted(set(self.kept.values()))}")
        groups: dict[SchemeKey, list[str]] = {}
        for n, m in self.written.items():
            groups.setdefault((m.spec, m.act_bits), []).append(n)
        model = self.adapter.model
        float_names = float_weight_modules(model) + list(self.kept)
        name_map = checkpoint_names(model, list(self.written) + float_names)
        qconfig, schemes, _ = build_config(groups, name_map, spellings(name_map, float_names))
        counts = Counter(f"{s.format} w{s.weights.num_bits}" for s in schemes.values())
        logger.info(f"compressed-tensors: {len(self.written)} layers packed ({dict(counts)}), "
                    f"{len(float_names)} float modules ignored")
        if any(not spec.symmetric for spec, _ in groups):
            logger.info("compressed-tensors: asymmetric weights: vLLM serves the folder as it is; transformers "
                        "loads it with quantization_config=CompressedTensorsConfig(dequantize=True) (its packed "
                        "zero points are sized wrongly by transformers 5 otherwise; docs/runtimes.md)")
        return ModelCompressor(quantization_config=qconfig).update_config


def export_compressed_tensors(adapter: "ModelAdapter", out_dir: str | Path, overwrite: bool = False,
                              scale_dtype: torch.dtype | None = None) -> Path:
    """Write a compressed-tensors folder that vLLM, SGLang and transformers load."""
    if not quantized_layers(adapter.model):
        raise ValueError("export_compressed_tensors: the model has no quantized layers; run quantization first")
    return CompressedExport(adapter, scale_dtype).write(out_dir, overwrite)


def export_vllm(adapter: "ModelAdapter", out_dir: str | Path, overwrite: bool = False) -> Path:
    """``save_vllm``: the compressed-tensors folder (``vllm serve OUT``)."""
    return export_compressed_tensors(adapter, out_dir, overwrite)


def export_sgl(adapter: "ModelAdapter", out_dir: str | Path, overwrite: bool = False) -> Path:
    """``save_sgl``: the same compressed-tensors folder (SGLang reads it through vLLM's loader)."""
    return export_compressed_tensors(adapter, out_dir, overwrite)


def load_real_quant(folder: str | Path, dtype: torch.dtype = torch.float32, auto_class=None) -> nn.Module:
    """Reload a compressed-tensors export with transformers (eval position ``real_quant``).

    Always with ``CompressedTensorsConfig(dequantize=True)``: the library reads the packed
    tensors and dequantizes them at load time (bit-exact to the fake-quant weights). The other
    path of transformers 5.23 + compressed-tensors 0.20 keeps the linears compressed and their
    forward then fails (``'Linear' object has no attribute 'weight'``, seen on LLaVA's CLIP
    tower), and for asymmetric schemes it sizes the packed zero point wrongly.
    ``auto_class``: ``adapter.auto_model_class()`` (default: image-text-to-text).
    """
    import warnings

    from transformers import AutoModelForImageTextToText, CompressedTensorsConfig

    with warnings.catch_warnings():  # "loading attributes ... will be overwritten": intended
        warnings.filterwarnings("ignore", message="You passed `quantization_config`")
        model = (auto_class or AutoModelForImageTextToText).from_pretrained(
            folder, dtype=dtype, quantization_config=CompressedTensorsConfig(dequantize=True))
    return model.eval()
