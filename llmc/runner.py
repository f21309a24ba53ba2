"""One job: check, load, plan, calibrate, quantize, save, evaluate — everything under ``save.save_path``.

Every input is checked before any work (save path, model folder, eval task names); the job then
runs as named steps in a temporary folder (:class:`llmc.jobdir.JobFolder`): outputs are written
right after quantization, before the evaluations, and a later failure keeps them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from loguru import logger

from llmc import distributed as dist
from llmc.algorithms import Algorithm, build_algorithms
from llmc.algorithms.base import describe_pipeline
from llmc.algorithms.records import GPTQRecord
from llmc.builtin import is_builtin, local_path
from llmc.calib import batches as make_batches
from llmc.calib import load_samples
from llmc.config import ConfigError, LLMCConfig
from llmc.context import hidden_input
from llmc.eval.job import JobEvaluation
from llmc.export.base import ExportMismatch
from llmc.export.formats import EXPORTERS, FOLDERS, check_save_plan
from llmc.export.outputs import JobOutputs
from llmc.export.verify import check_reload
from llmc.guard import check_save_path
from llmc.jobdir import JobFailed, JobFolder, WorkerJob
from llmc.models import ModelAdapter, load_adapter
from llmc.models.checkpoint import check_checkpoint
from llmc.offload import ActivationStore
from llmc.pipeline import (
    AfterBlock,
    capture,
    check_dtype,
    offload_calls,
    process_blocks,
    resolve_device,
)
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
    """After quantization the model's fake-quant linears are exactly the plan's quantized layers (that
    every rank holds the same blocks is checked block by block: :func:`llmc.pipeline.process_blocks`)."""
    done = {n for n, m in adapter.model.named_modules() if isinstance(m, FakeQuantLinear)}
    wanted = {lp.name for lp in plan.quantized()}
    if done != wanted:
        raise RuntimeError(f"the quantizer did not follow the plan: missing {sorted(wanted - done)[:5]}, "
                           f"unplanned {sorted(done - wanted)[:5]}")


def quantize_model(cfg: LLMCConfig, adapter: ModelAdapter, device: torch.device, state_dir: Path | None = None,
                   batches: list[dict] | None = None, plan: QuantPlan | None = None,
                   algos: list[Algorithm] | None = None, after_block: AfterBlock | None = None) -> dict[str, str]:
    """Apply ``quant.method`` to the parts of the plan; returns layer -> setting of every quantized layer.

    ``plan`` and ``algos`` are built from ``cfg`` when not given (the job builds each once).
    With ``state_dir``, each algorithm writes its record there (AWQ's scales, GPTQ's integers).
    ``batches`` (model inputs) replace ``calib`` when given; under torch.distributed each rank
    calibrates on its share (:func:`llmc.distributed.shard`). ``after_block`` runs once each block is
    final (:func:`llmc.pipeline.process_blocks`). The inputs are released after the last part's capture,
    before its block loop (those built here are then freed: a caller's ``batches`` stay the caller's).
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
    with contextlib.ExitStack() as stack:
        root = state_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="llmc-act-")))
        folder = root / ".activations"
        stack.callback(shutil.rmtree, folder, ignore_errors=True)
        for i, part in enumerate(plan.parts):
            t0 = time.time()
            calls = capture(adapter, part.value, batches, device, cfg.quant.token_weight) if batches else []
            if i == len(plan.parts) - 1:
                batches = None  # the model inputs (images) are not needed after the last capture
            store = ActivationStore.choose(cfg.run.offload_activations,
                                           [hidden_input(c.args, c.kwargs) for c in calls], device, folder)
            process_blocks(adapter, part.value, offload_calls(calls, store), quantizer, plan, device, after_block,
                           store)
            del calls
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
    check_dtype(resolve_device(cfg.run.device), cfg.model.dtype)
    return save, algos


def _evaluate_and_report(cfg: LLMCConfig, job: JobFolder | WorkerJob, evaluation: JobEvaluation) -> None:
    with job.step("evaluate after quantization"):
        evaluation.after_quant()
    for key in ("save_vllm", "save_sgl"):
        if getattr(cfg.save, key):
            with job.step(f"evaluate real_quant ({FOLDERS[key]}/)"):
                # every rank evaluates its share of rank 0's export (same machine or shared disk)
                evaluation.real_quant(evaluation.out / FOLDERS[key])
            break
    with job.step("report"):
        evaluation.finish()


def stream_choice(cfg: LLMCConfig, algos: list[Algorithm]) -> bool:
    """Whether the job streams the checkpoint (``run.stream``); what keeps it on the eager path is logged
    (``auto``) or an error (``true``)."""
    if cfg.run.stream is False:
        return False
    why = None
    transforms = [a.name for a in algos if not a.quantizes]
    if transforms:
        why = f"{', '.join(transforms)} transforms every block before the block loop"
    elif cfg.save.save_gguf:
        why = "save_gguf writes its file from the whole model"
    if why is None:
        return True
    if cfg.run.stream is True:
        raise ConfigError(f"run.stream: true, but {why}; use run.stream: auto or false")
    logger.info(f"stream: the checkpoint is loaded whole (eager path): {why}")
    return False


