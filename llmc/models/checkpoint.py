"""Checks of a checkpoint folder before any weight is read: it is what ``model.type`` says, and whole.

* the folder exists and holds ``config.json`` (a path that is not a folder is never taken for a
  hub repository id: nothing is downloaded);
* ``config.json``'s ``model_type`` is one the adapter handles; otherwise the error names the
  adapter that would (or ``auto``);
* every safetensors file is complete: its header parses and the file is as long as the header
  says (a truncated download is named); with a ``model.safetensors.index.json``, every shard it
  names exists and holds the tensors the index puts there.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from llmc.strict import ConfigError

INDEX = "model.safetensors.index.json"


def read_config(path: str | Path, key: str = "model.path") -> dict[str, Any]:
    """``config.json`` of a local checkpoint folder; clear errors for a missing folder or file."""
    folder = Path(path)
    if not folder.exists():
        raise ConfigError(f"{key}: {folder} does not exist (a local checkpoint folder is expected; "
                          f"nothing is downloaded)")
    if not folder.is_dir():
        raise ConfigError(f"{key}: {folder} is a file; give the checkpoint's folder (with config.json)")
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise ConfigError(f"{key}: {folder} has no config.json; is it a Hugging Face checkpoint folder "
                          f"(save_pretrained output)?")
    try:
        data = json.loads(cfg_file.read_text())
    except ValueError as exc:
        raise ConfigError(f"{key}: {cfg_file} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{key}: {cfg_file} holds no JSON object")
    return data


def safetensors_header(file: Path) -> dict[str, Any]:
    """The header of a safetensors file; ``ConfigError`` naming the file when it is cut short."""
    size = file.stat().st_size
    with file.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ConfigError(f"{file}: truncated safetensors file ({size} bytes, no header); download it again")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise ConfigError(f"{file}: truncated safetensors file ({size} bytes, header of {n} bytes); "
                              f"download it again")
        try:
            header = json.loads(f.read(n))
        except ValueError as exc:
            raise ConfigError(f"{file}: corrupt safetensors header ({exc})") from exc
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if size < 8 + n + end:
        raise ConfigError(f"{file}: truncated safetensors file: {size} bytes, the header needs {8 + n + end}; "
                          f"download or copy it again")
    return header


def check_weights(folder: str | Path) -> list[Path]:
    """Every safetensors file of the checkpoint is whole and the index (if any) is covered; returns the files."""
    folder = Path(folder)
    index = folder / INDEX
    if index.is_file():
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{index}: not a valid safetensors index ({exc})") from exc
        files = sorted({folder / s for s in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ConfigError(f"{index} names shard(s) that are not in the folder: {missing}")
        headers = {f.name: safetensors_header(f) for f in files}
        absent = [k for k, s in weight_map.items() if k not in headers[s]]
        if absent:
            raise ConfigError(f"{index}: {len(absent)} tensor(s) are not in the shard the index names, "
                              f"e.g. {absent[:3]}; the shards do not cover the index")
        return files
    files = sorted(folder.glob("*.safetensors"))
    for f in files:
        safetensors_header(f)
    return files


def checkpoint_types(config: dict[str, Any]) -> tuple[str | None, list[str]]:
    """``(model_type, architectures)`` of a ``config.json``."""
    return config.get("model_type"), list(config.get("architectures") or [])


def check_model_type(model_type: str, config: dict[str, Any], path: str | Path) -> None:
    """Refuse a ``model.type`` whose adapter does not handle the checkpoint's ``model_type``."""
    from llmc.models.registry import adapter_class, adapters_for

    cls = adapter_class(model_type)
    found, archs = checkpoint_types(config)
    if cls.model_type == "auto" or found is None or found in cls.hf_model_types:
        return
    match = [c.model_type for c in adapters_for(found)]
    hint = f"use model.type: {match[0]}" if match else "no explicit adapter handles it; try model.type: auto"
    raise ConfigError(f"model.type: {model_type!r} does not match the checkpoint at {path}: its config.json says "
                      f"model_type {found!r} (architectures {archs}); {hint}")


def check_checkpoint(model_type: str, path: str | Path) -> dict[str, Any]:
    """All checks above, before the model is loaded; returns ``config.json``."""
    config = read_config(path)
    check_model_type(model_type, config, path)
    check_weights(path)
    return config
