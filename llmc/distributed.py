"""Everything torch.distributed in llmc: one job on several processes launched by torchrun.

``torchrun --nproc_per_node N -m llmc cfg.yml`` starts N copies of the job. :func:`init` joins them
into one process group (``nccl`` when ``run.device`` is a GPU, ``gloo`` on CPU; collectives time
out after ``run.dist_timeout_s``). Without torchrun (no ``WORLD_SIZE`` in the environment) nothing
is initialised and every helper here is a no-op that returns its input: a single process runs
exactly the code and numerics it ran before distribution existed.

What is split and what is reduced (docs/distributed.md):

* calibration batches, round-robin: rank ``r`` takes batches ``r, r + W, ...`` (:func:`shard`);
* statistics are combined with the collectives below (sums for Hessians, means and losses, maxima
  for SmoothQuant's activation ranges); quantized layers computed on one rank are broadcast bit for
  bit (:func:`broadcast`), so every rank continues with the same model (:func:`check_same`);
* rank 0 alone writes the job folder, exports and reports (:func:`is_main`).

A rank that fails publishes its error in the job's store (:func:`on_failure`) and exits
(:func:`exit_failed`); its connections close, so the other ranks' pending collectives fail at once
(gloo; NCCL at ``run.dist_timeout_s`` or when torchrun stops them), they report the failing rank's
error and exit non-zero too. A rank stuck without failing is caught by the collective timeout.
"""
from __future__ import annotations

import atexit
import os
import signal
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from loguru import logger

from llmc.strict import ConfigError

T = TypeVar("T")
FAILED_KEY, TRACE_KEY = "llmc/failed", "llmc/failed_traceback"
FAULT_ENV = "LLMC_TEST_FAIL"  # test hook: "RANK:POINT" makes that rank raise at that point


class RankFailed(RuntimeError):
    """Another rank of the job failed; the message is that rank's error."""


@dataclass
class _State:
    active: bool = False
    rank: int = 0
    world: int = 1
    backend: str = ""
    device: torch.device = torch.device("cpu")  # where collectives run (the rank's device)
    store: Any = None
    timeout_s: float = 600.0
    failed: bool = False  # on_failure ran (it decides once)
    waits: int = 0  # wait_for_main calls so far (the same sequence on every rank)


_S = _State()


# ------------------------------------------------------------------------------------- the group
def launched() -> bool:
    """Started by torchrun (or any launcher that sets ``WORLD_SIZE``)."""
    return "WORLD_SIZE" in os.environ


def env_rank() -> int:
    """This process's rank from the launcher's environment (0 without a launcher); before :func:`init`."""
    return int(os.environ.get("RANK", 0))


def init(device: torch.device, timeout_s: float = 600.0) -> torch.device:
    """Join the torchrun job if launched by torchrun; returns the device this rank computes on.

    On a GPU each rank takes ``device_type:LOCAL_RANK`` and the backend is the device's default
    (nccl for CUDA); on CPU it is gloo. ``timeout_s`` bounds every collective. Without a launcher
    nothing happens and ``device`` is returned as it is.
    """
    if not launched() or _S.active:
        return _S.device if _S.active else device
    local = int(os.environ.get("LOCAL_RANK", 0))
    if device.type != "cpu" and device.index is None:
        device = torch.device(device.type, local)
        torch.accelerator.set_device_index(device.index)
    backend = dist.Backend.default_device_backend_map[device.type]
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s),
                            device_id=device if device.type != "cpu" else None)
    _S.active, _S.rank, _S.world, _S.backend = True, dist.get_rank(), dist.get_world_size(), backend
    _S.device, _S.timeout_s = device, timeout_s
    _S.store = dist.distributed_c10d._get_default_store()
    signal.signal(signal.SIGTERM, _on_sigterm)
    return device


def active() -> bool:
    """True inside a torchrun job (even of one process), after :func:`init`."""
    return _S.active


def world() -> int:
    return _S.world


def rank() -> int:
    return _S.rank


def is_main() -> bool:
    """Rank 0 (or a single process): the one that writes logs, outputs and reports."""
    return _S.rank == 0


def shutdown() -> None:
    """Leave the process group (end of a successful job)."""
    if _S.active and dist.is_initialized():
        dist.destroy_process_group()
    _S.active = False


def describe() -> str:
    """One line for the job's log: world size, backend and this rank's device."""
    return f"torch.distributed: world size {_S.world}, backend {_S.backend}, rank {_S.rank} on {_S.device}, " \
           f"collective timeout {_S.timeout_s:g}s"


