"""One job: check, load, plan, calibrate, quantize, save, evaluate — everything under ``save.save_path``.

Every input is checked before any work (save path, model folder, eval task names); the job then
runs as named steps in a temporary folder (:class:`llmc.jobdir.JobFolder`): outputs are written
right after quantization, before the evaluations, and a later failure keeps them.
"""
from __future__ import annotations

import dataclasses
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from loguru import logger

from llmc import distributed as dist
from llmc.algorithms import Algorithm, build_algorithms
from llmc.algorithms.base import describe_pipeline
from llmc.builtin import is_builtin, local_path
from llmc.calib import batches as make_batches
from llmc.calib import load_samples
from llmc.config import ConfigError, LLMCConfig
from llmc.eval.job import JobEvaluation
from llmc.export.formats import EXPORTERS, FOLDERS, check_save_plan, export_trans
from llmc.export.hf import save_hf_folder
from llmc.guard import check_save_path
from llmc.jobdir import JobFailed, JobFolder, WorkerJob
from llmc.models import ModelAdapter, load_adapter
from llmc.models.checkpoint import check_checkpoint
from llmc.pipeline import capture, process_blocks, resolve_device
from llmc.plan import QuantPlan, build_plan
from llmc.quant.fake_linear import FakeQuantLinear

__all__ = ["JobFailed", "calibration_batches", "quantize_model", "run_job", "save_outputs"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def calibration_batches(cfg: LLMCConfig, adapter: ModelAdapter) -> list[dict[str, torch.Tensor]]:
    c = cfg.calib
    if c is None or c.path is None:
        raise ConfigError("calib: the chosen method needs calibration data; set calib.name and calib.path")
    samples = load_samples(c.name, local_path(c.path), c.n_samples, seed=c.seed if c.seed is not None else cfg.base.seed,
                           shuffle=c.shuffle)
    groups = make_batches(samples, c.bs)
    if not c.padding and any(len(g) > 1 for g in groups):
        raise ConfigError("calib.padding: false needs calib.bs: 1 (samples of a batch differ in length)")
    every = " (n_samples: null: every sample)" if c.n_samples is None else ""
    logger.info(f"calibration: {len(samples)} samples{every} from {c.path} in {len(groups)} batches of up to "
                f"{c.bs} (seq_len {c.seq_len})")
    return [adapter.batch_process(g, with_answer=True, chat_template=c.apply_chat_template,
                                  max_length=c.seq_len) for g in dist.shard(groups)]  # this rank's share


def _check_applied(plan: QuantPlan, adapter: ModelAdapter) -> None:
    """After quantization the model's fake-quant linears are exactly the plan's quantized layers
    (and, under torch.distributed, bit for bit the same on every rank)."""
    done = {n: m for n, m in adapter.model.named_modules() if isinstance(m, FakeQuantLinear)}
    wanted = {lp.name for lp in plan.quantized()}
    if set(done) != wanted:
        raise RuntimeError(f"the quantizer did not follow the plan: missing {sorted(wanted - set(done))[:5]}, "
                           f"unplanned {sorted(set(done) - wanted)[:5]}")
    if dist.active():
        dist.check_same(sum(dist.checksum(t) for m in done.values() for t in (m.weight, m.scale, m.zero, m.g_idx)
                            if t is not None), "the quantized weights")


def quantize_model(cfg: LLMCConfig, adapter: ModelAdapter, device: torch.device, state_dir: Path | None = None,
                   batches: list[dict] | None = None, plan: QuantPlan | None = None,
                   algos: list[Algorithm] | None = None) -> dict[str, str]:
    """Apply ``quant.method`` to the parts of the plan; returns layer -> setting of every quantized layer.

    ``plan`` and ``algos`` are built from ``cfg`` when not given (the job builds each once).
    With ``state_dir``, each algorithm writes its record there (AWQ's scales, GPTQ's integers).
    ``batches`` (model inputs) replace ``calib`` when given. Under torch.distributed each rank
    calibrates on its share of the batches (:func:`llmc.distributed.shard`).
    """
    algos = algos if algos is not None else build_algorithms(cfg.quant)
    plan = plan if plan is not None else build_plan(cfg.quant, adapter)
    logger.info(f"pipeline: {describe_pipeline(algos)}")
    for algo in algos:
        algo.prepare_model(adapter, device)
    quantizer = algos[-1]
    if not quantizer.needs_calibration():
        batches = []
    elif batches is None:
        batches = calibration_batches(cfg, adapter)
    else:
        batches = dist.shard(batches)
    for part in plan.parts:
        t0 = time.time()
        calls = capture(adapter, part.value, batches, device, cfg.quant.token_weight) if batches else []
        process_blocks(adapter, part.value, calls, quantizer, plan, device)
        logger.info(f"{quantizer.name} on {part.value}: {time.time() - t0:.1f}s")
    _check_applied(plan, adapter)
    if state_dir is not None:
        for algo in algos:
            for path in algo.save_state(state_dir):
                logger.info(f"{algo.name}: saved {path.name} (replay with {algo.replay_with})")
    return plan.settings()


def materialize(cfg: LLMCConfig) -> LLMCConfig:
    """The config with its ``builtin:`` paths made (tiny models, mme_synth splits) and resolved."""
    out = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=local_path(cfg.model.path)))
    if cfg.calib is not None:
        out.calib = dataclasses.replace(cfg.calib, path=local_path(cfg.calib.path))
    if cfg.eval is not None:
        out.eval = dataclasses.replace(cfg.eval, path=local_path(cfg.eval.path))
    out.notes = list(cfg.notes)
    return out


