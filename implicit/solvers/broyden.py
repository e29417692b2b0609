"""Limited-memory Broyden's method ("good" Broyden) for ``g(z) = f(z) - z = 0``."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from ._loop import Method, iterate
from ._result import SolverResult


class _Broyden(Method):
    """Inverse-Jacobian estimate ``H = -I + U^T V`` of ``dg/dz``, rank-one updated.

    ``H`` starts at ``-I`` (so the first step is a Picard step) and keeps the
    last ``m`` updates in ring buffers (slot chosen on the device); empty slots
    are zero and contribute nothing.
    """

    def __init__(self, m: int, step_size: float):
        if int(m) != m or m < 1:
            raise ValueError(f"m (memory) must be a positive integer, got {m}")
        self.m, self.step_size = int(m), step_size

    def key(self) -> tuple:
        return ("broyden", self.m, self.step_size)

    def init(self, z: Tensor) -> None:
        B, n = z.shape
        self.U = z.new_zeros(B, self.m, n)
        self.V = z.new_zeros(B, self.m, n)
        self.z_prev = torch.zeros_like(z)
        self.g_prev = torch.zeros_like(z)

    def reset(self) -> None:
        for t in (self.U, self.V, self.z_prev, self.g_prev):
            t.zero_()

    def _H(self, x: Tensor) -> Tensor:  # H x = -x + sum_i u_i (v_i . x)
        return -x + torch.bmm(torch.bmm(self.V, x[:, :, None]).transpose(1, 2), self.U)[:, 0]

    def _Ht(self, x: Tensor) -> Tensor:  # H^T x = -x + sum_i v_i (u_i . x)
        return -x + torch.bmm(torch.bmm(self.U, x[:, :, None]).transpose(1, 2), self.V)[:, 0]

    def step(self, z: Tensor, g: Tensor, it: Tensor) -> Tensor:
        dz, dg = z - self.z_prev, g - self.g_prev
        v = self._Ht(dz)
        denom = (v * dg).sum(dim=1, keepdim=True)
        size = torch.finfo(z.dtype).eps * dz.norm(dim=1, keepdim=True) * dg.norm(dim=1, keepdim=True)
        ok = (denom.abs() > size) & (it > 0)  # no update before there is a previous iterate
        u = torch.where(ok, (dz - self._H(dg)) / torch.where(ok, denom, 1.0), 0.0)
        slot = (it - 1) % self.m
        self.U.index_copy_(1, slot, u[:, None])
        self.V.index_copy_(1, slot, torch.where(ok, v, 0.0)[:, None])
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
