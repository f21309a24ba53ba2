"""Evaluate an adapter's model at one position of the job, and report positions side by side.

``eval_cfg`` is :class:`llmc.config.EvalConfig`:

* ``name``: ``mme`` (local MME data at ``path``: parquet, ``datasets`` folder or mme_synth folder),
  ``mme_synth`` (mme_synth data at ``path``; default ``builtin:mme_synth/test``, disjoint from
  the calibration split) or a list of task names (``mme`` / ``mme_synth`` entries as above, any
  other name an lmms-eval task whose data must already be local: the hub is never contacted);
* ``bs``, ``max_new_tokens`` (greedy), ``limit`` (questions; MME keeps whole pairs, round-robin
  over categories), ``fidelity_samples`` (held-out samples of the MME data for :mod:`fidelity`).

lmms-eval's exit status is never trusted: every requested task must come back with results.

Under torch.distributed every rank runs lmms-eval on its share of the documents (lmms-eval's
``torchrun`` backend); results come back on rank 0, which alone computes fidelity and reports
(the other ranks get ``None``).
"""
from __future__ import annotations

import atexit
import contextlib
import random
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from loguru import logger

from llmc import distributed as dist
from llmc.calib.sample import Sample
from llmc.eval import fidelity as fid
from llmc.eval import mme_local
from llmc.eval.lmms_compat import TaskManager, evaluator
from llmc.eval.lmms_wrapper import LLMCLMM, model_device
from llmc.eval.report import write_report
from llmc.models.base import ModelAdapter
from llmc.strict import ConfigError, suggest

LOCAL_TASKS = ("mme", "mme_synth")
DEFAULT_MME_SYNTH = "builtin:mme_synth/test"  # eval data of mme_synth when eval.path is not set
_PREPARED: dict[tuple, mme_local.LocalTask] = {}

__all__ = ["check_tasks", "evaluate_position", "fidelity_samples", "make_reference", "resolve_data", "write_report"]


def _task_names(eval_cfg: Any) -> list[str]:
    names = [eval_cfg.name] if isinstance(eval_cfg.name, str) else list(eval_cfg.name)
    if not names:
        raise ConfigError("eval.name: empty task list")
    return names


def check_tasks(eval_cfg: Any) -> None:
    """Every task name is ``mme``, ``mme_synth`` or an lmms-eval task; checked before any model loads."""
    others = [n for n in _task_names(eval_cfg) if n not in LOCAL_TASKS]
    if not others:
        return
    logger.info(f"eval.name: checking {others} against lmms-eval's task index")
    known = set(TaskManager("ERROR", include_defaults=True, model_name="llmc").all_tasks)
    bad = [n for n in others if n not in known]
    if bad:
        hints = "; ".join(f"{n!r}{suggest(n, known) or ' (no close match)'}" for n in bad)
        raise ConfigError(f"eval.name: unknown task(s) {hints}. Valid: {list(LOCAL_TASKS)} (local data) or one of "
                          f"lmms-eval's {len(known)} tasks (`python -m lmms_eval --tasks list` lists them)")


def resolve_data(path: str | None, name: str) -> str:
    """The local data folder/file of an ``mme`` / ``mme_synth`` evaluation (``path`` is ``eval.path``)."""
    from llmc.builtin import is_builtin, resolve_builtin

    if is_builtin(path):
        return resolve_builtin(path)
    if path is not None:
        if not Path(path).exists():
            raise ConfigError(f"eval.path: {path} does not exist")
        return str(path)
    if name == "mme_synth":
        return resolve_builtin(DEFAULT_MME_SYNTH)
    raise ConfigError(f"eval.path: `{name}` needs a local copy of the data (parquet, a `datasets` folder or an "
                      "mme_synth folder); nothing is downloaded")


def _work_root(work_dir: str | Path | None) -> Path:
    if work_dir is not None:
        return Path(work_dir)
    tmp = Path(tempfile.mkdtemp(prefix="llmc-eval-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    return tmp


def _prepare(eval_cfg: Any, name: str, work_dir: str | Path | None) -> mme_local.LocalTask:
    """The generated local MME task (prepared once per data, limit and name in this process)."""
    data = resolve_data(eval_cfg.path, name)
    cats = tuple(eval_cfg.categories or ())
    key = (str(Path(data).resolve()), eval_cfg.limit, name, cats)
    task = _PREPARED.get(key)
    if task is None or not task.data_dir.exists():
        out = _work_root(work_dir) / f"task-{len(_PREPARED)}"
        task_name = "mme_synth" if mme_local.data_kind(data) == "mme_synth" else "mme_local"
        task = mme_local.prepare_task(data, out, eval_cfg.limit, task_name, cats)
        _PREPARED[key] = task
    return task


@contextlib.contextmanager
def _on_device(adapter: ModelAdapter, device: str | torch.device | None) -> Iterator[None]:
    """Move the model to ``device`` for the evaluation and back to where it was afterwards."""
    if device is None:
        yield
        return
    home = model_device(adapter.model)
    adapter.model.to(device)
    try:
        yield
    finally:
        adapter.model.to(home)


@contextlib.contextmanager
def _rng_preserved() -> Iterator[None]:
    """lmms-eval seeds every RNG; the job's RNG streams continue as if it had not run."""
    state = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
             torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    try:
        yield
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])
        torch.set_rng_state(state[2])
        if state[3] is not None:
            torch.cuda.set_rng_state_all(state[3])


