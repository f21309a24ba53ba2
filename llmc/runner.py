"""One job: load, transform, calibrate, quantize, save — everything under ``save.save_path``."""
from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from loguru import logger

from llmc.algorithms import build_algorithms
from llmc.calib import batches as make_batches
from llmc.calib import load_samples
from llmc.config import ConfigError, LLMCConfig
from llmc.eval.job import JobEvaluation
from llmc.export.atomic import atomic_dir
from llmc.context import SpecResolver
from llmc.export.formats import EXPORTERS, FOLDERS, check_save_plan, export_trans
from llmc.export.hf import save_hf_folder
from llmc.models import ModelAdapter, load_adapter
from llmc.pipeline import capture, process_blocks, resolve_device
from llmc.quant.fake_linear import FakeQuantLinear
from llmc.quant.primitives import QuantSpec
from llmc.quant.resolve import check_layers, make_resolver

LOG_NAME = "llmc.log"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_paths(cfg: LLMCConfig, overwrite: bool) -> Path:
    """The save path must be new (or ``overwrite``) and never the model's folder or around it."""
    save = Path(cfg.save.save_path).resolve()
    model = Path(cfg.model.path).resolve()
    if save == model or model in save.parents or save in model.parents:
        raise ConfigError(f"save.save_path: {save} overlaps the model folder {model}; "
                          f"the model's folder is never written to, choose a separate folder")
    if save.exists() and not overwrite:
        raise FileExistsError(f"save.save_path: {save} already exists; choose another path or pass --overwrite")
    return save


def calibration_batches(cfg: LLMCConfig, adapter: ModelAdapter) -> list[dict[str, torch.Tensor]]:
    c = cfg.calib
    if c is None or c.path is None:
        raise ConfigError("calib: the chosen method needs calibration data; set calib.name and calib.path")
    samples = load_samples(c.name, c.path, c.n_samples, seed=c.seed if c.seed is not None else cfg.base.seed,
                           shuffle=c.shuffle)
    groups = make_batches(samples, c.bs)
    if not c.padding and any(len(g) > 1 for g in groups):
        raise ConfigError("calib.padding: false needs calib.bs: 1 (samples of a batch differ in length)")
    logger.info(f"calibration: {len(samples)} samples from {c.path} in {len(groups)} batches (seq_len {c.seq_len})")
    return [adapter.batch_process(g, with_answer=True, chat_template=c.apply_chat_template,
                                  max_length=c.seq_len) for g in groups]


def plan_layers(cfg: LLMCConfig, adapter: ModelAdapter) -> tuple[list[str], SpecResolver, dict[str, QuantSpec]]:
    """The parts to quantize, the spec resolver and every block linear's spec, checked up front."""
    parts = [p for p in ("vision", "language") if p in cfg.quant.quant_objects]
    for p in parts:
        if p not in adapter.available_parts():
            raise ConfigError(f"quant.quant_objects: {adapter.model_type} has no {p} part; "
                              f"valid: {adapter.available_parts()}")
    resolver = make_resolver(cfg.quant, adapter.default_skip)
    return parts, resolver, check_layers(adapter, parts, resolver)


def quantize_model(cfg: LLMCConfig, adapter: ModelAdapter, device: torch.device,
                   state_dir: Path | None = None, batches: list[dict] | None = None) -> dict[str, str]:
    """Apply ``quant.method`` to the parts in ``quant_objects``; returns layer -> spec summary.

    With ``state_dir``, each algorithm writes its replayable state there (AWQ's scales).
    ``batches`` (model inputs) replace ``calib`` when given.
    """
    algos = build_algorithms(cfg.quant)
    parts, resolver, _ = plan_layers(cfg, adapter)
    for algo in algos:
        algo.prepare_model(adapter, device)
    quantizer = algos[-1]
    if not quantizer.needs_calib:
        batches = []
    elif batches is None:
        batches = calibration_batches(cfg, adapter)
    for part in parts:
        t0 = time.time()
        calls = capture(adapter, part, batches, device, cfg.quant.token_weight) if batches else []
        process_blocks(adapter, part, calls, quantizer, resolver, device, cfg.quant.act_bits)
        logger.info(f"{quantizer.name} on {part}: {time.time() - t0:.1f}s")
    if state_dir is not None:
        for algo in algos:
            for path in algo.save_state(state_dir):
                logger.info(f"{algo.name}: saved {path.name} (replay with quant.special.load_scales)")
    return {n: m.spec.describe() for n, m in adapter.model.named_modules() if isinstance(m, FakeQuantLinear)}


def _run(cfg: LLMCConfig, out: Path) -> None:
    (out / "config.yml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    seed_everything(cfg.base.seed)
    device = resolve_device(cfg.run.device)
    logger.info(f"llmc: model {cfg.model.type} from {cfg.model.path} on {device}")
    adapter = load_adapter(cfg.model.type, cfg.model.path, cfg.model.dtype, cfg.model.attn_implementation,
                           cfg.model.trust_remote_code)
    _, _, specs = plan_layers(cfg, adapter)
    keys = cfg.save.real_quant_keys() + (["tpu_check"] if cfg.save.tpu_check else [])
    check_save_plan(keys, {n: (s, cfg.quant.act_bits) for n, s in specs.items()}, adapter.parts.vision_tower)
    evaluation = JobEvaluation(cfg, adapter, device, out)
    evaluation.before_quant()
    layers = quantize_model(cfg, adapter, device, state_dir=out)
    logger.info(f"quantized {len(layers)} linear layers")
    (out / "quant_layers.json").write_text(json.dumps(layers, indent=1))
    evaluation.after_quant()
    save_outputs(cfg, adapter, out)
    for key in ("save_vllm", "save_sgl"):
        if getattr(cfg.save, key):
            evaluation.real_quant(out / FOLDERS[key])
            break
    evaluation.finish()


def save_outputs(cfg: LLMCConfig, adapter: ModelAdapter, out: Path) -> None:
    """Every folder ``save`` asks for, each written whole or not at all."""
    if cfg.save.save_trans:
        export_trans(adapter, out / "trans", tpu_check=cfg.save.tpu_check)
        logger.info(f"saved transformed float model to {cfg.save.save_path}/trans")
    if cfg.save.save_fake:
        save_hf_folder(adapter, out / "fake", fake=True)
        logger.info(f"saved fake-quant model to {cfg.save.save_path}/fake")
    for key in cfg.save.real_quant_keys():
        EXPORTERS[key](adapter, out / FOLDERS[key])
        logger.info(f"{key}: saved {cfg.save.save_path}/{FOLDERS[key]}")


def run_job(cfg: LLMCConfig, overwrite: bool = False) -> Path:
    """Run the whole job; ``save_path`` appears only when everything succeeded."""
    save = check_paths(cfg, overwrite)
    build_algorithms(cfg.quant)  # a bad method, special key or missing quant.act fails before any work
    failed_log = save.parent / f"{save.name}.failed.log"
    with atomic_dir(save, overwrite) as out:
        sink = logger.add(out / LOG_NAME, level=cfg.run.log_level)
        try:
            _run(cfg, out)
        except BaseException:
            logger.exception("job failed")
            logger.remove(sink)
            shutil.copy(out / LOG_NAME, failed_log)
            logger.error(f"the log of the failed job is at {failed_log}")
            raise
        logger.remove(sink)
    logger.info(f"done: {save}")
    return save
