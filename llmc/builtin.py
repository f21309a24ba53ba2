"""Built-in resources addressed as ``builtin:...`` paths, made locally on first use.

* ``builtin:tiny/<family>``: a tiny model of a supported family, for demos and tests
  (``llmc.testing.tiny_models``, imported only when such a path is resolved);
* ``builtin:mme_synth/<split>``: the synthetic MME-format benchmark (``llmc.data.mme_synth``);
  the test split has 300 images (50 per category), the others 64;
* ``builtin:tiny_vlm``: the Qwen2-VL trained here on mme_synth, shipped in ``llmc/assets``
  (``docs/tiny_vlm.md``).

Parsing a config never resolves these: :func:`builtin_path` only says where a resource lives,
:func:`resolve_builtin` (called when a job runs) makes it.
"""
from __future__ import annotations

import os
from pathlib import Path

from loguru import logger

PREFIX = "builtin:"
MME_SYNTH_IMAGES = {"test": 300}
VALID = "['builtin:tiny/<family>', 'builtin:mme_synth/<split>', 'builtin:tiny_vlm']"


def cache_root() -> Path:
    return Path(os.environ.get("LLMC_CACHE", Path.home() / ".cache" / "llmc"))


def is_builtin(path: str | None) -> bool:
    return isinstance(path, str) and path.startswith(PREFIX)


def _split(path: str) -> tuple[str, str]:
    kind, _, name = path[len(PREFIX):].partition("/")
    return kind, name


def builtin_path(path: str) -> Path:
    """Where the resource lives (or will live once made); nothing is made or imported."""
    kind, name = _split(path)
    if kind == "tiny_vlm" and not name:
        return Path(__file__).resolve().parent / "assets" / "tiny_qwen2vl_mme"
    if kind == "tiny" and name:
        return cache_root() / "tiny" / f"{name}-s0"
    if kind == "mme_synth" and name:
        return cache_root() / "mme_synth" / f"{name}-n{MME_SYNTH_IMAGES.get(name, 64)}"
    raise ValueError(f"{path}: unknown built-in {kind!r}; valid: {VALID}")


def check_builtin(path: str) -> None:
    """Validate a ``builtin:`` path's kind and name without making anything (config parsing)."""
    kind, name = _split(path)
    builtin_path(path)
    if kind == "mme_synth":
        from llmc.data.mme_synth import SPLITS

        if name not in SPLITS:
            raise ValueError(f"{path}: unknown split {name!r}; valid: {list(SPLITS)}")


def resolve_builtin(path: str) -> str:
    """Materialize a ``builtin:`` resource in the cache and return its folder."""
    check_builtin(path)
    kind, name = _split(path)
    out = builtin_path(path)
    if kind == "tiny":
        from llmc.testing.tiny_models import FAMILIES, ensure_tiny_model

        if name not in FAMILIES:
            raise ValueError(f"{path}: unknown tiny model {name!r}; valid: {list(FAMILIES)}")
        if not out.exists():
            logger.info(f"building the tiny {name} model in {out.parent} (first use only)")
        return str(ensure_tiny_model(name, out.parent))
    if kind == "mme_synth" and not out.exists():
        from llmc.data.mme_synth import generate

        n = MME_SYNTH_IMAGES.get(name, 64)
        logger.info(f"generating the mme_synth {name} split ({n} images) in {out} (first use only; ~20-40 s)")
        try:
            generate(out, name, n_images=n, seed=0)
        except FileExistsError:
            pass
    return str(out)


def local_path(path: str | None) -> str | None:
    """``path`` itself, or the folder of a ``builtin:`` resource (made on first use)."""
    return resolve_builtin(path) if is_builtin(path) else path