def _run(cfg: LLMCConfig, job: JobFolder | WorkerJob, algos: list[Algorithm]) -> None:
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
                               cfg.model.trust_remote_code, stream=stream_choice(cfg, algos))
    with job.step("plan"):
        plan = build_plan(cfg.quant, adapter)
        logger.info(f"plan: {plan.summary()}")
        keys = cfg.save.real_quant_keys() + (["tpu_check"] if cfg.save.tpu_check else [])
        check_save_plan(keys, plan.quantized(), cfg.save.pack_vision)
        if cfg.save.save_gguf:
            from llmc.export.gguf_vision import check_gguf_family

            check_gguf_family(adapter)
    streamed = adapter.stream is not None
    # every rank evaluates (its share of) what rank 0 writes: the job folder is rank 0's
    shared_out = Path(dist.broadcast_object(str(out) if dist.is_main() else None)) if dist.active() else out
    evaluation = JobEvaluation(cfg, adapter, device, shared_out, plan, streamed=streamed)
    with job.step("evaluate before quantization"):
        evaluation.before_quant()
    if dist.is_main():
        _quantize_and_save(cfg, job, adapter, algos, plan, device, evaluation)
    else:
        _quantize_worker(cfg, job, adapter, algos, plan, device)
    dist.wait_for_main("save outputs")  # exports may outlast the collective timeout
    _evaluate_and_report(cfg, job, evaluation)
    if evaluation.outputs is not None:
        evaluation.outputs.cleanup()


def _quantize_and_save(cfg: LLMCConfig, job: JobFolder, adapter: ModelAdapter, algos: list[Algorithm],
                       plan: QuantPlan, device: torch.device, evaluation: JobEvaluation) -> None:
    """Rank 0 (or the single process): quantize, writing a streamed model's blocks as they are final,
    then complete and publish every output."""
    out, streamed = job.path, adapter.stream is not None
    outputs = evaluation.outputs = JobOutputs(cfg.save, adapter, list(plan.quantized()), out,
                                              evaluation.extra_folders())
    try:
        with job.step("quantize"):
            if streamed and isinstance(algos[-1].record, GPTQRecord):
                algos[-1].record.spill_to(out)  # each layer's integers go to disk as they are made
            after = (lambda part, i, name, block: outputs.write_block(name, block)) if streamed else None
            quantize_model(cfg, adapter, device, state_dir=out, plan=plan, algos=algos, after_block=after)
            logger.info(f"quantized {len(plan.quantized())} linear layers")
            (out / "quant_layers.json").write_text(json.dumps(plan.to_json(), indent=1))
            job.kept += [p.name for p in out.iterdir() if p.suffix == ".pt"]  # replayable records
        save_outputs(cfg, adapter, job, outputs)
    except BaseException:
        outputs.abort()
        raise


def _quantize_worker(cfg: LLMCConfig, job: WorkerJob, adapter: ModelAdapter, algos: list[Algorithm],
                     plan: QuantPlan, device: torch.device) -> None:
    """A rank other than 0: the same quantization on its share of the calibration, nothing written."""
    if isinstance(algos[-1].record, GPTQRecord):
        algos[-1].record.spill_to(None)  # rank 0 keeps the record
    with job.step("quantize"):
        quantize_model(cfg, adapter, device, plan=plan, algos=algos)


def save_outputs(cfg: LLMCConfig, adapter: ModelAdapter, job: JobFolder, outputs: JobOutputs) -> None:
    """Complete every folder ``save`` asks for, each published whole, each kept once written; a streamed
    job has written the language blocks already."""
    done = (adapter.model_parts.language_blocks,) if adapter.stream is not None else ()
    for folder in outputs.folders:
        with job.step(f"save {folder}/"):
            outputs.finish_one(folder, done)
            if folder not in outputs.extra.values():
                job.keep(folder)
    if cfg.save.verify:
        _verify(cfg, adapter, job, outputs)
    if cfg.save.save_gguf:
        with job.step("save gguf/"):
            EXPORTERS["save_gguf"](adapter, job.path / FOLDERS["save_gguf"])
            job.keep(FOLDERS["save_gguf"])
        logger.info(f"save_gguf: saved {cfg.save.save_path}/{FOLDERS['save_gguf']}")


def _verify(cfg: LLMCConfig, adapter: ModelAdapter, job: JobFolder, outputs: JobOutputs) -> None:
    """Reload each compressed-tensors folder and compare its logits with the fake-quant model's."""
    folders = [f for f in ("vllm", "sgl") if f in outputs.folders]
    if not folders:
        return
    reference = adapter.model
    if adapter.stream is not None:  # the model in memory is not whole: the reference is the fake folder
        fake = "fake" if cfg.save.save_fake else outputs.extra.get("save_fake")
        if fake is None:
            logger.info("verify: a streamed job compares reloaded exports with fake/ (save_fake: true); the "
                        "layers were checked as they were written")
            return
        from llmc.eval.dispatch import load_dispatched

        reference = load_dispatched(job.path / fake, adapter.auto_model_class(), adapter.dtype,
                                    torch.device("cpu"), job.path / "eval" / "offload")
    batches = verification_batches(cfg, adapter)
    for folder in folders:
        with job.step(f"verify {folder}/"):
            try:
                check_reload(job.path / folder, adapter, batches, reference)
            except ExportMismatch:  # never left where a runtime would serve it
                (job.path / folder).rename(job.path / f"{folder}.rejected")
                job.kept.remove(folder)
                raise


def verification_batches(cfg: LLMCConfig, adapter: ModelAdapter, n: int = 2) -> list[dict[str, torch.Tensor]]:
    """A few calibration samples (a text prompt when the job has no calibration data)."""
    from llmc.calib.sample import Sample

    c = cfg.calib
    if c is not None and c.path is not None:
        samples = load_samples(c.name, local_path(c.path), min(n, c.n_samples or n), seed=cfg.base.seed)
    else:
        samples = [Sample("Describe what a quantized model computes, in one sentence.")]
    return [adapter.batch_process(samples, with_answer=True, max_length=c.seq_len if c else 256)]


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
    logger.info(f"done: {save}")
    dist.shutdown()
    return save
