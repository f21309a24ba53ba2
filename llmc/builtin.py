"""Built-in resources addressed as ``builtin:...`` paths, made locally on first use.

* ``builtin:tiny/<family>``: a tiny model of a supported family (``llmc.testing.tiny_models``).
* ``builtin:mme_synth/<split>``: the synthetic MME-format benchmark (``llmc.data.mme_synth``);
  the test split has 300 images (50 per category), the others 64.
* ``builtin:tiny_vlm``: the Qwen2-VL trained here on mme_synth, shipped in ``llmc/assets``
  (``docs/tiny_vlm.md``).
"""
from __future__ import annotations

import os
from pathlib import Path

PREFIX = "builtin:"
MME_SYNTH_IMAGES = {"test": 300}


def cache_root() -> Path:
    return Path(os.environ.get("LLMC_CACHE", Path.home() / ".cache" / "llmc"))


def is_builtin(path: str | None) -> bool:
    return isinstance(path, str) and path.startswith(PREFIX)


def resolve_builtin(path: str) -> str:
    """Materialize a ``builtin:`` resource in the cache and return its folder."""
    kind, _, name = path[len(PREFIX):].partition("/")
    if kind == "tiny_vlm" and not name:
        return str(Path(__file__).resolve().parent / "assets" / "tiny_qwen2vl_mme")
    if kind == "tiny":
        from llmc.testing.tiny_models import FAMILIES, ensure_tiny_model

        if name not in FAMILIES:
            raise ValueError(f"{path}: unknown tiny model {name!r}; valid: {list(FAMILIES)}")
        return str(ensure_tiny_model(name, cache_root() / "tiny"))
    if kind == "mme_synth":
        from llmc.data.mme_synth import SPLITS, generate

        if name not in SPLITS:
            raise ValueError(f"{path}: unknown split {name!r}; valid: {list(SPLITS)}")
        n_images = MME_SYNTH_IMAGES.get(name, 64)
        out = cache_root() / "mme_synth" / f"{name}-n{n_images}"
        if not out.exists():
            try:
                generate(out, name, n_images=n_images, seed=0)
            except FileExistsError:
                pass
        return str(out)
    raise ValueError(f"{path}: unknown built-in {kind!r}; valid: ['builtin:tiny/<family>', "
                     f"'builtin:mme_synth/<split>', 'builtin:tiny_vlm']")
