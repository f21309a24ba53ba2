"""Nothing a user owns is ever written to: the save path is checked against every input before any work.

``save.save_path`` is refused when it

* is, contains or lies inside an input the job reads: the model folder, the calibration data,
  the evaluation data, an AWQ ``load_scales`` record;
* is or contains the config file's folder or the current working directory (a save path *inside*
  them is the usual layout, e.g. ``runs/x`` beside the config);
* exists and is not a folder llmc wrote (``--overwrite`` replaces only llmc's own outputs, known by
  their marker file, see :mod:`llmc.export.atomic`).

Every error names both paths.
"""
from __future__ import annotations

import os
from pathlib import Path

from llmc.builtin import builtin_path, is_builtin
from llmc.config import LLMCConfig
from llmc.export.atomic import check_replaceable
from llmc.strict import ConfigError


def _path(p: str | None) -> Path | None:
    if p is None:
        return None
    return (builtin_path(p) if is_builtin(p) else Path(p)).resolve()


def job_inputs(cfg: LLMCConfig) -> dict[str, Path]:
    """What the job reads, by config key (``builtin:`` resources by the folder they live in)."""
    found = {"model.path": _path(cfg.model.path)}
    if cfg.calib is not None:
        found["calib.path"] = _path(cfg.calib.path)
    if cfg.eval is not None:
        names = [cfg.eval.name] if isinstance(cfg.eval.name, str) else cfg.eval.name
        default = "builtin:mme_synth/test" if "mme_synth" in names else None  # llmc.eval.run.DEFAULT_MME_SYNTH
        found["eval.path"] = _path(cfg.eval.path or default)
    for key in ("load_scales", "load_state"):
        if isinstance(cfg.quant.special.get(key), str):
            found[f"quant.special.{key}"] = _path(cfg.quant.special[key])
    return {k: v for k, v in found.items() if v is not None}


def _inside(a: Path, b: Path) -> bool:
    """``a`` is ``b`` or lies inside it."""
    return a == b or b in a.parents


def check_save_path(cfg: LLMCConfig, overwrite: bool) -> Path:
    """The resolved save path, after every refusal above; raises ``ConfigError`` / ``FileExistsError``."""
    save = Path(cfg.save.save_path).resolve()
    for key, path in job_inputs(cfg).items():
        if _inside(save, path) or _inside(path, save):
            where = "is" if save == path else ("lies inside" if _inside(save, path) else "contains")
            raise ConfigError(f"save.save_path: {save} {where} {key} {path}; llmc never writes into its inputs. "
                              f"Choose a separate folder")
    around = {"the current working directory": Path(os.getcwd()).resolve()}
    if cfg.source is not None:
        around["the config file's folder"] = Path(cfg.source).resolve().parent
    for what, path in around.items():
        if _inside(path, save):
            where = "is" if save == path else "contains"
            raise ConfigError(f"save.save_path: {save} {where} {what} {path}; with --overwrite llmc would replace "
                              f"it. Choose a subfolder, e.g. {save / 'runs' / 'job'}")
    check_replaceable(save, overwrite)
    return save
