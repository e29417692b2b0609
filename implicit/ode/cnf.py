"""Continuous normalising flows (FFJORD, Grathwohl et al., arXiv 1810.01367) on fixed grids.

A CNF moves base samples ``z(0) ~ N(0, I)`` along ``dz/dt = f(t, z)`` to data ``x = z(1)``;
the log-density changes by ``d log p(z(t)) / dt = -tr(df/dz)`` (Chen et al., arXiv 1806.07366).
The flow integrates the augmented state ``s = [z, a, eps]`` with ``da/dt = tr(df/dz)`` and
``d eps/dt = 0``: the trace is exact (``d`` forward-mode JVPs, fine in 2-D) or Hutchinson's
estimate ``eps^T (df/dz) eps`` with the probe ``eps`` carried in the state, so the augmented
field is a plain function of ``(t, s)``. That makes one trajectory a fixed-grid ODE like any
other: sequentially through torchdiffeq (``odeint``, ``odeint_adjoint``) or all steps at once
through :func:`~implicit.ode.solve.odeint_parallel` (the backend's recurrence solver). All
derivatives inside the field use :mod:`torch.func`, so they compose with the parallel solver's
Newton Jacobians and with autograd.

``log p_1(x) = log N(z(0)) + a(0)`` when ``s`` is integrated from ``[x, 0, eps]`` at ``t = 1``
back to ``t = 0``. Toy 2-D densities are generated here (nothing is downloaded).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .models import MLPField
from .solve import odeint_parallel, odeint_sequential

CNF_MODES = ("sequential", "adjoint", "parallel")
TRACES = ("hutchinson", "exact")
TOY_DATASETS = ("moons", "8gaussians", "checkerboard")


class AugmentedDynamics(nn.Module):
    """``(t, s) -> ds/dt`` for ``s = [z (d), a (1), eps (d, Hutchinson only)]``: ``[f, tr(df/dz), 0]``."""

    def __init__(self, field: nn.Module, dim: int, trace: str = "hutchinson"):
        super().__init__()
        if trace not in TRACES:
            raise ValueError(f'trace must be one of {TRACES}, got "{trace}"')
        self.field, self.dim, self.trace = field, dim, trace

    def state_dim(self) -> int:
        return 2 * self.dim + 1 if self.trace == "hutchinson" else self.dim + 1

    def forward(self, t: Tensor, s: Tensor) -> Tensor:
        d = self.dim
        z = s[:, :d]

        def f(v: Tensor) -> Tensor:
            return self.field(t, v)

        if self.trace == "hutchinson":
            eps = s[:, d + 1:]
            dz, jeps = torch.func.jvp(f, (z,), (eps,))
            tr = (jeps * eps).sum(1, keepdim=True)
            return torch.cat([dz, tr, torch.zeros_like(eps)], dim=1)
        tr = z.new_zeros(z.shape[0], 1)
        eye = torch.eye(d, dtype=z.dtype, device=z.device)
        for i in range(d):  # d forward-mode JVPs: column i of df/dz, of which the diagonal entry is kept
            dz, col = torch.func.jvp(f, (z,), (eye[i].expand_as(z),))
            tr = tr + col[:, i:i + 1]
        return torch.cat([dz, tr], dim=1)


def standard_normal_log_prob(z: Tensor) -> Tensor:
    """``log N(z; 0, I)`` per row: ``(B,)``."""
    return -0.5 * (z**2).sum(1) - 0.5 * z.shape[1] * math.log(2 * math.pi)


class CNF(nn.Module):
    """A continuous normalising flow ``dz/dt = field(t, z)`` on ``t in [0, 1]`` with a fixed grid.

    Args:
        dim: data dimension. width, depth: the default field, an MLP of ``(z, t)`` (tanh).
        field: a custom ``field(t, z)`` (then ``width``/``depth`` are ignored).
        steps: grid intervals on ``[0, 1]``. method: fixed-grid method (``rk4``, ``euler``, ...).
        trace: ``"hutchinson"`` (Rademacher or Gaussian probe, ``noise``) or ``"exact"``.
        solver, tol, solver_options: the parallel-in-time solve (:func:`odeint_parallel`).
    """

    def __init__(self, dim: int = 2, width: int = 64, depth: int = 3, *, field: nn.Module | None = None,
                 steps: int = 8, method: str = "rk4", trace: str = "hutchinson", noise: str = "rademacher",
                 solver: str = "newton", tol: float = 1e-8, solver_options: dict | None = None):
        super().__init__()
        if noise not in ("rademacher", "gaussian"):
            raise ValueError(f'noise must be "rademacher" or "gaussian", got "{noise}"')
        self.dim, self.steps, self.method, self.trace, self.noise = dim, steps, method, trace, noise
        self.field = field if field is not None else MLPField(dim, width, depth, time=True)
        self.solver, self.tol, self.solver_options = solver, tol, dict(solver_options or {})
        self.last_result = None
        self._dynamics: dict[str, AugmentedDynamics] = {}  # plain dict: not a submodule, no duplicate parameters

    def dynamics(self, trace: str | None = None) -> AugmentedDynamics:
        """The augmented field, one object per trace kept across calls, so a ``graph=True`` solve reuses the
        CUDA graphs it cached on it (a new object per call would capture them again every time)."""
        trace = trace or self.trace
        cached = self._dynamics.get(trace)
        if cached is None or cached.field is not self.field:
            cached = self._dynamics[trace] = AugmentedDynamics(self.field, self.dim, trace)
        return cached

    def probe(self, like: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """A Hutchinson probe ``eps`` shaped like ``like`` (zero mean, identity covariance)."""
        e = torch.randn(like.shape, generator=generator, dtype=like.dtype, device=like.device)
        return e.sign() if self.noise == "rademacher" else e

    def integrate(self, x: Tensor, *, reverse: bool, mode: str = "sequential", trace: str | None = None,
                  eps: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        """The augmented trajectory ``(T, B, D)`` from ``[x, 0, eps]``: backward from ``t = 1`` to
        ``0`` (``reverse=True``, data to base) or forward from ``0`` to ``1`` (base to data)."""
        if mode not in CNF_MODES:
            raise ValueError(f'mode must be one of {CNF_MODES}, got "{mode}"')
        trace = trace or self.trace
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape (B, {self.dim}), got {tuple(x.shape)}")
        parts = [x, x.new_zeros(x.shape[0], 1)]
        if trace == "hutchinson":
            parts.append(self.probe(x, generator) if eps is None else eps.to(x))
        s = torch.cat(parts, dim=1)
        t = torch.linspace(0, 1, self.steps + 1, dtype=x.dtype, device=x.device)
        if reverse:
            t = t.flip(0)
        dyn = self.dynamics(trace)
        if mode == "parallel":
            ys, self.last_result = odeint_parallel(dyn, s, t, method=self.method, solver=self.solver, tol=self.tol,
                                                   **self.solver_options)
            return ys
        return odeint_sequential(dyn, s, t, method=self.method, adjoint=mode == "adjoint")

    def log_prob(self, x: Tensor, *, mode: str = "sequential", trace: str | None = None, eps: Tensor | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        """``log p(x)`` per row ``(B,)`` by the change of variables along the flow (nats)."""
        end = self.integrate(x, reverse=True, mode=mode, trace=trace, eps=eps, generator=generator)[-1]
        return standard_normal_log_prob(end[:, : self.dim]) + end[:, self.dim]

    def sample(self, n: int, *, mode: str = "sequential", trace: str | None = None,
               generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32,
               device: Any = None) -> tuple[Tensor, Tensor]:
        """``n`` samples ``x (n, d)`` and their log-densities ``(n,)`` (exact when ``trace="exact"``)."""
        z = torch.randn(n, self.dim, generator=generator, dtype=dtype, device=device)
        end = self.integrate(z, reverse=False, mode=mode, trace=trace, generator=generator)[-1]
        return end[:, : self.dim], standard_normal_log_prob(z) - end[:, self.dim]


# --- toy 2-D densities --------------------------------------------------------------------------------


def toy_data(name: str, n: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> Tensor:
    """``n`` samples ``(n, 2)`` of a toy 2-D density, roughly on ``[-3, 3]^2``.

    ``moons``: scikit-learn's two moons (noise 0.05), centred and scaled by 2; ``8gaussians``: equal
    mixture of ``N(c_i, 0.2^2 I)`` with centres on the circle of radius 2; ``checkerboard``: uniform
    on the 8 black unit squares of a 4x4 board on ``[-2, 2]^2``.
    """
    g = torch.Generator().manual_seed(seed)
    if name == "moons":
        from sklearn.datasets import make_moons

        x = torch.as_tensor(make_moons(n, noise=0.05, random_state=seed)[0], dtype=torch.float64)
        x = (x - torch.tensor([0.5, 0.25], dtype=torch.float64)) * 2
    elif name == "8gaussians":
        x = _centres(torch.float64)[torch.randint(8, (n,), generator=g)]
        x = x + 0.2 * torch.randn(n, 2, generator=g, dtype=torch.float64)
    elif name == "checkerboard":
        u = torch.rand(n, 2, generator=g, dtype=torch.float64) * torch.tensor([4.0, 2.0], dtype=torch.float64)
        col = torch.floor(u[:, 0])  # 0..3
        row = 2 * torch.floor(u[:, 1]) + (col % 2)  # rows 0..3, alternating with the column
        x = torch.stack([u[:, 0], row + u[:, 1] % 1], dim=1) - 2.0
    else:
        raise ValueError(f'Unknown toy dataset "{name}". Must be one of {TOY_DATASETS}.')
    return x.to(dtype)


def _centres(dtype: torch.dtype) -> Tensor:
    a = torch.arange(8, dtype=dtype) * (2 * math.pi / 8)
    return 2.0 * torch.stack([a.cos(), a.sin()], dim=1)


def toy_log_density(name: str, x: Tensor) -> Tensor | None:
    """The true ``log p(x)`` ``(B,)`` of a toy density where it has a closed form, else ``None``."""
    if name == "8gaussians":
        c = _centres(x.dtype).to(x.device)
        sq = ((x[:, None] - c[None]) ** 2).sum(-1)
        var = 0.2**2
        return torch.logsumexp(-sq / (2 * var), dim=1) - math.log(8) - math.log(2 * math.pi * var)
    if name == "checkerboard":
        inside = (x.abs() <= 2).all(1)
        i, j = torch.floor(x[:, 0] + 2), torch.floor(x[:, 1] + 2)
        black = ((i + j) % 2 == 0) & inside
        return torch.where(black, torch.full_like(x[:, 0], -math.log(8)), torch.full_like(x[:, 0], -math.inf))
    return None
