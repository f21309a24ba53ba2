"""Rotation: QuaRot (Ashkboos et al. 2024) / SpinQuant (Liu et al. 2024) style orthogonal transforms.

A pure model-level transform of the language model (``prepare_model``); the
quantizer listed after it (RTN when none is, e.g. ``method: [Rotation, GPTQ]``)
then sees rotated weights whose outlier input channels are spread out. The
float model computes exactly the same function afterwards:

1. ``lm_head`` is untied from the input embeddings (and ``tie_word_embeddings``
   set to false on the model config and its text config).
2. Every norm feeding residual readers (and the final norm, into ``lm_head``)
   is folded into its consumers: ``W := W * (gamma + offset)`` column-wise,
   ``b := b + W @ beta`` for norms with a bias; the norm's scale becomes 1.
3. With ``Q`` the ``hidden x hidden`` rotation (float64 maths, cast back):
   embeddings ``E := E Q``; residual readers ``W := W Q``; residual writers of
   every block and external writers (the projector's last linear)
   ``W := Q^T W``, ``b := Q^T b``; raw external weights (``RotationTargets.
   external_weights``: an ``[in, hidden]`` matrix used as ``x @ W`` or a
   ``[hidden]`` row inserted as a token) ``W := W Q``; ``lm_head`` ``W := W Q``.
   RMSNorm(xQ) = RMSNorm(x) Q once the norm's scale is 1 (mean-centering norms
   are refused, and so are blocks whose writers' outputs pass a norm before
   the residual add: ``BlockLayout.writer_norms``).
4. ``rotate_heads``: per attention head, value rows ``W_v := H_g^T W_v``,
   ``b_v := H_g^T b_v`` for kv head ``g`` and output-projection columns
   ``W_o := W_o H_g`` for every query head mapped to ``g`` (grouped-query
   attention), one ``head_dim`` rotation per kv head and layer.

Config keys (``quant.special``):

* ``rotate_mode``: ``hadamard`` (random Hadamard, ⊗ a random orthogonal factor
  for non-power-of-two sizes) or ``random`` (Haar-random orthogonal). Default
  ``hadamard``.
* ``rotation_seed``: seed of ``Q``; head rotations use :func:`head_seed`. Default 0.
* ``rotate_heads``: also apply the head-wise value/output rotation. Default true.

The record (:class:`RotationRecord`, ``rotation_record.pt``) holds the mode, seed, sizes, targets
and head seeds: a job with the same ``rotate_mode`` and ``rotation_seed`` applies the same rotation.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from loguru import logger
from torch import nn

from llmc.algorithms.base import Algorithm, register_algorithm
from llmc.algorithms.records import RotationRecord
from llmc.models.layout import (
    EXTERNAL_WEIGHT_KINDS,
    BlockLayout,
    Producer,
    RotationTargets,
)
from llmc.quant.hadamard import rotation_matrix

if TYPE_CHECKING:
    from llmc.models.base import ModelAdapter

ROW_CHUNK = 16384


@dataclass
class RotationOptions:
    rotate_mode: Literal["hadamard", "random"] = "hadamard"
    rotation_seed: int = 0
    rotate_heads: bool = True


def head_seed(seed: int, layer: int, kv_head: int) -> int:
    """Seed of the head rotation of kv head ``kv_head`` in language block ``layer``."""
    return seed + 100_003 * (layer + 1) + kv_head


# ------------------------------------------------------------------------------------------ weight maths
@torch.no_grad()
def transform_weight(module: nn.Module, device: torch.device, left: torch.Tensor | None = None,
                     right: torch.Tensor | None = None, col_scale: torch.Tensor | None = None,
                     col_shift: torch.Tensor | None = None) -> None:
    """In place, in float64 on ``device``: ``W := left @ ((W * col_scale) @ right)``, ``b := left @ (b + W col_shift)``.

    ``module`` is a linear (``weight [out, in]``, optional ``bias``) or an
    embedding (``weight [rows, dim]``). Without ``left``, rows are processed in
    chunks to bound device memory (embedding tables, ``lm_head``).
    """
    weight, bias = module.weight, getattr(module, "bias", None)
    f64 = {"device": device, "dtype": torch.float64}
    if col_shift is not None:
        if bias is None:
            raise ValueError(f"cannot fold a norm bias into {type(module).__name__} without a bias")
        shift = weight.detach().to(**f64) @ col_shift.to(**f64)
        bias.copy_(bias.detach().to(**f64) + shift)
    scale = None if col_scale is None else col_scale.to(**f64)
    r = None if right is None else right.to(**f64)

    def cols(w: torch.Tensor) -> torch.Tensor:
        w = w.detach().to(**f64)
        w = w if scale is None else w * scale[None, :]
        return w if r is None else w @ r

    if left is None:
        for start in range(0, weight.shape[0], ROW_CHUNK):
            weight[start:start + ROW_CHUNK].copy_(cols(weight[start:start + ROW_CHUNK]))
        return
    lm = left.to(**f64)
    weight.copy_(lm @ cols(weight))
    if bias is not None:
        bias.copy_(lm @ bias.detach().to(**f64))


@torch.no_grad()
def rotate_raw_weight(param: torch.Tensor, how: str, q: torch.Tensor, device: torch.device) -> None:
    """In place, float64 on ``device``: ``W := W Q`` on the last (hidden) axis of a raw Parameter.

    ``how`` is ``"in_out"`` (``[in, hidden]`` used as ``x @ W``) or ``"row"`` (``[hidden]`` token row):
    the same maths, named for the check of the shape.
    """
    if how not in EXTERNAL_WEIGHT_KINDS:
        raise ValueError(f"external weight kind {how!r}; valid: {list(EXTERNAL_WEIGHT_KINDS)}")
    w = param.detach().to(device=device, dtype=torch.float64)
    param.copy_(w @ q.to(device=device, dtype=torch.float64))


def norm_params(norm: nn.Module, offset: float) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(gamma + offset, beta)`` of a norm in float64: its effective scale and shift (None when absent)."""
    w = getattr(norm, "weight", None)
    b = getattr(norm, "bias", None)
    gamma = None if w is None else w.detach().double() + offset
    beta = None if b is None else b.detach().double()
    return gamma, beta


