"""Anderson acceleration (Anderson, 1965; Walker & Ni, 2011), batched on the device."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from ._loop import Method, iterate
from ._result import SolverResult


class _Anderson(Method):
    """Type-II Anderson mixing over a ring buffer of the last ``m`` iterates.

    The Gram matrix of past residuals is updated one row per iteration, and the
    constrained least-squares problem ``min ||G^T a||, sum(a) = 1`` is solved as a
    regularised bordered system with ``torch.linalg.solve_ex`` (no host sync).
    """

    def __init__(self, m: int, beta: float, lam: float):
        if int(m) != m or m < 1:
            raise ValueError(f"m (history size) must be a positive integer, got {m}")
        if not 0 < beta <= 1:
            raise ValueError(f"beta (mixing) must be in (0, 1], got {beta}")
        if lam < 0:
            raise ValueError(f"lam (regularisation) must be non-negative, got {lam}")
        self.m, self.beta, self.lam = int(m), beta, lam
        self.period = self.m

    def init(self, z: Tensor) -> None:
        B, n = z.shape
        self.X = z.new_zeros(B, self.m, n)
        self.G = z.new_zeros(B, self.m, n)
        self.GG = z.new_zeros(B, self.m, self.m)
        self.rhs = z.new_zeros(B, self.m + 1, 1)
        self.rhs[:, 0] = 1

    def step(self, i: int, z: Tensor, g: Tensor) -> Tensor:
        s, k = i % self.m, min(i + 1, self.m)
        self.X[:, s] = z
        self.G[:, s] = g
        row = torch.bmm(self.G[:, :k], g[:, :, None])[..., 0]  # (B, k)
        self.GG[:, s, :k] = row
        self.GG[:, :k, s] = row
        GG = self.GG[:, :k, :k]
        scale = torch.diagonal(GG, dim1=1, dim2=2).mean(dim=1)
        reg = (self.lam * scale + torch.finfo(z.dtype).tiny)[:, None, None]
        H = z.new_zeros(z.shape[0], k + 1, k + 1)
        H[:, 0, 1:] = 1
        H[:, 1:, 0] = 1
        H[:, 1:, 1:] = GG + reg * torch.eye(k, device=z.device, dtype=z.dtype)
        alpha = torch.linalg.solve_ex(H, self.rhs[:, : k + 1])[0][:, 1:]  # (B, k, 1)
        alpha = alpha.transpose(1, 2)  # (B, 1, k)
        mixed = torch.bmm(alpha, self.X[:, :k]) + self.beta * torch.bmm(alpha, self.G[:, :k])
        return mixed[:, 0]


def anderson(
    f: Callable[[Any], Any],
    z0: Any,
    *,
    m: int = 5,
    beta: float = 1.0,
    lam: float = 1e-4,
    **options: Any,
) -> SolverResult:
    """Anderson acceleration of ``z = f(z)`` (Walker & Ni, 2011).

    Args:
        m: history size.
        beta: mixing; ``1`` takes ``sum(a * f(z))``, smaller damps toward ``sum(a * z)``.
        lam: Tikhonov regularisation of the Gram matrix, relative to its mean diagonal.
        options: shared solver options, see :func:`implicit.solvers.iterate`.
    """
    return iterate(f, z0, _Anderson(m, beta, lam), **options)
