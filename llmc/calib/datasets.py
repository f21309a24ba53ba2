"""Calibration data loaders: turn a dataset on disk into a list of :class:`Sample`.

Two formats are supported (see :data:`LOADERS`):

``custom_mm``
    A folder holding ``samples.json``: a JSON list of objects
    ``{"image": "images/x.jpg" | ["a.png", "b.png"] | null, "question": str,
    "answer": str}`` (``image`` and ``answer`` optional; ``category`` and
    ``question_id`` are accepted and ignored). Image paths are relative to the
    folder; absolute paths are allowed only when they lie inside it.
``custom_txt``
    A folder of ``.txt`` files (one sample per file, sorted by name), a ``.json``
    file holding a list of strings, or a folder containing such a ``data.json``.

Every problem is reported with a :class:`ValueError` or
:class:`FileNotFoundError` naming the entry, the offending value and what was
expected.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Callable

from PIL import Image

from llmc.calib.sample import Sample

__all__ = ["LOADERS", "MM_KEYS", "batches", "load_custom_mm", "load_custom_txt", "load_samples"]

#: Keys accepted in a ``custom_mm`` entry (``category``/``question_id`` are ignored).
MM_KEYS: frozenset[str] = frozenset({"image", "question", "answer", "category", "question_id"})


def _require_dir(path: Path, what: str) -> Path:
    """Return ``path`` resolved, raising ``FileNotFoundError`` unless it is a folder."""
    if not path.exists():
        raise FileNotFoundError(f"{what} folder not found: {str(path)!r}")
    if not path.is_dir():
        raise FileNotFoundError(f"{what} path {str(path)!r} is not a folder")
    return path.resolve()


def _read_json(file: Path) -> Any:
    """Parse a JSON file, turning decode errors into a ``ValueError`` with the location."""
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"invalid JSON in {str(file)!r}: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from exc
    except UnicodeDecodeError as exc:
        raise ValueError(f"invalid JSON in {str(file)!r}: not UTF-8 text ({exc.reason})") from exc


def _resolve_image(root: Path, value: Any, idx: int) -> Path:
    """Resolve one image path of entry ``idx`` and check it is inside ``root`` and readable."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(
            f"entry {idx}: image path {value!r} is invalid; expected a non-empty string "
            "relative to the dataset folder"
        )
    raw = Path(value)
    resolved = (raw if raw.is_absolute() else root / raw).resolve()
    if not resolved.is_relative_to(root):
        raise ValueError(
            f"entry {idx}: image path {value!r} resolves to {str(resolved)!r}, which escapes "
            f"the dataset folder {str(root)!r}; expected a path inside the folder"
        )
    if not resolved.is_file():
        raise FileNotFoundError(
            f"entry {idx}: image file {value!r} not found (looked for {str(resolved)!r})"
        )
    try:
        with Image.open(resolved) as img:
            img.verify()
    except Exception as exc:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError...)
        raise ValueError(
            f"entry {idx}: image file {value!r} cannot be opened by PIL ({type(exc).__name__}: "
            f"{exc}); expected a valid image file"
        ) from exc
    return resolved


def _entry_images(root: Path, raw: Any, idx: int) -> tuple[Path, ...]:
    """Turn the ``image`` field of entry ``idx`` into a tuple of checked absolute paths."""
    if raw is None:
        return ()
    if isinstance(raw, str):
        return (_resolve_image(root, raw, idx),)
    if isinstance(raw, list):
        return tuple(_resolve_image(root, item, idx) for item in raw)
    raise ValueError(
        f"entry {idx}: 'image' is {raw!r} ({type(raw).__name__}); expected a string path, "
        "a list of string paths, or null"
    )


def _parse_mm_entry(root: Path, entry: Any, idx: int) -> Sample:
    """Validate one ``samples.json`` entry and build its :class:`Sample`."""
    if not isinstance(entry, dict):
        raise ValueError(
            f"entry {idx}: {entry!r} is a {type(entry).__name__}; expected a JSON object "
            "with keys 'question', 'image' (optional), 'answer' (optional)"
        )
    unknown = sorted(set(entry) - MM_KEYS)
    if unknown:
        raise ValueError(
            f"entry {idx}: unknown key(s) {unknown}; valid keys are {sorted(MM_KEYS)}"
        )
    if "question" not in entry:
        raise ValueError(f"entry {idx}: missing required key 'question' (expected a non-empty string)")
    question = entry["question"]
    if not isinstance(question, str) or not question.strip():
        raise ValueError(
            f"entry {idx}: 'question' is {question!r} ({type(question).__name__}); "
            "expected a non-empty string"
        )
    answer = entry.get("answer")
    if answer is not None and not isinstance(answer, str):
        raise ValueError(
            f"entry {idx}: 'answer' is {answer!r} ({type(answer).__name__}); expected a string or null"
        )
    images = _entry_images(root, entry.get("image"), idx)
    return Sample(question=question, images=images, answer=answer)