@torch.no_grad()
def reset_norm(norm: nn.Module, offset: float) -> None:
    """Make the norm's effective scale 1 and its shift 0 (after folding them into consumers)."""
    if getattr(norm, "weight", None) is not None:
        norm.weight.fill_(1.0 - offset)
    if getattr(norm, "bias", None) is not None:
        norm.bias.zero_()


@torch.no_grad()
def fold_norm(norm: nn.Module, consumers: list[nn.Module], offset: float, device: torch.device,
              right: torch.Tensor | None = None) -> None:
    """Fold ``norm``'s scale (and bias) into ``consumers`` (then rotate their inputs by ``right``); reset the norm."""
    gamma, beta = norm_params(norm, offset)
    if beta is not None:
        missing = [i for i, c in enumerate(consumers) if getattr(c, "bias", None) is None]
        if missing:
            raise ValueError(f"the norm has a bias but consumers {missing} have none to fold it into")
    for c in consumers:
        transform_weight(c, device, right=right, col_scale=gamma, col_shift=beta)
    reset_norm(norm, offset)


@torch.no_grad()
def is_mean_centering(norm: nn.Module, dim: int) -> bool:
    """Whether ``norm`` ignores a constant shift of its input (LayerNorm), probed on a float32 copy."""
    probe = copy.deepcopy(norm).float().cpu()
    x = torch.randn(2, dim, generator=torch.Generator().manual_seed(0))
    y0, y1 = probe(x), probe(x + 1.0)
    return bool((y0 - y1).norm() <= 1e-4 * y0.norm().clamp(min=1e-12))


