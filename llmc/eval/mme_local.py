"""MME from local files as an lmms-eval task, and MME scoring per category.

Accepted data (``path``), all with MME's columns ``question_id, image, question,
answer, category`` and exactly two yes/no questions per (category, question_id):

* a folder written by :mod:`llmc.data.mme_synth` (``mme.jsonl`` + ``images/``): task ``mme_synth``;
* a ``datasets`` folder (``save_to_disk``; a ``DatasetDict`` uses its ``test`` split): task ``mme_local``;
* parquet files (one file, or a folder searched recursively, e.g. a copy of lmms-lab/MME): ``mme_local``.

:func:`prepare_task` normalizes the data into a ``datasets`` folder and writes a task
yaml next to it (``load_from_disk``: nothing is ever fetched from a hub). The yaml is
lmms-eval's own ``mme.yaml`` with only the data source and task name replaced, so the
prompt, generation settings, parsing and aggregation are lmms-eval's
(``lmms_eval.tasks.mme.utils``). Scores: per category acc + acc+ (x100 each, max 200),
perception = sum of its categories (max 2000 on the 10 real ones), cognition = sum of
the others (max 800 on the 4 real ones).

CLI (then ``--include_path OUT/tasks --tasks NAME``)::

    python -m llmc.eval.mme_local --path DATA --out OUT [--limit N]
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from llmc.eval.lmms_compat import mme_utils

COLUMNS = ("question_id", "image", "question", "answer", "category")
PERCEPTION: tuple[str, ...] = tuple(mme_utils.eval_type_dict["Perception"])
COGNITION: tuple[str, ...] = tuple(mme_utils.eval_type_dict["Cognition"])
MME_YAML = Path(mme_utils.__file__).with_name("mme.yaml")
UTILS_MODULE = "lmms_eval.tasks.mme.utils"
METRIC_KEYS = ("mme_perception_score", "mme_cognition_score")

__all__ = ["COGNITION", "PERCEPTION", "LocalTask", "category_scores", "data_kind", "load_mme_dataset",
           "main", "mme_summary", "prepare_task", "score_samples", "select_pairs", "summary_from_logged",
           "task_yaml"]


@dataclass(frozen=True)
class LocalTask:
    """A generated task: ``--include_path include_dir --tasks name``."""

    name: str
    include_dir: Path
    data_dir: Path
    n_questions: int


# ------------------------------------------------------------------------------------------ data
def data_kind(path: str | Path) -> str:
    """``mme_synth``, ``datasets`` or ``parquet``; an error names the accepted layouts."""
    p = Path(path)
    if p.is_file() and p.suffix == ".parquet":
        return "parquet"
    if p.is_dir():
        if (p / "mme.jsonl").is_file():
            return "mme_synth"
        if (p / "dataset_dict.json").is_file() or (p / "state.json").is_file():
            return "datasets"
        if any(p.rglob("*.parquet")):
            return "parquet"
    raise ValueError(f"{path}: not MME data; expected an mme_synth folder (mme.jsonl + images/), a `datasets` "
                     f"save_to_disk folder, or parquet file(s) with columns {list(COLUMNS)}")


def _load_synth(root: Path) -> Any:
    import datasets

    rows = [json.loads(line) for line in (root / "mme.jsonl").read_text(encoding="utf-8").splitlines() if line]
    for r in rows:
        r["image"] = str((root / r["image"]).resolve())
    features = datasets.Features({c: datasets.Image() if c == "image" else datasets.Value("string") for c in COLUMNS})
    return datasets.Dataset.from_list([{c: r[c] for c in COLUMNS} for r in rows], features=features)


def _load_saved(root: Path) -> Any:
    import datasets

    ds = datasets.load_from_disk(str(root))
    if isinstance(ds, datasets.DatasetDict):
        if "test" not in ds and len(ds) != 1:
            raise ValueError(f"{root}: a DatasetDict needs a 'test' split (or a single split); has {list(ds)}")
        ds = ds["test"] if "test" in ds else next(iter(ds.values()))
    return ds


def load_mme_dataset(path: str | Path, cache_dir: str | Path) -> Any:
    """The MME questions at ``path`` as a ``datasets.Dataset`` (``image`` an Image feature)."""
    import datasets

    p, kind = Path(path), data_kind(path)
    if kind == "mme_synth":
        ds = _load_synth(p)
    elif kind == "datasets":
        ds = _load_saved(p)
    else:
        files = [p] if p.is_file() else sorted(p.rglob("*.parquet"))
        ds = datasets.Dataset.from_parquet([str(f) for f in files], cache_dir=str(cache_dir))
    missing = [c for c in COLUMNS if c not in ds.column_names]
    if missing:
        raise ValueError(f"{path}: missing MME column(s) {missing}; has {ds.column_names}")
    if not isinstance(ds.features["image"], datasets.Image):
        ds = ds.cast_column("image", datasets.Image())
    return ds.select_columns(list(COLUMNS))


def select_pairs(question_ids: Sequence[str], categories: Sequence[str], limit: int | None) -> list[int]:
    """Row indices of whole MME pairs, at most ``limit`` questions, taken round-robin over categories.

    Every (category, question_id) must have exactly 2 rows (MME's acc+ is per pair).
    Rows keep their original order.
    """
    pairs: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, key in enumerate(zip(categories, question_ids)):
        pairs[key].append(i)
    bad = [k for k, v in pairs.items() if len(v) != 2]
    if bad:
        raise ValueError(f"MME needs exactly 2 questions per (category, question_id); {len(bad)} pair(s) are not, "
                         f"e.g. {bad[0]} has {len(pairs[bad[0]])}")
    if limit is None or limit >= len(question_ids):
        return list(range(len(question_ids)))
    by_cat: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for key in pairs:
        by_cat[key[0]].append(key)
    chosen: list[int] = []
    queues = [list(v) for v in by_cat.values()]
    while len(chosen) + 2 <= limit and any(queues):
        for q in queues:
            if q and len(chosen) + 2 <= limit:
                chosen += pairs[q.pop(0)]
    if not chosen:
        raise ValueError(f"limit={limit} is below one MME pair (2 questions)")
    return sorted(chosen)


# ------------------------------------------------------------------------------------------ task
class _Function(str):
    """A ``!function`` reference kept verbatim through a yaml round trip."""


def _function_loader() -> type:
    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: _Function(loader.construct_scalar(node)))
    return Loader


def _dumper() -> type:
    class Dumper(yaml.SafeDumper):
        pass

    Dumper.add_representer(_Function, lambda d, v: d.represent_scalar("!function", str(v)))
    return Dumper


def task_yaml(name: str, data_dir: Path) -> str:
    """lmms-eval's ``mme.yaml`` with the local data folder, task ``name`` and absolute function paths."""
    cfg = yaml.load(MME_YAML.read_text(encoding="utf-8"), Loader=_function_loader())

    def absolute(v: Any) -> Any:
        if isinstance(v, _Function):
            return _Function(f"{UTILS_MODULE}.{v.split('.', 1)[1]}" if v.startswith("utils.") else v)
        if isinstance(v, dict):
            return {k: absolute(x) for k, x in v.items()}
        if isinstance(v, list):
            return [absolute(x) for x in v]
        return v

    cfg = absolute(cfg)
    cfg.update(task=name, dataset_path=str(data_dir), dataset_kwargs={"load_from_disk": True}, test_split="test")
    return yaml.dump(cfg, Dumper=_dumper(), sort_keys=False, allow_unicode=True)


def prepare_task(path: str | Path, out_dir: str | Path, limit: int | None = None,
                 name: str | None = None, categories: Sequence[str] | None = None) -> LocalTask:
    """Normalize the MME data at ``path`` into ``out_dir/data`` and write ``out_dir/tasks/<name>.yaml``.

    ``name`` defaults to ``mme_synth`` for mme_synth data and ``mme_local`` otherwise.
    ``categories`` keeps only those categories (all when None); ``limit`` keeps at most that many
    questions (whole pairs, round-robin over categories).
    """
    import datasets

    out = Path(out_dir).absolute()
    name = name or ("mme_synth" if data_kind(path) == "mme_synth" else "mme_local")
    ds = load_mme_dataset(path, out / "hf_cache")
    if categories:
        present = sorted(set(ds["category"]))
        missing = [c for c in categories if c not in present]
        if missing:
            raise ValueError(f"eval.categories: {missing} not in the data at {path}; valid: {present}")
        keep = set(categories)
        ds = ds.select([i for i, c in enumerate(ds["category"]) if c in keep])
    ds = ds.select(select_pairs(ds["question_id"], ds["category"], limit))
    data_dir = out / "data"
    datasets.DatasetDict({"test": ds}).save_to_disk(str(data_dir))
    include = out / "tasks"
    include.mkdir(parents=True, exist_ok=True)
    (include / f"{name}.yaml").write_text(task_yaml(name, data_dir), encoding="utf-8")
    return LocalTask(name=name, include_dir=include, data_dir=data_dir, n_questions=len(ds))


# --------------------------------------------------------------------------------------- scoring
def score_samples(docs: Iterable[dict[str, Any]], predictions: Iterable[str]) -> list[dict[str, Any]]:
    """lmms-eval's per-question MME result ``{question_id, category, score}`` of each (doc, prediction)."""
    return [next(iter(mme_utils.mme_process_results(d, [p]).values())) for d, p in zip(docs, predictions)]


def category_scores(results: Iterable[dict[str, Any]]) -> dict[str, float]:
    """Per category acc + acc+ (0..200) with lmms-eval's ``mme_aggregate_results`` applied to each category."""
    by_cat: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        by_cat[r["category"]].append(r)
    return {c: float(mme_utils.mme_aggregate_results(rs)) for c, rs in by_cat.items()}


def mme_summary(per_category: dict[str, float]) -> dict[str, Any]:
    """Perception (sum of its categories), cognition (sum of the rest, as lmms-eval counts them), total."""
    perception = sum((v for c, v in per_category.items() if c in PERCEPTION), 0.0)
    cognition = sum((v for c, v in per_category.items() if c not in PERCEPTION), 0.0)
    order = [c for c in PERCEPTION + COGNITION if c in per_category] + sorted(
        c for c in per_category if c not in PERCEPTION + COGNITION)
    return {"categories": {c: per_category[c] for c in order}, "perception": perception,
            "cognition": cognition, "total": perception + cognition}


def summary_from_logged(samples: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """MME summary from lmms-eval's logged samples (in memory or a ``samples_*.jsonl`` file's rows)."""
    results = []
    for s in samples:
        hit = [s[k] for k in METRIC_KEYS if k in s]
        results += hit if hit else score_samples([s["doc"]], [s["filtered_resps"][0]])
    out = mme_summary(category_scores(results))
    out["n_questions"] = len(results)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmc.eval.mme_local", description=__doc__.split("\n\n")[0])
    parser.add_argument("--path", required=True, help="MME data: mme_synth folder, datasets folder or parquet")
    parser.add_argument("--out", required=True, type=Path, help="output folder (data/ and tasks/)")
    parser.add_argument("--limit", type=int, default=None, help="at most this many questions (whole pairs)")
    parser.add_argument("--name", default=None, help="task name (default mme_synth / mme_local)")
    args = parser.parse_args(argv)
    task = prepare_task(args.path, args.out, args.limit, args.name)
    print(f"task {task.name}: {task.n_questions} questions; use --include_path {task.include_dir} --tasks {task.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