def _numeric_metrics(task_results: dict[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in task_results.items():
        metric, _, filt = k.partition(",")
        if "stderr" in metric or isinstance(v, (str, bool)) or v is None:
            continue
        out[metric if filt in ("", "none") else k] = float(v)
    return out


def _run_lmms_eval(adapter: ModelAdapter, eval_cfg: Any, tasks: list[str], include: list[str],
                   defaults: bool) -> dict[str, Any] | None:
    lm = LLMCLMM(adapter=adapter, batch_size=eval_cfg.bs, max_new_tokens=eval_cfg.max_new_tokens)
    manager = TaskManager("WARNING", include_path=include or None, include_defaults=defaults, model_name="llmc")
    res = evaluator.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=eval_cfg.limit,
                                    log_samples=True, bootstrap_iters=0, verbosity="WARNING",
                                    distributed_executor_backend="torchrun" if dist.active() else "accelerate")
    if not dist.is_main():
        return None  # results are gathered on rank 0
    missing = [t for t in tasks if t not in (res or {}).get("results", {})]
    if missing:
        raise RuntimeError(f"lmms-eval returned no results for task(s) {missing}")
    return res


def evaluate_position(adapter: ModelAdapter, eval_cfg: Any, position: str, reference: fid.Reference | None = None,
                      work_dir: str | Path | None = None,
                      device: str | torch.device | None = None) -> dict[str, Any] | None:
    """Evaluate the adapter's model as it is now; ``reference`` adds fidelity metrics (not at ``pretrain``).

    Under torch.distributed every rank must call it (each generates for its share); ranks other
    than 0 get None. Returns ``{"position", "tasks": {task: {"categories", "perception", "cognition", "total",
    "n_questions", "lmms_eval"} | {"metrics"}}, "fidelity"?: {...}, "time_s"}``.
    """
    t0 = time.time()
    names = _task_names(eval_cfg)
    local = {n: _prepare(eval_cfg, n, work_dir) for n in names if n in LOCAL_TASKS}
    tasks = list(dict.fromkeys(local[n].name if n in local else n for n in names))
    include = [str(t.include_dir) for t in local.values()]
    out: dict[str, Any] = {"position": position, "tasks": {}}
    with _on_device(adapter, device), _rng_preserved():
        res = _run_lmms_eval(adapter, eval_cfg, tasks, include, defaults=len(local) < len(names))
        if res is None:
            return None
        for t in tasks:
            if t in {x.name for x in local.values()}:
                out["tasks"][t] = mme_local.summary_from_logged(res["samples"][t])
                out["tasks"][t]["lmms_eval"] = _numeric_metrics(res["results"][t])
            else:
                out["tasks"][t] = {"metrics": _numeric_metrics(res["results"][t])}
        if reference is not None and position != "pretrain":
            out["fidelity"] = fid.fidelity(adapter, reference)
    out["time_s"] = time.time() - t0
    logger.info(f"eval at {position}: " + ", ".join(
        f"{t}={v.get('total', v.get('metrics'))}" for t, v in out["tasks"].items()))
    return out


def fidelity_samples(eval_cfg: Any, work_dir: str | Path | None = None) -> list[Sample]:
    """``eval_cfg.fidelity_samples`` questions (whole pairs, round-robin over categories) of the MME eval data."""
    names = [n for n in _task_names(eval_cfg) if n in LOCAL_TASKS]
    data = resolve_data(eval_cfg.path, names[0]) if names else resolve_data(None, "mme_synth")
    root = _work_root(work_dir)
    ds = mme_local.load_mme_dataset(data, root / "hf_cache")
    idx = mme_local.select_pairs(ds["question_id"], ds["category"], max(2, eval_cfg.fidelity_samples))
    folder = root / "fidelity_images"
    folder.mkdir(parents=True, exist_ok=True)
    samples = []
    for i in idx:
        row = ds[i]
        img = folder / f"{i:06d}.png"
        row["image"].convert("RGB").save(img)
        samples.append(Sample(row["question"], images=(img,), answer=row["answer"]))
    return samples


def make_reference(adapter: ModelAdapter, eval_cfg: Any, calibration: Sequence[Sample] = (),
                   work_dir: str | Path | None = None,
                   device: str | torch.device | None = None) -> fid.Reference | None:
    """Float-model reference on held-out samples (refused if any is in ``calibration``).

    ``None`` when ``eval_cfg.fidelity_samples`` is 0 (no fidelity metrics).
    """
    if eval_cfg.fidelity_samples <= 0:
        return None
    samples = fidelity_samples(eval_cfg, work_dir)
    fid.check_held_out(samples, calibration)
    with _on_device(adapter, device):
        return fid.collect_reference(adapter, samples, bs=eval_cfg.bs, max_new_tokens=eval_cfg.max_new_tokens)
