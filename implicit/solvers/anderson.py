"""Anderson acceleration (Anderson, 1965; Walker & Ni, 2011), batched on the device."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from ._loop import Method, iterate
from ._result import SolverResult


class _Anderson(Method):
    """Type-II Anderson mixing over a ring buffer of the last ``m`` iterates.

    The slot written at iteration ``k`` is ``k % m``, chosen on the device. The
    Gram matrix of past residuals gains one row per iteration, and the
    constrained least-squares problem ``min ||sum_i a_i g_i||, sum(a) = 1`` is
    solved as a regularised bordered system with ``torch.linalg.solve_ex`` (no
    host sync). Slots not yet filled are masked to the identity, so their
    weights are exactly zero. The buffers hold ``g_i`` (for the Gram matrix) and
    the mixed points ``z_i + beta g_i`` (so the update reads one buffer, not two).
    """

    def __init__(self, m: int, beta: float, lam: float):
        if int(m) != m or m < 1:
            raise ValueError(f"m (history size) must be a positive integer, got {m}")
        if not 0 < beta <= 1:
            raise ValueError(f"beta (mixing) must be in (0, 1], got {beta}")
        if lam < 0:
            raise ValueError(f"lam (regularisation) must be non-negative, got {lam}")
        self.m, self.beta, self.lam = int(m), beta, lam

    def key(self) -> tuple:
        return ("anderson", self.m, self.beta, self.lam)

    def init(self, z: Tensor) -> None:
        B, n = z.shape
        m = self.m
        self.P = z.new_zeros(B, m, n)  # z_i + beta * g_i
        self.G = z.new_zeros(B, m, n)
        self.GG = z.new_zeros(B, m, m)
        self.rhs = z.new_zeros(B, m + 1, 1)
        self.rhs[:, 0] = 1
        self.slots = torch.arange(m, device=z.device)
        self.eye = torch.eye(m, device=z.device, dtype=z.dtype)

    def reset(self) -> None:
        self.P.zero_()
        self.G.zero_()
        self.GG.zero_()

    def step(self, z: Tensor, g: Tensor, it: Tensor) -> Tensor:
        slot = it % self.m
        self.P.index_copy_(1, slot, torch.add(z, g, alpha=self.beta)[:, None])
        self.G.index_copy_(1, slot, g[:, None])
        row = torch.bmm(self.G, g[:, :, None])  # (B, m, 1): <g_i, g_new>
        self.GG.index_copy_(2, slot, row)
        self.GG.index_copy_(1, slot, row.transpose(1, 2))
        filled = (self.slots <= it).to(z.dtype)  # (m,)
        pair = filled[:, None] * filled[None, :]
        scale = (torch.diagonal(self.GG, dim1=1, dim2=2) * filled).sum(1) / filled.sum()
        reg = self.lam * scale + torch.finfo(z.dtype).tiny
        H = z.new_zeros(z.shape[0], self.m + 1, self.m + 1)
        H[:, 0, 1:] = filled
        H[:, 1:, 0] = filled
        H[:, 1:, 1:] = self.GG * pair + self.eye * (reg[:, None, None] * filled + (1 - filled))
        alpha = torch.linalg.solve_ex(H, self.rhs)[0][:, 1:].transpose(1, 2)  # (B, 1, m)
        return torch.bmm(alpha, self.P)[:, 0]


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
