"""Evaluation inside a quantization job: the positions of ``eval.eval_pos``, one report.

``pretrain`` (float model, before any transform), ``transformed`` (transforms applied, fake
quant off), ``fake_quant`` (fake quant on) and ``real_quant`` (the compressed-tensors export
reloaded from disk). Fidelity metrics compare each later position with the float model on
held-out samples (never calibration ones).
"""
from __future__ import annotations

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
    """Call ``before_quant()``, quantize, ``after_quant()``, save, ``real_quant(folder)``, ``finish()``."""

    def __init__(self, cfg: LLMCConfig, adapter: ModelAdapter, device: torch.device, out: Path,
                 plan: QuantPlan | None = None) -> None:
        self.cfg, self.adapter, self.device, self.plan = cfg, adapter, device, plan
        self.eval = cfg.eval
        self.positions = list(self.eval.eval_pos) if self.eval is not None else []
        self.work = out / "eval" if out is not None else None  # None: a rank other than 0 (temp dirs)
        self.results: dict[str, Any] = {}
        self.reference = None

    def _at(self, position: str, adapter: ModelAdapter) -> None:
        from llmc.eval.run import evaluate_position

        self.results[position] = evaluate_position(adapter, self.eval, position, self.reference, self.work,
                                                   self.device)

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

        if dist.is_main():  # fidelity is computed on rank 0 only
            self.reference = make_reference(self.adapter, self.eval, calibration=self._calibration(),
                                            work_dir=self.work, device=self.device)
        if "pretrain" in self.positions:
            self._at("pretrain", self.adapter)

    def after_quant(self) -> None:
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

        dtype = next(self.adapter.model.parameters()).dtype
        model = load_real_quant(folder, dtype=dtype, auto_class=self.adapter.auto_model_class())
        self._at("real_quant", self.adapter.with_model(model))
        logger.info(f"real_quant: evaluated {folder.name}/ reloaded from disk")

    def finish(self) -> str | None:
        if not self.results or not dist.is_main():
            return None
        from llmc.eval.report import write_report

        table = write_report(self.results, self.work, describe_job(self.cfg, self.plan))  # prints the table
        logger.info(f"evaluation report: {self.cfg.save.save_path}/eval/report.md")
        return table
