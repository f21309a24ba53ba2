"""Evaluation inside a quantization job: the positions of ``eval.eval_pos``, one report.

``pretrain`` (float model, before any transform), ``transformed`` (transforms applied, fake
quant off), ``fake_quant`` (fake quant on) and ``real_quant`` (the compressed-tensors export
reloaded from disk). Fidelity metrics compare each later position with the float model on
held-out samples (never calibration ones).
"""
from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from loguru import logger

from llmc import distributed as dist
from llmc.builtin import local_path
from llmc.calib import load_samples
from llmc.config import LLMCConfig
from llmc.models.base import ModelAdapter
from llmc.plan import QuantPlan
from llmc.quant.fake_linear import set_fake_quant

POSITIONS = ("pretrain", "transformed", "fake_quant", "real_quant")


def describe_job(cfg: LLMCConfig, plan: QuantPlan | None) -> str:
    """One line: model, method, and per quantized part its settings from the plan (layer counts)."""
    head = f"{cfg.model.type} {Path(cfg.model.path).name}: {' + '.join(cfg.quant.methods)}"
    if plan is None:
        return head
    parts = []
    for part in plan.parts:
        counts = Counter(lp.describe() for lp in plan.quantized() if lp.part is part)
        parts.append(f"{part.value} " + ", ".join(f"{d} x{n}" for d, n in counts.items()))
    return f"{head} on {'; '.join(parts)}"


class JobEvaluation:
    """Call ``before_quant()``, quantize, ``after_quant()``, save, ``real_quant(folder)``, ``finish()``.

    ``streamed``: the model in memory is never whole (:mod:`llmc.models.stream`), so each position is
    evaluated on a model loaded from a folder with accelerate's dispatch (``device_map="auto"``, the
    free memory as ``max_memory``, an offload folder): the checkpoint (pretrain), ``trans/``
    (transformed) and ``fake/`` (fake_quant); :meth:`extra_folders` names those the job must write
    for the evaluation alone.

    Under torch.distributed every rank calls every method (lmms-eval gives each its share of the
    requests); ``out`` is rank 0's job folder on every rank, but only rank 0 writes under it.
    """

    def __init__(self, cfg: LLMCConfig, adapter: ModelAdapter, device: torch.device, out: Path,
                 plan: QuantPlan | None = None, streamed: bool = False) -> None:
        self.cfg, self.adapter, self.device, self.plan = cfg, adapter, device, plan
        self.eval = cfg.eval
        self.positions = list(self.eval.eval_pos) if self.eval is not None else []
        self.out = out
        self.work = out / "eval" if dist.is_main() else None  # None: another rank (temp dirs)
        self.results: dict[str, Any] = {}
        self.reference = None
        self.streamed = streamed
        self.outputs = None  # the job's JobOutputs, set by rank 0's runner
        self._tmp: tempfile.TemporaryDirectory | None = None  # another rank's offload folder

    def _offload(self) -> Path:
        """accelerate's offload folder for a dispatched model (one per rank)."""
        if self.work is not None:
            return self.work / "offload"
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix=f"llmc-offload-rank{dist.rank()}-")
        return Path(self._tmp.name)

    def extra_folders(self) -> dict[str, str]:
        """Folders a streamed job writes for its evaluation only (save key -> folder under the job)."""
        if not self.streamed:
            return {}
        extra = {}
        if "fake_quant" in self.positions and not self.cfg.save.save_fake:
            extra["save_fake"] = "eval/fake_model"
        if "transformed" in self.positions and not self.cfg.save.save_trans:
            extra["save_trans"] = "eval/trans_model"
        return extra

    def _folder(self, key: str, folder: str) -> Path:
        return self.out / self.extra_folders().get(key, folder)

    def _at(self, position: str, adapter: ModelAdapter, move: bool = True) -> None:
        """Evaluate ``adapter``'s model; ``move``: onto the job's device (a dispatched model stays put)."""
        from llmc.eval.run import evaluate_position

        self.results[position] = evaluate_position(adapter, self.eval, position, self.reference, self.work,
                                                   self.device if move else None)

    def _from_folder(self, position: str, folder: Path) -> None:
        """Evaluate the model saved in ``folder``, dispatched by accelerate."""
        from llmc.eval.dispatch import load_dispatched

        model = load_dispatched(folder, self.adapter.auto_model_class(), self.adapter.dtype, self.device,
                                self._offload())
        self._at(position, self.adapter.with_model(model), move=False)

    def _calibration(self) -> list:
        c = self.cfg.calib
        if c is None or c.path is None:
            return []
        return load_samples(c.name, local_path(c.path), c.n_samples, seed=c.seed if c.seed is not None else self.cfg.base.seed,
                            shuffle=c.shuffle)

    def before_quant(self) -> None:
        if not self.positions:
            return
        from llmc.eval.run import make_reference

        adapter = self.adapter
        if self.streamed:
            from llmc.eval.dispatch import load_dispatched

            adapter = adapter.with_model(load_dispatched(self.cfg.model.path, adapter.auto_model_class(),
                                                         adapter.dtype, self.device, self._offload()))
        if dist.is_main():  # fidelity is computed on rank 0 only
            self.reference = make_reference(adapter, self.eval, calibration=self._calibration(),
                                            work_dir=self.work, device=None if self.streamed else self.device)
        if "pretrain" in self.positions:
            self._at("pretrain", adapter, move=not self.streamed)

    def after_quant(self) -> None:
        if self.streamed:
            for position, key, folder in (("transformed", "save_trans", "trans"), ("fake_quant", "save_fake", "fake")):
                if position in self.positions:
                    self._from_folder(position, self._folder(key, folder))
            return
        if "transformed" in self.positions:
            set_fake_quant(self.adapter.model, False)
            try:
                self._at("transformed", self.adapter)
            finally:
                set_fake_quant(self.adapter.model, True)
        if "fake_quant" in self.positions:
            self._at("fake_quant", self.adapter)

    def real_quant(self, folder: Path) -> None:
        if "real_quant" not in self.positions:
            return
        from llmc.export.compressed import load_real_quant

        dtype = self.adapter.model.dtype
        model = load_real_quant(folder, dtype=dtype, auto_class=self.adapter.auto_model_class())
        self._at("real_quant", self.adapter.with_model(model))
        logger.info(f"real_quant: evaluated {folder.name}/ reloaded from disk")

    def finish(self) -> str | None:
        if self._tmp is not None:
            self._tmp.cleanup()
        if not self.results or not dist.is_main():
            return None
        from llmc.eval.report import write_report

        table = write_report(self.results, self.work, describe_job(self.cfg, self.plan))  # prints the table
        logger.info(f"evaluation report: {self.cfg.save.save_path}/eval/report.md")
        return table
