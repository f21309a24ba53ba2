"""Second-moment statistics of a linear's inputs: GPTQ's Hessian ``H = 2/N * sum_i w_i x_i x_i^T``.

Accumulated over calibration batches (``add_batch``), summed over ranks under torch.distributed
(``combine``), read once per layer (``H``). Used by GPTQ (:mod:`llmc.algorithms.gptq`).
"""
from __future__ import annotations

import torch

from llmc import distributed as dist
from llmc.context import flatten_rows

BAND = 256  # rows of X^T X computed at once in a low-precision compute_dtype
FLUSH_ROWS = 2048  # input rows buffered (over batches) for one X^T X product: larger GEMMs run faster


class HessianStats:
    """``H = 2/N * sum_i w_i x_i x_i^T`` (float32) of a linear's input rows, ``N = sum_i w_i``; the
    products ``X^T X`` in ``compute_dtype`` (float32, or bfloat16 for speed).

    The unnormalised sum is accumulated (no pass over ``H`` per batch) and scaled when :attr:`H` is read.
    Rows are buffered over batches up to ``FLUSH_ROWS`` and multiplied at once (a 537-token batch's
    2816-column product costs about 28 % more per row on its own than in a 2048-row GEMM).
    In bfloat16 only its upper triangle is accumulated, in bands of ``BAND`` rows (about half the
    products; each band's float32 copy is small), and mirrored when read."""

    def __init__(self, columns: int, device: torch.device | str = "cpu",
                 compute_dtype: torch.dtype = torch.float32) -> None:
        self._sum = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self._upper_only = False  # the lower triangle of _sum is stale: mirror it before use
        self._buffer: torch.Tensor | None = None  # rows not yet in _sum (compute_dtype, sqrt(w) folded in)
        self._filled = 0  # rows of _buffer in use
        self.n = 0.0  # total weight seen so far
        self.compute_dtype = compute_dtype

    @property
    def H(self) -> torch.Tensor:
        """The symmetric float32 Hessian so far (a new tensor)."""
        total = self._symmetric_sum()
        return total * (2.0 / self.n) if self.n > 0 else total.clone()

    def _symmetric_sum(self) -> torch.Tensor:
        """The accumulated sum, its lower triangle mirrored from the upper one where that is stale."""
        self._flush()
        self._buffer = None
        if self._upper_only:
            upper = torch.triu(self._sum)
            self._sum.copy_(upper + torch.triu(upper, 1).t())
            self._upper_only = False
        return self._sum

    def add_batch(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        """Add the rows of ``x`` ``[..., C]``; ``weight`` has ``x``'s leading shape (None: all 1).

        Rows of weight 0 (padding) are dropped; when the other weights are all 1 (no
        ``quant.token_weight``) the rows are used as they are, else each is scaled by ``sqrt(w)`` so
        that one symmetric product ``X^T X`` holds the weights. Accumulated in place in float32.
        """
        rows, w = flatten_rows(x.detach(), weight)
        rows = rows.to(self._sum.device, self.compute_dtype)
        if w is not None and bool((w == 1).all()):
            w = None
        added = float(rows.shape[0]) if w is None else float(w.sum())
        if added <= 0:
            return
        if w is not None:
            rows = rows * w.to(self._sum.device, self.compute_dtype).sqrt()[:, None]
        self.n += added
        if rows.shape[0] >= FLUSH_ROWS:  # large enough on its own (the buffer's rows keep till later)
            self._add_product(rows)
            return
        if self._filled + rows.shape[0] > FLUSH_ROWS:
            self._flush()
        if self._buffer is None:
            self._buffer = torch.empty(FLUSH_ROWS, rows.shape[1], dtype=self.compute_dtype, device=self._sum.device)
        self._buffer[self._filled:self._filled + rows.shape[0]].copy_(rows)
        self._filled += rows.shape[0]

    def _flush(self) -> None:
        """Add the buffered rows' product to the sum."""
        if self._filled:
            self._add_product(self._buffer[:self._filled])
            self._filled = 0

    def _add_product(self, rows: torch.Tensor) -> None:
        if self.compute_dtype == torch.float32:
            self._sum.add_(rows.t() @ rows)
        else:  # upper-triangle bands: a small float32 copy at a time, about half the products
            cols = rows.t()
            for r in range(0, cols.shape[0], BAND):
                self._sum[r:r + BAND, r:].add_((cols[r:r + BAND] @ rows[:, r:]).float())
            self._upper_only = True

    def combine(self, owners: set[int]) -> None:
        """Sum every rank's statistics into the ranks ``owners`` (torch.distributed; no-op otherwise).

        The unnormalised sums and the weights ``n_r`` are summed over ranks, so that ``H`` is
        ``2/N sum_i w_i x_i x_i^T`` over every rank's rows. Summed with ``reduce`` into a single
        owner, ``all_reduce`` when several linears of different owners share the input; ``H`` is
        meaningless on the other ranks afterwards.
        """
        if not dist.active():
            return
        total = self._symmetric_sum()
        if len(owners) == 1:
            dist.reduce_sum(total, next(iter(owners)))
        else:
            dist.all_reduce_sum(total)
        self.n = dist.sum_float(self.n)