# ---------------------------------------------------------------------------------- collectives
def _on_comm(t: torch.Tensor) -> torch.Tensor:
    return t if t.device == _S.device else t.to(_S.device)


def _reduce(t: torch.Tensor, op: Any, dst: int | None) -> torch.Tensor:
    if not _S.active:
        return t
    x = _on_comm(t)
    if dst is None:
        dist.all_reduce(x, op=op)
    else:
        dist.reduce(x, dst=dst, op=op)
    if x is not t:
        t.copy_(x)
    return t


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over ranks, in place (every rank gets the same bits); ``t`` itself when not distributed."""
    return _reduce(t, dist.ReduceOp.SUM, None)


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum over ranks, in place (exact)."""
    return _reduce(t, dist.ReduceOp.MAX, None)


def reduce_sum(t: torch.Tensor, dst: int) -> torch.Tensor:
    """``t`` summed over ranks into rank ``dst`` (other ranks' ``t`` is left undefined)."""
    return _reduce(t, dist.ReduceOp.SUM, dst)


def sum_float(x: float) -> float:
    """A Python float summed over ranks (float64); ``x`` itself when not distributed."""
    if not _S.active:
        return x
    return float(all_reduce_sum(torch.tensor([x], dtype=torch.float64, device=_S.device)).item())


def broadcast(t: torch.Tensor, src: int) -> torch.Tensor:
    """Rank ``src``'s ``t`` on every rank, bit for bit (sent as bytes, any dtype), in place."""
    if not _S.active:
        return t
    x = _on_comm(t.contiguous())
    dist.broadcast(x.view(torch.uint8) if x.dim() else x.reshape(1).view(torch.uint8), src=src)
    if x is not t:
        t.copy_(x)
    return t


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s picklable ``obj`` on every rank."""
    if not _S.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_S.device)
    return box[0]


def gather_objects(obj: T) -> list[T]:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` when not distributed)."""
    if not _S.active:
        return [obj]
    out: list[Any] = [None] * _S.world
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if _S.active:
        dist.barrier()


def wait_for_main(what: str) -> None:
    """Rank 0 says it finished ``what`` (e.g. writing the outputs), the others wait for that
    through the store: without the collective timeout, however long rank 0 takes. A failure
    published meanwhile ends the wait with :class:`RankFailed`."""
    if not _S.active:
        return
    _S.waits += 1
    key = f"llmc/main_done/{_S.waits}"
    if is_main():
        _S.store.set(key, what)
        return
    while True:
        try:
            _S.store.wait([key], timedelta(seconds=5))
            return
        except Exception:  # noqa: BLE001 - the store's timeout: check for a failure, wait on
            peer = _peer_error()
            if peer is not None:
                raise RankFailed(f"{peer} (this is rank {_S.rank}, waiting for rank 0: {what})") from None


# --------------------------------------------------------------------------------- work sharing
def shard(items: Sequence[T], what: str = "calibration batches") -> list[T]:
    """This rank's share of ``items``: ``items[rank::world]`` (round-robin); the log lists every share.

    Every rank needs at least one item (statistics are reduced from every rank)."""
    if not _S.active:
        return list(items)
    W, n = _S.world, len(items)
    if n < W:
        raise ConfigError(f"{what}: {n} for {W} processes; each process needs at least one (lower calib.bs, "
                          f"add samples, or launch fewer processes)")
    if is_main():
        shares = ", ".join(f"rank {r}: {len(range(r, n, W))} ({_ranges(range(r, n, W))})" for r in range(W))
        logger.info(f"{what}: {n} split over {W} ranks, round-robin: {shares}")
    return list(items[_S.rank::W])


def _ranges(idx: range) -> str:
    ids = list(idx)
    return ", ".join(map(str, ids)) if len(ids) <= 6 else f"{ids[0]}, {ids[1]}, ..., {ids[-1]}"


def global_offsets(counts: Sequence[int]) -> tuple[list[int], int]:
    """Offsets of this rank's items in the order of the whole, unsplit list, and the total count.

    ``counts[j]`` is the size of this rank's ``j``-th item, which is item ``rank + j * world`` of
    the whole list (:func:`shard`). Without distribution: the running sum and the sum."""
    counts = [int(c) for c in counts]
    if not _S.active:
        offs, acc = [], 0
        for c in counts:
            offs.append(acc)
            acc += c
        return offs, acc
    every = gather_objects(counts)
    order = [(j, r) for j in range(max(map(len, every))) for r in range(_S.world) if j < len(every[r])]
    start, acc = {}, 0
    for j, r in order:
        start[(j, r)] = acc
        acc += every[r][j]
    return [start[(j, _S.rank)] for j in range(len(counts))], acc