def head_blocks(rots: list[torch.Tensor], num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-diagonal matrices ``(values, outputs)`` from one rotation per kv head.

    ``values`` is ``blockdiag(H_0..H_{kv-1})`` (``kv * d`` rows of ``v``);
    ``outputs`` is ``blockdiag(H_{g(0)}..H_{g(n-1)})`` with ``g(i) = i // (n / kv)``
    (the ``n * d`` input columns of ``o``).
    """
    kv = len(rots)
    if num_heads % kv:
        raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={kv}")
    group = num_heads // kv
    return torch.block_diag(*rots), torch.block_diag(*[rots[i // group] for i in range(num_heads)])


# ------------------------------------------------------------------------------------------ model surface
def attention_value_output(layout: BlockLayout) -> tuple[Producer, str]:
    """The value producer (name, rows) and the output projection of a block's attention (layout data)."""
    if layout.value is None or layout.attn_output is None:
        raise ValueError("rotate_heads: the block layout names no value projection / attention output "
                         "(BlockLayout.value, BlockLayout.attn_output); set rotate_heads: false")
    return layout.value, layout.attn_output


def untie_lm_head(model: nn.Module, lm_head: str, embeddings: tuple[str, ...]) -> bool:
    """Give ``lm_head`` its own weight if it shares one with an embedding; mark the configs untied."""
    head = model.get_submodule(lm_head)
    shared = any(head.weight.untyped_storage().data_ptr() ==
                 model.get_submodule(e).weight.untyped_storage().data_ptr() for e in embeddings)
    if shared:
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    cfg = getattr(model, "config", None)
    for c in (cfg, getattr(cfg, "text_config", None)):
        if c is not None and getattr(c, "tie_word_embeddings", False):
            c.tie_word_embeddings = False
    tied = getattr(model, "all_tied_weights_keys", None)
    if isinstance(tied, dict):
        tied.pop(f"{lm_head}.weight", None)
    return shared


@register_algorithm
class Rotation(Algorithm):
    name = "Rotation"
    aliases = ("QuaRot",)
    Options = RotationOptions
    Record = RotationRecord
    replay_with = "the same rotate_mode and rotation_seed (they determine every matrix)"
    quantizes = False
    needs_calib = False

    def prepare_model(self, adapter: ModelAdapter, device: torch.device) -> None:
        opts: RotationOptions = self.options
        model, t = adapter.model, adapter.rotation_targets()
        blocks = adapter.blocks("language")
        layouts = [adapter.block_layout("language", b) for b in blocks]
        dim = self._check(model, t, blocks, layouts)
        q = rotation_matrix(dim, opts.rotate_mode, opts.rotation_seed).to(device)
        untied = untie_lm_head(model, t.lm_head, t.embeddings)
        fold_norm(model.get_submodule(t.final_norm), [model.get_submodule(t.lm_head)], t.norm_weight_offset,
                  device, right=q)
        for name in t.embeddings:
            transform_weight(model.get_submodule(name), device, right=q)
        for name in t.external_writers:
            transform_weight(model.get_submodule(name), device, left=q.T)
        for name, how in t.external_weights:
            rotate_raw_weight(model.get_parameter(name), how, q, device)
        heads = []
        for i, (block, layout) in enumerate(zip(blocks, layouts)):
            self._rotate_block(block, layout, q, device)
            if opts.rotate_heads:
                heads.append(self._rotate_heads(block, layout, i, device))
        self.record = RotationRecord(
            rotate_mode=opts.rotate_mode, rotation_seed=opts.rotation_seed, hidden_size=dim, untied_lm_head=untied,
            blocks=len(blocks), heads=heads,
            targets={"embeddings": list(t.embeddings), "external_writers": list(t.external_writers),
                     "external_weights": [list(w) for w in t.external_weights], "final_norm": t.final_norm,
                     "lm_head": t.lm_head})
        logger.info(f"Rotation: {opts.rotate_mode} {dim}x{dim} (seed {opts.rotation_seed}) on {len(blocks)} "
                    f"language blocks, untied lm_head: {untied}, head rotations: {opts.rotate_heads}")

    def _check(self, model: nn.Module, t: RotationTargets, blocks: nn.ModuleList,
               layouts: list[BlockLayout]) -> int:
        """Validate everything before touching a weight; returns the hidden size."""
        dims = {model.get_submodule(e).weight.shape[1] for e in t.embeddings}
        if len(dims) != 1:
            raise ValueError(f"Rotation: embeddings {list(t.embeddings)} have different widths {sorted(dims)}")
        dim = dims.pop()
        self._check_external(model, t, dim)
        norms = [(t.final_norm, model.get_submodule(t.final_norm), [model.get_submodule(t.lm_head)])]
        for i, (block, layout) in enumerate(zip(blocks, layouts)):
            if layout.writer_norms:
                raise ValueError(f"Rotation: language block {i}: {list(layout.writer_norms)} normalise the residual "
                                 f"writers' outputs before the residual add, so a rotation of the residual stream "
                                 f"does not commute with them (it would need an online rotation after each); "
                                 f"rotation is not supported for this model")
            readers = [g for g in layout.groups if g.producer is not None and g.producer.kind == "norm"]
            if not readers:
                raise ValueError(f"Rotation: language block {i} has no layer group fed by a norm")
            norms += [(f"block {i} {g.producer.name}", block.get_submodule(g.producer.name),
                       [block.get_submodule(n) for n in g.linears]) for g in readers]
            if self.options.rotate_heads:
                self._head_shapes(block, layout, i)
        for name, norm, consumers in norms:
            if is_mean_centering(norm, dim):
                raise ValueError(f"Rotation: norm {name} subtracts the mean (LayerNorm), so it does not commute "
                                 f"with a rotation; only RMS-type norms are supported")
            if getattr(norm, "bias", None) is not None and any(c.bias is None for c in consumers):
                raise ValueError(f"Rotation: norm {name} has a bias but its consumers have none to fold it into")
        return dim

    @staticmethod
    def _check_external(model: nn.Module, t: RotationTargets, dim: int) -> None:
        """Raw external weights: known kind, hidden-sized last axis."""
        for name, how in t.external_weights:
            if how not in EXTERNAL_WEIGHT_KINDS:
                raise ValueError(f"Rotation: external weight {name}: kind {how!r}; valid: {list(EXTERNAL_WEIGHT_KINDS)}")
            shape = tuple(model.get_parameter(name).shape)
            ok = len(shape) == (2 if how == "in_out" else 1) and shape[-1] == dim
            if not ok:
                raise ValueError(f"Rotation: external weight {name} ({how}) has shape {shape}; expected "
                                 f"{'[in, ' if how == 'in_out' else '['}{dim}]")

    def _head_shapes(self, block: nn.Module, layout: BlockLayout, i: int) -> tuple[Producer, str, int, int, int]:
        v, o = attention_value_output(layout)
        d, n, kv = layout.head_dim, layout.num_heads, layout.num_kv_heads
        if not (d and n and kv):
            raise ValueError(f"Rotation: block {i} layout lacks head_dim/num_heads/num_kv_heads; "
                             f"set rotate_heads: false")
        rows = v.rows or (0, block.get_submodule(v.name).weight.shape[0])
        if rows[1] - rows[0] != kv * d or block.get_submodule(o).in_features != n * d:
            raise ValueError(f"Rotation: block {i}: value rows {rows} / {o} inputs do not match "
                             f"{kv} kv heads / {n} heads of dim {d}")
        return v, o, d, n, kv

    def _rotate_block(self, block: nn.Module, layout: BlockLayout, q: torch.Tensor, device: torch.device) -> None:
        """Fold the block's norms into their readers and rotate readers' inputs and writers' outputs."""
        for g in layout.groups:
            if g.producer is not None and g.producer.kind == "norm":
                fold_norm(block.get_submodule(g.producer.name), [block.get_submodule(n) for n in g.linears],
                          g.producer.weight_offset, device, right=q)
        for name in layout.residual_writers:
            transform_weight(block.get_submodule(name), device, left=q.T)

    def _rotate_heads(self, block: nn.Module, layout: BlockLayout, i: int, device: torch.device) -> dict:
        """Per-head rotation of the value rows and the output projection's input columns."""
        v, o, d, n, kv = self._head_shapes(block, layout, i)
        seeds = [head_seed(self.options.rotation_seed, i, g) for g in range(kv)]
        rots = [rotation_matrix(d, self.options.rotate_mode, s) for s in seeds]
        hv, ho = head_blocks(rots, n)
        v_mod = block.get_submodule(v.name)
        left = torch.eye(v_mod.weight.shape[0], dtype=torch.float64)
        start, stop = v.rows or (0, v_mod.weight.shape[0])
        left[start:stop, start:stop] = hv.T
        transform_weight(v_mod, device, left=left.to(device))
        transform_weight(block.get_submodule(o), device, right=ho.to(device))
        return {"value": v.name, "rows": [start, stop], "output": o, "head_dim": d, "num_heads": n,
                "num_kv_heads": kv, "seeds": seeds}