def precheck(cfg: LLMCConfig, overwrite: bool) -> tuple[Path, list[Algorithm]]:
    """Everything that can be checked before any work or any model weight is read: the save path and
    the algorithms (a bad method, special key or missing quant.act fails now)."""
    save = check_save_path(cfg, overwrite)
    algos = build_algorithms(cfg.quant)
    if cfg.eval is not None and cfg.eval.eval_pos:
        from llmc.eval.run import check_tasks

        check_tasks(cfg.eval)
    if not is_builtin(cfg.model.path):
        check_checkpoint(cfg.model.type, cfg.model.path)
    return save, algos


def _evaluate_and_report(cfg: LLMCConfig, job: JobFolder, evaluation: JobEvaluation) -> None:
    with job.step("evaluate after quantization"):
        evaluation.after_quant()
    for key in ("save_vllm", "save_sgl"):
        if getattr(cfg.save, key):
            with job.step(f"evaluate real_quant ({FOLDERS[key]}/)"):
                # every rank evaluates its share of rank 0's export (same machine or shared disk)
                evaluation.real_quant(Path(dist.broadcast_object(str(job.path / FOLDERS[key]) if dist.is_main()
                                                                 else None)))
            break
    with job.step("report"):
        evaluation.finish()


def _run(cfg: LLMCConfig, job: JobFolder, algos: list[Algorithm]) -> None:
    out = job.path  # None on ranks other than 0: they compute, rank 0 writes
    if dist.is_main():
        (out / "config.yml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    for note in cfg.notes:
        logger.info(note)
    seed_everything(cfg.base.seed)
    device = dist.init(resolve_device(cfg.run.device), cfg.run.dist_timeout_s)
    if dist.active():
        logger.info(dist.describe())
    with job.step("load model"):
        logger.info(f"llmc: model {cfg.model.type} from {cfg.model.path} on {device}")
        adapter = load_adapter(cfg.model.type, cfg.model.path, cfg.model.dtype, cfg.model.attn_implementation,
                               cfg.model.trust_remote_code)
    with job.step("plan"):
        plan = build_plan(cfg.quant, adapter)
        logger.info(f"plan: {plan.summary()}")
        keys = cfg.save.real_quant_keys() + (["tpu_check"] if cfg.save.tpu_check else [])
        check_save_plan(keys, plan.quantized())
        if cfg.save.save_gguf:
            from llmc.export.gguf_vision import check_gguf_family

            check_gguf_family(adapter)
    evaluation = JobEvaluation(cfg, adapter, device, out, plan)
    with job.step("evaluate before quantization"):
        evaluation.before_quant()
    with job.step("quantize"):
        quantize_model(cfg, adapter, device, state_dir=out, plan=plan, algos=algos)
        logger.info(f"quantized {len(plan.quantized())} linear layers")
        if dist.is_main():
            (out / "quant_layers.json").write_text(json.dumps(plan.to_json(), indent=1))
            job.kept += [p.name for p in out.iterdir() if p.suffix == ".pt"]  # replayable records
    if dist.is_main():
        save_outputs(cfg, adapter, job)
    dist.wait_for_main("save outputs")  # exports may outlast the collective timeout
    _evaluate_and_report(cfg, job, evaluation)


def save_outputs(cfg: LLMCConfig, adapter: ModelAdapter, job: JobFolder) -> None:
    """Every folder ``save`` asks for, each written whole or not at all, each kept once written."""
    out = job.path
    if cfg.save.save_trans:
        with job.step("save trans/"):
            export_trans(adapter, out / "trans", tpu_check=cfg.save.tpu_check)
            job.keep("trans")
        logger.info(f"saved transformed float model to {cfg.save.save_path}/trans")
    if cfg.save.save_fake:
        with job.step("save fake/"):
            save_hf_folder(adapter, out / "fake", fake=True)
            job.keep("fake")
        logger.info(f"saved fake-quant model to {cfg.save.save_path}/fake")
    for key in cfg.save.real_quant_keys():
        with job.step(f"save {FOLDERS[key]}/"):
            EXPORTERS[key](adapter, out / FOLDERS[key])
            job.keep(FOLDERS[key])
        logger.info(f"{key}: saved {cfg.save.save_path}/{FOLDERS[key]}")


def run_job(cfg: LLMCConfig, overwrite: bool = False) -> Path:
    """Run the whole job. ``save_path`` appears when it succeeded, or when a step failed after some
    outputs were finished (then :class:`JobFailed` is raised, naming the step and what was kept)."""
    dist.init(resolve_device(cfg.run.device), cfg.run.dist_timeout_s)  # no-op without torchrun
    save, algos = precheck(cfg, overwrite)
    cfg = materialize(cfg)
    job = JobFolder(save, cfg.run.log_level) if dist.is_main() else WorkerJob()
    try:
        _run(cfg, job, algos)
        dist.barrier()  # every rank finished: only then does rank 0 publish
    except BaseException as caught:
        exc = dist.on_failure(caught)  # under torchrun: another rank's failure is named as such
        err = job.fail(exc)
        if err is caught:
            raise
        raise err from (caught if err is exc else exc)
    job.succeed()
    dist.shutdown()
    logger.info(f"done: {save}")
    return save