def load_custom_mm(path: str | Path) -> list[Sample]:
    """Load every sample of a ``custom_mm`` folder (``samples.json`` + images)."""
    root = _require_dir(Path(path), "custom_mm dataset")
    file = root / "samples.json"
    if not file.is_file():
        raise FileNotFoundError(f"custom_mm dataset {str(root)!r} has no samples.json (expected {str(file)!r})")
    data = _read_json(file)
    if not isinstance(data, list):
        raise ValueError(
            f"{str(file)!r} holds a {type(data).__name__}; expected a JSON list of sample objects"
        )
    samples = [_parse_mm_entry(root, entry, idx) for idx, entry in enumerate(data)]
    if not samples:
        raise ValueError(f"{str(file)!r} is an empty list; expected at least one sample")
    return samples


def _texts_from_json(file: Path) -> list[str]:
    """Read a JSON list of strings."""
    data = _read_json(file)
    if not isinstance(data, list):
        raise ValueError(f"{str(file)!r} holds a {type(data).__name__}; expected a JSON list of strings")
    for idx, item in enumerate(data):
        if not isinstance(item, str):
            raise ValueError(
                f"{str(file)!r} entry {idx}: {item!r} is a {type(item).__name__}; expected a string"
            )
    return data


def load_custom_txt(path: str | Path) -> list[Sample]:
    """Load text-only samples: a folder of ``.txt`` files, a ``.json`` list, or a folder with ``data.json``."""
    src = Path(path)
    if not src.exists():
        raise FileNotFoundError(f"custom_txt dataset not found: {str(src)!r}")
    if src.is_file():
        if src.suffix.lower() != ".json":
            raise ValueError(
                f"custom_txt file {str(src)!r} is not a .json file; expected a JSON list of "
                "strings or a folder of .txt files"
            )
        texts = _texts_from_json(src)
    elif (src / "data.json").is_file():
        texts = _texts_from_json(src / "data.json")
    else:
        files = sorted(p for p in src.iterdir() if p.is_file() and p.suffix.lower() == ".txt")
        texts = [p.read_text(encoding="utf-8") for p in files]
    samples = [Sample(question=t.strip()) for t in texts if t.strip()]
    if not samples:
        raise ValueError(
            f"custom_txt dataset {str(src)!r} holds no non-empty texts; expected .txt files, "
            "a data.json or a .json list of strings"
        )
    return samples


#: Dataset name -> loader taking the dataset path and returning all its samples.
LOADERS: dict[str, Callable[[str | Path], list[Sample]]] = {
    "custom_mm": load_custom_mm,
    "custom_txt": load_custom_txt,
}


def load_samples(
    name: str, path: str | Path, n_samples: int | None, seed: int = 42, shuffle: bool = False
) -> list[Sample]:
    """Load ``n_samples`` samples of dataset ``name`` from ``path``.

    The first ``n_samples`` are taken, after a shuffle seeded with ``seed`` when
    ``shuffle`` is true; ``n_samples=None`` means all of them. Asking for more
    samples than the dataset holds is an error.
    """
    if name not in LOADERS:
        raise ValueError(f"unknown calibration dataset {name!r}; valid names are {sorted(LOADERS)}")
    samples = list(LOADERS[name](path))
    if shuffle:
        random.Random(seed).shuffle(samples)
    if n_samples is None:
        return samples
    if n_samples < 1:
        raise ValueError(f"n_samples={n_samples} is not valid; use a number >= 1, or None for every sample")
    if n_samples > len(samples):
        raise ValueError(
            f"n_samples={n_samples} requested but dataset {name!r} at {str(path)!r} has only "
            f"{len(samples)} samples available"
        )
    return samples[:n_samples]


def batches(samples: list[Sample], bs: int) -> list[list[Sample]]:
    """Split ``samples`` into consecutive batches of ``bs`` (``bs=-1``: one batch of all)."""
    if isinstance(bs, bool) or not isinstance(bs, int) or (bs != -1 and bs < 1):
        raise ValueError(f"batch size bs={bs!r} is invalid; expected -1 (one batch) or an integer >= 1")
    if not samples:
        return []
    if bs == -1:
        return [list(samples)]
    return [list(samples[i : i + bs]) for i in range(0, len(samples), bs)]
