"""Limited-memory Broyden's method ("good" Broyden) for ``g(z) = f(z) - z = 0``."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from ._loop import Method, iterate
from ._result import SolverResult


class _Broyden(Method):
    """Inverse-Jacobian estimate ``H = -I + U V^T`` of ``dg/dz``, rank-one updated.

    ``H`` starts at ``-I`` (so the first step is a Picard step) and keeps the
    last ``m`` updates in ring buffers; empty slots are zero and contribute nothing.
    """

    def __init__(self, m: int, step_size: float):
        if int(m) != m or m < 1:
            raise ValueError(f"m (memory) must be a positive integer, got {m}")
        self.m, self.step_size = int(m), step_size
        self.period = self.m

    def init(self, z: Tensor) -> None:
        B, n = z.shape
        self.U = z.new_zeros(B, self.m, n)
        self.V = z.new_zeros(B, self.m, n)
        self.z_prev = torch.zeros_like(z)
        self.g_prev = torch.zeros_like(z)

    def _H(self, x: Tensor) -> Tensor:  # H x = -x + U^T-rows (V x)
        return -x + torch.bmm((self.V @ x[:, :, None]).transpose(1, 2), self.U)[:, 0]

    def _Ht(self, x: Tensor) -> Tensor:  # H^T x = -x + V (U x)
        return -x + torch.bmm((self.U @ x[:, :, None]).transpose(1, 2), self.V)[:, 0]

    def step(self, i: int, z: Tensor, g: Tensor) -> Tensor:
        if i > 0:
            dz, dg = z - self.z_prev, g - self.g_prev
            v = self._Ht(dz)
            denom = (v * dg).sum(dim=1, keepdim=True)
            ok = denom.abs() > torch.finfo(z.dtype).eps * dz.norm(dim=1, keepdim=True) * dg.norm(dim=1, keepdim=True)
            u = torch.where(ok, (dz - self._H(dg)) / torch.where(ok, denom, 1.0), 0.0)
            s = (i - 1) % self.m
            self.U[:, s] = u
            self.V[:, s] = torch.where(ok, v, 0.0)
        self.z_prev.copy_(z)
        self.g_prev.copy_(g)
        return z - self.step_size * self._H(g)


def broyden(f: Callable[[Any], Any], z0: Any, *, m: int = 20, step_size: float = 1.0, **options: Any) -> SolverResult:
    """Limited-memory "good" Broyden on ``f(z) - z = 0`` (Broyden, 1965).

    Args:
        m: number of rank-one updates kept.
        step_size: fraction of the quasi-Newton step taken.
        options: shared solver options, see :func:`implicit.solvers.iterate`.
    """
    return iterate(f, z0, _Broyden(m, step_size), **options)
