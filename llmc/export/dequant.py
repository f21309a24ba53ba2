"""AutoAWQ GEMM folder -> float folder (``tpu/llm_dequant.py``), for TPU-MLIR or any float loader.

Works on llmc's ``save_autoawq`` output and on published AutoAWQ checkpoints
(single file or sharded with ``model.safetensors.index.json``). Every
``X.qweight``/``X.qzeros``/``X.scales`` triple becomes ``X.weight = (q - z) * s``
(``[out, in]``, computed in float32, stored in the folder's dtype); every
other tensor and every other file is copied unchanged; ``config.json`` loses
its ``quantization_config``. The output is a new folder written atomically;
the input is only read.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterator

import torch
from loguru import logger
from safetensors import safe_open
from safetensors.torch import save_file

from llmc.export.atomic import atomic_dir
from llmc.export.awq_gemm import awq_dequantize

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
WEIGHT_INDEX = "model.safetensors.index.json"
SHARD_BYTES = 4 * 1024**3


def awq_config(cfg: dict) -> dict:
    """The checkpoint's AWQ settings; a clear error for anything but 4-bit GEMM."""
    qc = cfg.get("quantization_config")
    if not qc or qc.get("quant_method") != "awq":
        raise ValueError(f"not an AWQ checkpoint: quantization_config.quant_method is "
                         f"{(qc or {}).get('quant_method')!r}, expected 'awq'")
    version = str(qc.get("version", qc.get("format", "gemm"))).lower()
    if version != "gemm" or int(qc.get("bits", qc.get("w_bit", 4))) != 4:
        raise ValueError(f"only 4-bit AutoAWQ GEMM checkpoints are supported; got version={version!r}, "
                         f"bits={qc.get('bits')}")
    return qc


def weight_files(src: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file that holds it."""
    index = src / WEIGHT_INDEX
    if index.exists():
        return {k: src / f for k, f in json.loads(index.read_text())["weight_map"].items()}
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{src} has no *.safetensors weights")
    out = {}
    for f in files:
        with safe_open(str(f), "pt") as h:
            out.update({k: f for k in h.keys()})
    return out


def _get(files: dict[str, Path], key: str) -> torch.Tensor:
    with safe_open(str(files[key]), "pt") as h:
        return h.get_tensor(key)


def float_tensors(files: dict[str, Path], dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """Every output tensor, in name order: packed triples dequantized, the rest as stored."""
    modules = {k.removesuffix(".qweight") for k in files if k.endswith(".qweight")}
    packed = {f"{m}.{s}" for m in modules for s in ("qweight", "qzeros", "scales")}
    names = sorted({f"{m}.weight" for m in modules} | (set(files) - packed))
    for name in names:
        m = name.removesuffix(".weight")
        if name.endswith(".weight") and m in modules:
            qw, qz, sc = (_get(files, f"{m}.{s}") for s in ("qweight", "qzeros", "scales"))
            yield name, awq_dequantize(qw, qz, sc, qw.shape[0] // sc.shape[0], dtype)
        else:
            yield name, _get(files, name)


def write_shards(tensors: Iterator[tuple[str, torch.Tensor]], out: Path, max_bytes: int) -> int:
    """Write ``model.safetensors`` (or numbered shards + index); returns the number of tensors."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    n = 0
    tmp_names = []
    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            tmp_names.append(_flush(shards[-1], out, len(tmp_names)))
            shards[-1], size = {}, 0
        shards[-1][name] = t.contiguous()
        size += nbytes
        n += 1
    tmp_names.append(_flush(shards[-1], out, len(tmp_names)))
    _name_shards(out, tmp_names)
    return n


def _flush(tensors: dict[str, torch.Tensor], out: Path, i: int) -> tuple[str, list[str]]:
    name = f"shard-{i:05d}.safetensors"
    save_file(tensors, str(out / name), metadata={"format": "pt"})
    return name, list(tensors)


def _name_shards(out: Path, shards: list[tuple[str, list[str]]]) -> None:
    if len(shards) == 1:
        (out / shards[0][0]).rename(out / "model.safetensors")
        return
    weight_map = {}
    for i, (tmp, keys) in enumerate(shards):
        final = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        (out / tmp).rename(out / final)
        weight_map.update({k: final for k in keys})
    (out / WEIGHT_INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))


def _copy_other_files(src: Path, dst: Path) -> None:
    for p in src.iterdir():
        if p.name == "config.json" or p.name == WEIGHT_INDEX or p.suffix == ".safetensors":
            continue
        if p.is_dir():
            shutil.copytree(p, dst / p.name)
        else:
            shutil.copy2(p, dst / p.name)


def dequantize_awq_folder(src: str | Path, dst: str | Path, dtype: str | None = None,
                          max_shard_bytes: int = SHARD_BYTES) -> Path:
    """AWQ folder ``src`` -> new float folder ``dst`` (refused if it exists). ``dtype`` defaults to the config's."""
    src, dst = Path(src).resolve(), Path(dst).resolve()
    if dst == src or src in dst.parents or dst in src.parents:
        raise ValueError(f"--output {dst} overlaps --input {src}; the input is never written to")
    if dst.exists():
        raise FileExistsError(f"--output {dst} already exists; the tool never overwrites, choose a new folder")
    cfg = json.loads((src / "config.json").read_text())
    awq_config(cfg)
    name = dtype or cfg.get("dtype") or cfg.get("torch_dtype") or "float16"
    if name not in _DTYPES:
        raise ValueError(f"dtype {name!r} is not valid; valid: {list(_DTYPES)}")
    files = weight_files(src)
    with atomic_dir(dst) as tmp:
        _copy_other_files(src, tmp)
        n = write_shards(float_tensors(files, _DTYPES[name]), tmp, max_shard_bytes)
        cfg.pop("quantization_config")
        cfg["dtype"] = name
        cfg.pop("torch_dtype", None)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    logger.info(f"dequantized {src} -> {dst} ({n} tensors, {name})")
    return dst