def owners(costs: Sequence[float]) -> list[int]:
    """An owner rank per item: largest cost first to the least loaded rank (deterministic)."""
    load = [0.0] * _S.world
    out = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(_S.world), key=lambda r: (load[r], r))
        out[i], load[r] = r, load[r] + costs[i]
    return out


def checksum(t: torch.Tensor) -> int:
    """Exact checksum of ``t``'s bits: the integer sum of its elements read as integers (any order)."""
    x = t.detach().contiguous().reshape(-1)
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
    return int(x.view(ints).sum(dtype=torch.int64).item())


def check_same(value: int | float | str, what: str) -> None:
    """Raise unless ``value`` (e.g. a :func:`checksum`) is equal on every rank."""
    if not _S.active:
        return
    seen = gather_objects(value)
    if len(set(seen)) > 1:
        raise RuntimeError(f"ranks disagree on {what}: {seen}")


# ------------------------------------------------------------------------------------- failures
def fault_point(name: str) -> None:
    """Test hook: raise here when ``LLMC_TEST_FAIL`` is ``"<this rank>:<name>"``; hang (a rank stuck
    without failing) when it is ``"<this rank>:<name>:hang"``."""
    want = os.environ.get(FAULT_ENV)
    if want == f"{_S.rank}:{name}":
        raise RuntimeError(f"injected failure on rank {_S.rank} at {name} ({FAULT_ENV})")
    while want == f"{_S.rank}:{name}:hang":
        time.sleep(1)


def _peer_error() -> str | None:
    try:
        if _S.store.check([FAILED_KEY]):
            return _S.store.get(FAILED_KEY).decode()
    except Exception:  # noqa: BLE001 - the store may be gone with the launcher
        return None
    return None


def _on_sigterm(signum: int, frame: Any) -> None:
    """torchrun stops the other ranks as soon as one exits. A rank reporting its failure finishes
    its report and exits by itself; a rank that was still working (or stuck) stops with the failed
    rank's error; any other stop interrupts the job like Ctrl-C. (A rank blocked in a collective
    runs this only once the collective returns; the launcher kills it 30 s later at the latest.)"""
    if _S.failed:
        return
    peer = _peer_error()
    if peer is not None:
        raise RankFailed(f"{peer} (this is rank {_S.rank}, stopped by the launcher)")
    raise KeyboardInterrupt("stopped by the launcher (SIGTERM)")


def on_failure(exc: BaseException) -> BaseException:
    """What this rank's failure means for the job; returns the exception to report.

    If another rank failed first (its error is in the job's store), returns :class:`RankFailed`
    with that rank's message (its traceback goes to the log). Otherwise this rank is the cause: its
    error is published for the others (they read it when their next collective fails, at once
    when this process exits) and ``exc`` is returned. A config error is the same on every rank:
    each reports its own.
    """
    if not _S.active or _S.failed or isinstance(exc, RankFailed):
        return exc
    _S.failed = True
    peer = _peer_error()
    if peer is not None and not peer.startswith(f"rank {_S.rank}:") and not isinstance(exc, ConfigError):
        trace = _S.store.get(TRACE_KEY).decode() if _S.store.check([TRACE_KEY]) else ""
        logger.bind(file_only=True).error(f"traceback of the failing {peer.split(':')[0]}:\n{trace}")
        err = RankFailed(f"{peer} (this is rank {_S.rank})")
        err.__cause__ = exc
        return err
    msg = f"rank {_S.rank}: {type(exc).__name__}: {exc}"
    if "timed out" in str(exc).lower():
        logger.error(f"a collective waited longer than run.dist_timeout_s ({_S.timeout_s:g}s): another rank is "
                     f"stuck or much slower (raise run.dist_timeout_s if it is only slow)")
    try:
        if _S.store.compare_set(FAILED_KEY, "", msg).decode() == msg:
            _S.store.set(TRACE_KEY, "".join(traceback.format_exception(exc))[-8000:])
    except Exception:  # noqa: BLE001 - reporting must never mask the error itself
        pass
    return exc


def exit_failed(code: int) -> int:
    """End a failed rank of a torchrun job now, with ``code``, once its report is written.

    Exiting closes the rank's connections, so the other ranks' pending collectives fail at once
    (gloo) rather than at the timeout; the process is left without tearing the process group down
    (other libraries may hold it). Without torchrun: returns ``code``."""
    if _S.store is None:
        return code
    logger.complete()
    sys.stdout.flush()
    sys.stderr.flush()
    atexit._run_exitfuncs()  # temporary folders
    os._exit(code)
