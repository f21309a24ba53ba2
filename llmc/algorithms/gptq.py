"""GPTQ: Frantar, Ashkboos, Hoefler, Alistarh (2022), "GPTQ: Accurate Post-Training
Quantization for Generative Pre-trained Transformers".

Each linear's weight is quantized one input column at a time; the rounding error
of a column is spread over the not yet quantized columns with the inverse
Hessian ``H = 2/N * sum_i w_i x_i x_i^T`` of the layer's inputs (``w_i``: the
token weight of row ``i``, 0 on padding; ``N = sum_i w_i``). The inverse is
taken once through its upper Cholesky factor and the updates are applied lazily
block by block.

Config keys (``quant.special``):

* ``percdamp`` (float, 0.01): dampening added to the Hessian's diagonal, as a
  fraction of its mean diagonal.
* ``blocksize`` (int, 128): columns per lazy-update block (results do not depend
  on it, only speed does).
* ``actorder`` (bool, false): quantize columns in order of decreasing Hessian
  diagonal; groups then follow that order and the layer gets a ``g_idx``.
* ``static_groups`` (bool, false): compute every group's scale/zero up front on
  the original weight (with ``actorder`` the groups stay contiguous, no ``g_idx``).
* ``true_sequential`` (bool, true): quantize the block's layer groups one after
  the other, each calibrated on the outputs of the already quantized earlier
  groups; false collects every Hessian in one float pass first.
* ``hessian_dtype`` (``float32`` | ``bfloat16``, float32): the precision of each batch's ``X^T X``
  product (always accumulated in float32). bfloat16 runs the product on the CPU's bf16 units (or a
  GPU's): faster, each batch's product rounded to bf16; its effect is measured in docs/performance.md.
* ``save_state`` (bool, true): write the result (:class:`GPTQRecord`: integers, scales,
  zeros, ``g_idx`` per layer) into ``gptq_records.pt`` in the job folder.
* ``load_state`` (path, null): replay such a record instead of running GPTQ (no
  calibration data needed): every recorded layer gets exactly its recorded weight.

Quantization grid, group size and bits come from ``quant.weight`` (per layer
through ``ctx.spec``); layers without a spec stay float.

Under torch.distributed (:mod:`llmc.distributed`) each rank accumulates the Hessians of its share
of the calibration batches; they are summed into each layer's owner rank (layers spread over the
ranks by size), which runs GPTQ on it and broadcasts the result (weight, scale, zero, g_idx) bit
for bit, so every rank continues with the same block.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from loguru import logger

from llmc import distributed as dist
from llmc.algorithms.base import Algorithm, register_algorithm
from llmc.algorithms.hessian import HessianStats
from llmc.algorithms.records import GPTQRecord
from llmc.context import BlockContext
from llmc.models.layout import LayerGroup
from llmc.quant.fake_linear import FakeQuantLinear
from llmc.quant.primitives import QuantSpec, compute_qparams, dequantize, qrange
from llmc.strict import ConfigError

# ------------------------------------------------------------------- numerics
INNER = 32  # columns per sub-block of a lazy-update block (speed only: short rank-1 updates, then one GEMM)
def _inverse_cholesky(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp I)^-1``; dampening grows x10 if ``H`` is not PD."""
    diag = torch.arange(H.shape[0], device=H.device)
    damp_frac = percdamp
    for _ in range(6):
        Hd = H.clone()
        Hd[diag, diag] += damp_frac * torch.mean(torch.diag(H))
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            if damp_frac != percdamp:
                logger.warning(f"GPTQ: Hessian not positive definite, used percdamp={damp_frac:g}")
            return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
        damp_frac = max(damp_frac, 1e-6) * 10
    raise RuntimeError("GPTQ: the dampened Hessian is not positive definite; raise quant.special.percdamp")


