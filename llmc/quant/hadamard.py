"""Orthogonal matrices for rotation (QuaRot, Ashkboos et al. 2024; SpinQuant, Liu et al. 2024).

Pure functions, float64 by default, generated on CPU from an explicit seed so
that a rotation is replayable from ``(mode, n, seed)`` on any device.

* ``sylvester_hadamard(n)``: the ±1 Hadamard matrix of order ``n = 2^k``
  (``H H^T = n I``).
* ``random_hadamard(n, seed)``: ``H / sqrt(n) @ diag(±1)`` for ``n = 2^k``; for
  ``n = 2^k * m`` with odd ``m > 1`` (1536 = 512 * 3, 3584 = 512 * 7) the
  Kronecker product of the random Hadamard of order ``2^k`` and a random
  orthogonal ``m x m`` matrix. Orthogonal in every case.
* ``random_orthogonal(n, seed)``: Haar-distributed, from the QR decomposition of
  a seeded Gaussian matrix (signs fixed by ``diag(R)``).
"""
from __future__ import annotations

import math
from typing import Literal

import torch

RotateMode = Literal["hadamard", "random"]
ROTATE_MODES: tuple[str, ...] = ("hadamard", "random")


def _check_order(n: int) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"matrix order must be a positive integer, got {n!r}")


def split_pow2(n: int) -> tuple[int, int]:
    """``n = 2^k * m`` with ``m`` odd: returns ``(2^k, m)``."""
    _check_order(n)
    p = n & -n  # largest power of two dividing n
    return p, n // p


def _generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(int(seed))


def sylvester_hadamard(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Unnormalised ±1 Hadamard matrix of order ``n`` (a power of two), by Sylvester's construction."""
    p, m = split_pow2(n)
    if m != 1:
        raise ValueError(f"Sylvester's construction needs a power of two, got {n} = {p} * {m}")
    h = torch.ones(1, 1, dtype=dtype)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], dim=1), torch.cat([h, -h], dim=1)], dim=0)
    return h


def random_signs(n: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``n`` random ±1 values from ``seed``."""
    _check_order(n)
    bits = torch.randint(0, 2, (n,), generator=_generator(seed))
    return (bits * 2 - 1).to(dtype)


def random_orthogonal(n: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Haar-random orthogonal ``n x n`` matrix: QR of a seeded Gaussian, columns sign-fixed by ``diag(R)``."""
    _check_order(n)
    g = torch.randn(n, n, generator=_generator(seed), dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    d = torch.sign(torch.diagonal(r))
    d[d == 0] = 1.0
    return (q * d[None, :]).to(dtype).contiguous()


def random_hadamard(n: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Orthogonal ``n x n``: normalised Hadamard times a random ±1 diagonal (⊗ a random orthogonal for odd factors).

    For ``n = 2^k``: ``H_n / sqrt(n) @ diag(s)``. For ``n = 2^k * m`` (``m`` odd,
    ``> 1``): ``kron(H_{2^k} / sqrt(2^k) @ diag(s), O_m)`` with ``O_m`` the random
    orthogonal matrix of ``seed + 1``.
    """
    p, m = split_pow2(n)
    h = sylvester_hadamard(p) / math.sqrt(p) * random_signs(p, seed)[None, :]
    if m > 1:
        h = torch.kron(h.contiguous(), random_orthogonal(m, seed + 1))
    return h.to(dtype)


def rotation_matrix(n: int, mode: str, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The ``n x n`` rotation of ``mode`` (``hadamard`` or ``random``) for ``seed``."""
    if mode == "hadamard":
        return random_hadamard(n, seed, dtype)
    if mode == "random":
        return random_orthogonal(n, seed, dtype)
    raise ValueError(f"rotate_mode {mode!r} is not valid; valid: {list(ROTATE_MODES)}")
