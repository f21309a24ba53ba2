"""The job configuration: YAML -> typed, validated dataclasses.

Sections: ``base``, ``model``, ``calib``, ``eval``, ``quant``, ``save``, ``run``.
Every unknown key is an error with a "did you mean" hint; relative paths are
resolved against the config file's folder.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from llmc.builtin import check_builtin, is_builtin
from llmc.quant.primitives import VALID_BITS, QuantSpec
from llmc.strict import ConfigError, from_dict, suggest

__all__ = ["ConfigError", "LLMCConfig", "load_config", "parse_config"]

DTYPES = ("auto", "float32", "bfloat16", "float16")
PATH_SPECIAL_KEYS = ("load_scales", "load_state")  # quant.special keys holding paths: resolved like the others


@dataclass
class BaseConfig:
    seed: int = 42


@dataclass
class ModelConfig:
    type: str
    path: str
    dtype: str = "auto"
    attn_implementation: str = "sdpa"
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"model.dtype: {self.dtype!r} is not valid{suggest(self.dtype, DTYPES)}; "
                              f"valid: {list(DTYPES)}")


@dataclass
class CalibConfig:
    """Calibration data; ``n_samples: null`` takes every sample of the dataset (logged)."""

    name: str = "custom_mm"
    path: str | None = None
    n_samples: int | None = 128
    bs: int = 1
    seq_len: int = 512
    padding: bool = True
    apply_chat_template: bool = True
    shuffle: bool = False
    seed: int | None = None

    def __post_init__(self) -> None:
        from llmc.calib.datasets import LOADERS

        if self.name not in LOADERS:
            raise ConfigError(f"calib.name: {self.name!r} is not a calibration dataset{suggest(self.name, LOADERS)}; "
                              f"valid: {sorted(LOADERS)}")
        if self.n_samples is not None and self.n_samples < 1:
            raise ConfigError(f"calib.n_samples: {self.n_samples} is not valid; use a number >= 1, or null for "
                              f"every sample of the dataset")
        if self.bs != -1 and self.bs < 1:
            raise ConfigError(f"calib.bs: {self.bs} is not valid; use -1 (all in one batch) or >= 1")
        if self.seq_len < 1:
            raise ConfigError(f"calib.seq_len: {self.seq_len} must be >= 1")


@dataclass
class EvalConfig:
    eval_pos: list[str] = field(default_factory=list)
    name: str | list[str] = "mme_synth"
    path: str | None = None
    bs: int = 1
    max_new_tokens: int = 8
    limit: int | None = None
    fidelity_samples: int = 16
    categories: list[str] | None = None  # MME categories to score (all when absent)

    def __post_init__(self) -> None:
        valid = ("pretrain", "transformed", "fake_quant", "real_quant")
        for pos in self.eval_pos:
            if pos not in valid:
                raise ConfigError(f"eval.eval_pos: {pos!r} is not valid{suggest(pos, valid)}; valid: {list(valid)}")
        if self.bs < 1 or self.max_new_tokens < 1:
            raise ConfigError(f"eval.bs ({self.bs}) and eval.max_new_tokens ({self.max_new_tokens}) must be >= 1")
        if self.fidelity_samples < 0 or (self.limit is not None and self.limit < 2):
            raise ConfigError("eval.fidelity_samples must be >= 0 and eval.limit >= 2 (whole yes/no pairs)")
        names = [self.name] if isinstance(self.name, str) else self.name
        if "mme" in names and self.path is None:
            raise ConfigError("eval.name: mme reads MME from disk (nothing is downloaded); set eval.path to a "
                              "folder of MME parquet files or a datasets folder")


@dataclass
class WeightConfig:
    bit: int = 4
    symmetric: bool = False
    granularity: Literal["per_channel", "per_group"] = "per_group"
    group_size: int = 128

    def __post_init__(self) -> None:
        if self.bit not in VALID_BITS:
            raise ConfigError(f"bit: {self.bit!r} is not supported; valid: {list(VALID_BITS)}")
        if self.granularity == "per_group" and self.group_size <= 0:
            raise ConfigError(f"group_size: {self.group_size} must be > 0 for per_group granularity")

    def to_spec(self) -> QuantSpec:
        return QuantSpec(self.bit, self.symmetric, self.granularity, self.group_size)


@dataclass
class ActConfig:
    """Activation fake quantization (W8A8 paths): symmetric, dynamic, per token."""

    bit: int = 8
    granularity: Literal["per_token"] = "per_token"
    symmetric: Literal[True] = True
    dynamic: Literal[True] = True


@dataclass
class OverrideConfig:
    """Per-layer-pattern setting: fnmatch ``pattern`` on full module names."""

    pattern: str
    weight: dict[str, Any] | None = None
    skip: bool = False

    def __post_init__(self) -> None:
        if self.weight is not None:
            from_dict(WeightConfig, self.weight, f"quant.overrides[{self.pattern!r}].weight")
        if self.weight is None and not self.skip:
            raise ConfigError(f"quant.overrides[{self.pattern!r}]: give `weight:` settings or `skip: true`")


@dataclass
class PartConfig:
    """Settings of one part (``vision`` or ``language``): the ``weight`` keys it names replace
    those of ``quant.weight``, the others are kept (validated by ``QuantConfig``)."""

    weight: dict[str, Any] | None = None


@dataclass
class QuantConfig:
    method: str | list[str] = "RTN"
    quant_objects: list[str] = field(default_factory=lambda: ["language"])
    weight: WeightConfig = field(default_factory=WeightConfig)
    act: ActConfig | None = None
    special: dict[str, Any] = field(default_factory=dict)
    skip_layers: list[str] = field(default_factory=list)
    overrides: list[OverrideConfig] = field(default_factory=list)
    token_weight: dict[str, float] | None = None
    vision: PartConfig | None = None
    language: PartConfig | None = None

    def __post_init__(self) -> None:
        parts = ("vision", "language")
        if not self.quant_objects:
            raise ConfigError("quant.quant_objects: empty; valid entries: ['vision', 'language']")
        for obj in self.quant_objects:
            if obj not in parts:
                raise ConfigError(f"quant.quant_objects: {obj!r} is not valid{suggest(obj, parts)}; "
                                  f"valid: {list(parts)}")
        if self.token_weight is not None:
            for k, v in self.token_weight.items():
                if k not in ("image", "text"):
                    raise ConfigError(f"quant.token_weight: unknown key {k!r}{suggest(k, ['image', 'text'])};"
                                      " valid keys: ['image', 'text']")
                if not isinstance(v, (int, float)) or v < 0:
                    raise ConfigError(f"quant.token_weight.{k}: {v!r} must be a number >= 0")
        for part in parts:
            sub = getattr(self, part)
            if sub is not None and sub.weight is not None:
                from_dict(WeightConfig, {**dataclasses.asdict(self.weight), **sub.weight}, f"quant.{part}.weight")

    @property
    def act_bits(self) -> int | None:
        return self.act.bit if self.act is not None else None

    @property
    def methods(self) -> list[str]:
        return [self.method] if isinstance(self.method, str) else list(self.method)

    def part_weight(self, part: str) -> WeightConfig:
        sub = getattr(self, part)
        if sub is None or not sub.weight:
            return self.weight
        return dataclasses.replace(self.weight, **sub.weight)


@dataclass
class SaveConfig:
    """What to write under ``save_path``: float folders and real-quant formats (see docs/export_*.md)."""

    save_path: str
    save_trans: bool = False
    save_fake: bool = False
    save_vllm: bool = False
    save_sgl: bool = False
    save_autoawq: bool = False
    save_gptq: bool = False
    save_gguf: bool = False
    tpu_check: bool = False
    gptq_format: Literal["auto", "gptq", "gptq_v2"] = "auto"  # auto: gptq (v1) symmetric, gptq_v2 asymmetric
    pack_vision: bool = False  # save_autoawq / save_gptq: pack the vision tower too (GPTQModel needs it float)
    verify: bool = True  # reload compressed-tensors exports and compare logits (llmc.export.verify)

    def __post_init__(self) -> None:
        if self.tpu_check and not self.save_trans:
            raise ConfigError("save.tpu_check: checks the transformed float export; set save.save_trans: true too")

    def real_quant_keys(self) -> list[str]:
        return [k for k in ("save_vllm", "save_sgl", "save_autoawq", "save_gptq", "save_gguf") if getattr(self, k)]


@dataclass
class RunConfig:
    """``stream``: read the language blocks one at a time from the checkpoint (auto: whenever the
    checkpoint, the method and the outputs allow it; the reason is logged otherwise).
    ``offload_activations``: where the calibration activations wait between blocks (:mod:`llmc.offload`)."""

    device: str = "auto"
    log_level: Literal["DEBUG", "INFO", "WARNING"] = "INFO"
    stream: Literal["auto", True, False] = "auto"
    offload_activations: Literal["auto", "device", "cpu", "disk"] = "auto"
    dist_timeout_s: float = 600.0  # torchrun jobs: a collective waiting longer fails the job (docs/distributed.md)

    def __post_init__(self) -> None:
        if not self.dist_timeout_s > 0:
            raise ConfigError(f"run.dist_timeout_s: {self.dist_timeout_s} must be > 0")


@dataclass
class LLMCConfig:
    model: ModelConfig
    save: SaveConfig
    base: BaseConfig = field(default_factory=BaseConfig)
    calib: CalibConfig | None = None
    eval: EvalConfig | None = None
    quant: QuantConfig = field(default_factory=QuantConfig)
    run: RunConfig = field(default_factory=RunConfig)
    source: Path | None = None
    notes: list[str] = field(default_factory=list, init=False)  # what parsing changed, logged by the job

    def __post_init__(self) -> None:
        if self.eval is not None and "real_quant" in self.eval.eval_pos and not (self.save.save_vllm or
                                                                               self.save.save_sgl):
            raise ConfigError("eval.eval_pos: real_quant evaluates the compressed-tensors export reloaded from "
                              "disk; set save.save_vllm: true (or save_sgl)")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("source")
        d.pop("notes")
        return d


def _resolve(path: str | None, root: Path, key: str) -> str | None:
    """An absolute path (relative ones against ``root``); ``builtin:`` paths are checked and kept as they are."""
    if path is None:
        return None
    if is_builtin(path):
        try:
            check_builtin(path)
        except ValueError as exc:
            raise ConfigError(f"{key}: {exc}") from exc
        return path
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else (root / p).resolve())


def _exists(path: str | None, key: str) -> None:
    if path is not None and not is_builtin(path) and not Path(path).exists():
        raise ConfigError(f"{key}: {path} does not exist")


ALIASES = {"model": {"torch_dtype": "dtype"}}  # ModelTC llmc spellings -> ours


def _apply_aliases(data: dict, notes: list[str]) -> dict:
    """Accept the spellings of configs written for ModelTC llmc (``model.torch_dtype``), with a note."""
    data = dict(data)
    for section, names in ALIASES.items():
        sub = data.get(section)
        if not isinstance(sub, dict):
            continue
        sub = dict(sub)
        for old, new in names.items():
            if old in sub:
                if new in sub:
                    raise ConfigError(f"{section}: give {new!r} or its alias {old!r}, not both")
                sub[new] = sub.pop(old)
                notes.append(f"config: {section}.{old} read as {section}.{new} (ModelTC llmc spelling)")
        data[section] = sub
    return data


def parse_config(data: Any, root: Path | None = None, source: Path | None = None) -> LLMCConfig:
    """Validate a config mapping; relative paths are resolved against ``root``."""
    if not isinstance(data, dict):
        raise ConfigError(f"config: expected a mapping of sections, got {type(data).__name__}")
    data = dict(data)
    for key in ("source", "notes"):
        if key in data:
            raise ConfigError(f"config: {key!r} is reserved")
    notes: list[str] = []
    cfg = from_dict(LLMCConfig, _apply_aliases(data, notes), "config")
    cfg.notes = notes
    root = root or Path.cwd()
    cfg.model.path = _resolve(cfg.model.path, root, "model.path")
    if is_builtin(cfg.save.save_path):
        raise ConfigError("save.save_path: a builtin: path cannot be written to; give a folder")
    cfg.save.save_path = _resolve(cfg.save.save_path, root, "save.save_path")
    if cfg.calib is not None:
        cfg.calib.path = _resolve(cfg.calib.path, root, "calib.path")
    if cfg.eval is not None:
        cfg.eval.path = _resolve(cfg.eval.path, root, "eval.path")
    for key in PATH_SPECIAL_KEYS:
        if isinstance(cfg.quant.special.get(key), str):
            cfg.quant.special[key] = _resolve(cfg.quant.special[key], root, f"quant.special.{key}")
    cfg.source = source
    _exists(cfg.model.path, "model.path")
    _exists(cfg.calib.path if cfg.calib is not None else None, "calib.path")
    _exists(cfg.eval.path if cfg.eval is not None else None, "eval.path")
    return cfg


def load_config(path: str | Path) -> LLMCConfig:
    """Read and validate a YAML config file."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory; give the YAML file (e.g. {path / 'default.yml'})")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    return parse_config(data, root=path.resolve().parent, source=path.resolve())