def _current_cols(W: torch.Tensor, W1: torch.Tensor, Err1: torch.Tensor, U: torch.Tensor,
                  i1: int, i: int, stop: int, k1: int, k2: int) -> torch.Tensor:
    """Error-updated weights of columns ``[i1 + i, stop)`` while column ``i1 + i`` is next.

    The block's columns live in ``W1``: those of the current sub-block ``[k1, k2)`` are up to date,
    later ones still miss the sub-block's pending ``Err1[:, k1:i] @ U1[k1:i, cols]``; columns beyond
    the block miss the block's pending ``Err1 @ U[block, cols]``.
    """
    i2 = i1 + W1.shape[1]
    cols = [W1[:, i: min(stop, i1 + k2) - i1]]
    if stop > i1 + k2:
        end = min(stop, i2) - i1
        cols.append(W1[:, k2:end] - Err1[:, k1:i] @ U[i1 + k1:i1 + i, i1 + k2:i1 + end])
    if stop > i2:
        cols.append(W[:, i2:stop] - Err1 @ U[i1:i2, i2:stop])
    return cols[0] if len(cols) == 1 else torch.cat(cols, dim=1)


def _gptq_columns(W: torch.Tensor, U: torch.Tensor, spec: QuantSpec, blocksize: int,
                  group_of: torch.Tensor, params: tuple[torch.Tensor, torch.Tensor] | None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize the columns of ``W`` (in place, in its column order) with the inverse factor ``U``.

    ``group_of[j]``: group index of column ``j``. ``params``: fixed (static)
    ``(scale, zero)``; None computes a group's parameters when its first
    column comes up, on the error-updated weights of the group's columns.
    """
    out_f, n = W.shape
    gl = spec.group_len(n)
    Q = torch.zeros_like(W)
    if params is None:
        scale = torch.zeros(out_f, n // gl, dtype=torch.float32, device=W.device)
        zero = torch.zeros_like(scale)
    else:
        scale, zero = params
    qmin, qmax = qrange(spec.bits, spec.symmetric)
    for i1 in range(0, n, blocksize):
        i2 = min(i1 + blocksize, n)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for k1 in range(0, i2 - i1, INNER):  # the block again in sub-blocks: rank-1 updates stay short
            k2 = min(k1 + INNER, i2 - i1)
            for i in range(k1, k2):
                j = i1 + i
                if params is None and j % gl == 0:
                    s, z = compute_qparams(_current_cols(W, W1, Err1, U, i1, i, j + gl, k1, k2), spec)
                    scale[:, j // gl], zero[:, j // gl] = s[:, 0], z[:, 0]
                g = int(group_of[j])
                w = W1[:, i]
                # fake_quantize of one column, inline: the arithmetic of llmc.quant.primitives (float32)
                s_g, z_g = scale[:, g].float(), zero[:, g].float()
                q = ((torch.clamp(torch.round(w.float() / s_g) + z_g, qmin, qmax) - z_g) * s_g).to(w.dtype)
                Q[:, j] = q
                err = (w - q).div_(U1[i, i])
                W1[:, i:k2].addr_(err, U1[i, i:k2], alpha=-1.0)
                Err1[:, i] = err
            W1[:, k2:].addmm_(Err1[:, k1:k2], U1[k1:k2, k2:], alpha=-1.0)
        W[:, i2:].addmm_(Err1, U[i1:i2, i2:], alpha=-1.0)
    return Q, scale, zero


def gptq_quantize_weight(W: torch.Tensor, H: torch.Tensor, spec: QuantSpec, percdamp: float = 0.01,
                         blocksize: int = 128, actorder: bool = False, static_groups: bool = False
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """GPTQ of one weight ``[out, in]`` with the input Hessian ``H`` ``[in, in]``.

    Returns ``(W_q, scale, zero, g_idx)``: the dequantized weight (float32, or
    float64 for a float64 ``W``), parameters ``[out, G]`` and ``g_idx`` ``[in]``
    (input channel -> group) when groups are not contiguous in the original
    order (``actorder`` without ``static_groups``), else None. Then
    ``fake_quantize(W_q, scale, zero, spec, g_idx) == W_q``. Inputs never seen
    (zero Hessian diagonal) get zero weights.
    """
    dtype = torch.float64 if W.dtype == torch.float64 else torch.float32
    W = W.detach().to(dtype).clone()
    H = H.detach().to(W.device, dtype).clone()
    n = W.shape[1]
    gl = spec.group_len(n)
    if n % gl:
        raise ValueError(f"in_features={n} is not divisible by group_size={gl}")
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    params = compute_qparams(W, spec) if static_groups else None
    cols = torch.arange(n, device=W.device)
    perm = torch.argsort(torch.diag(H), descending=True) if actorder else cols
    W, H = W[:, perm], H[perm][:, perm]
    group_of = perm // gl if static_groups else cols // gl
    U = _inverse_cholesky(H, percdamp)
    Q, scale, zero = _gptq_columns(W, U, spec, max(1, blocksize), group_of, params)
    invperm = torch.argsort(perm)
    g_idx = None
    if actorder and not static_groups and n // gl > 1:
        g_idx = (cols // gl)[invperm]
    return Q[:, invperm], scale, zero, g_idx


# ------------------------------------------------------------------ algorithm
@dataclass
class GPTQOptions:
    percdamp: float = 0.01
    blocksize: int = 128
    actorder: bool = False
    static_groups: bool = False
    true_sequential: bool = True
    hessian_dtype: Literal["float32", "bfloat16"] = "float32"
    save_state: bool = True
    load_state: str | None = None

    def __post_init__(self) -> None:
        if self.load_state is not None and not Path(self.load_state).is_file():
            raise ConfigError(f"quant.special.load_state: {self.load_state} is not a file")
        if not 0 <= self.percdamp:
            raise ConfigError(f"quant.special.percdamp: {self.percdamp} must be >= 0")
        if self.blocksize < 1:
            raise ConfigError(f"quant.special.blocksize: {self.blocksize} must be >= 1")


@register_algorithm
class GPTQ(Algorithm):
    name = "GPTQ"
    Options = GPTQOptions
    Record = GPTQRecord
    load_option, save_option = "load_state", "save_state"

    @torch.no_grad()
    def collect(self, ctx: BlockContext, groups: list[LayerGroup]) -> dict[str, HessianStats]:
        """Hessian of each group's input (its linears read the same input), over one pass of the block."""
        stats: dict[str, HessianStats] = {}
        by_input: dict[str, HessianStats] = {}
        for g in groups:
            lin = ctx.get(g.input_of)
            stats[g.name] = by_input[g.input_of] = HessianStats(lin.in_features, lin.weight.device,
                                                                getattr(torch, self.options.hessian_dtype))
        ctx.stream_inputs(list(by_input), lambda name, x, w: by_input[name].add_batch(x, w))
        return stats

    @torch.no_grad()
    def quantize_linear(self, ctx: BlockContext, name: str, H: torch.Tensor) -> None:
        """GPTQ one linear and replace it by a fake-quant linear holding the GPTQ weights."""
        spec = ctx.spec(name)
        lin = ctx.get(name)
        o = self.options
        W_q, scale, zero, g_idx = gptq_quantize_weight(lin.weight, H, spec, o.percdamp, o.blocksize,
                                                       o.actorder, o.static_groups)
        lin.weight.copy_(W_q.to(lin.weight.dtype))
        fq = ctx.quantize(name, scale, zero, g_idx)
        self._remember(ctx.full_name(name), fq)
        if int((torch.diag(H) == 0).sum()):
            logger.debug(f"GPTQ {ctx.full_name(name)}: {int((torch.diag(H) == 0).sum())} inputs never seen")

    def _remember(self, name: str, fq: FakeQuantLinear) -> None:
        codes = fq.int_weight().to(torch.int8 if fq.spec.symmetric else torch.uint8)  # -128..127 / 0..255
        state = {"codes": codes, "scale": fq.scale, "zero": fq.zero}
        if fq.g_idx is not None:
            state["g_idx"] = fq.g_idx
        self.record.put(name, state)

    def _todo(self, ctx: BlockContext, group: LayerGroup) -> list[str]:
        """The group's linears to quantize: those with a spec, not already fake-quant."""
        return [n for n in group.linears
                if ctx.spec(n) is not None and not isinstance(ctx.get(n), FakeQuantLinear)]

    @torch.no_grad()
    def _replay(self, ctx: BlockContext) -> None:
        """Every recorded layer of the block gets its recorded integers, scales and zeros."""
        for name in ctx.layout.linears():
            state = self.loaded.state(ctx.full_name(name))
            if state is None or ctx.spec(name) is None:
                if ctx.spec(name) is not None:
                    raise ValueError(f"quant.special.load_state: {self.options.load_state} has no record for "
                                     f"{ctx.full_name(name)}, which the plan quantizes")
                continue
            lin, g_idx = ctx.get(name), state.get("g_idx")
            w = dequantize(state["codes"].to(torch.int32), state["scale"], state["zero"], g_idx)
            if tuple(w.shape) != tuple(lin.weight.shape):
                raise ValueError(f"quant.special.load_state: {ctx.full_name(name)} is {tuple(w.shape)} in the "
                                 f"record, {tuple(lin.weight.shape)} in the model")
            lin.weight.copy_(w.to(lin.weight.dtype))
            self._remember(ctx.full_name(name), ctx.quantize(name, state["scale"], state["zero"], g_idx))

    def process_block(self, ctx: BlockContext) -> None:
        if self.loaded is not None:
            self._replay(ctx)
            return
        groups = [g for g in ctx.layout.groups if self._todo(ctx, g)]
        if not groups:
            return
        if self.options.true_sequential:
            for g in groups:
                stats = self.collect(ctx, [g])[g.name]
                self._quantize_all(ctx, [(name, stats) for name in self._todo(ctx, g)])
            return
        stats = self.collect(ctx, groups)
        self._quantize_all(ctx, [(name, stats[g.name]) for g in groups for name in self._todo(ctx, g)])

    @torch.no_grad()
    def _quantize_all(self, ctx: BlockContext, todo: list[tuple[str, HessianStats]]) -> None:
        """GPTQ each ``(linear, its input's statistics)``, in order; distributed: each on its owner rank
        (largest ``in * (in + out)`` first to the least loaded rank), then broadcast to every rank."""
        if not dist.active():
            for name, stats in todo:
                self.quantize_linear(ctx, name, stats.H)
            return
        lins = [ctx.get(name) for name, _ in todo]
        owner = dist.owners([lin.in_features * (lin.in_features + lin.out_features) for lin in lins])
        shared: dict[int, tuple[HessianStats, set[int]]] = {}
        for (_, stats), r in zip(todo, owner):
            shared.setdefault(id(stats), (stats, set()))[1].add(r)
        for stats, ranks in shared.values():
            stats.combine(ranks)
        for (name, stats), r in zip(todo, owner):
            if r == dist.rank():
                self.quantize_linear(ctx, name, stats.H)
        for (name, _), r in zip(todo, owner):
            self._share(ctx, name, r)

    @torch.no_grad()
    def _share(self, ctx: BlockContext, name: str, owner: int) -> None:
        """Rank ``owner``'s GPTQ result of ``name`` (weight, scale, zero, g_idx) on every rank, bit for bit."""
        lin, spec, mine = ctx.get(name), ctx.spec(name), owner == dist.rank()
        n = lin.in_features
        groups = n // spec.group_len(n)
        dev = lin.weight.device
        scale = lin.scale if mine else torch.empty(lin.out_features, groups, dtype=torch.float32, device=dev)
        zero = lin.zero if mine else torch.empty_like(scale)
        g_idx = None
        if self.options.actorder and not self.options.static_groups and groups > 1:
            g_idx = lin.g_idx if mine else torch.empty(n, dtype=torch.long, device=dev)
        for t in (lin.weight.data, scale, zero, g_idx):
            if t is not None:
                dist.broadcast(t, owner)
        if not mine:
            self._remember(ctx.full_name(name), ctx.quantize(name, scale, zero, g_idx))
