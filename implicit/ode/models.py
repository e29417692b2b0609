"""``NeuralODE`` and ``NeuralSDE`` modules choosing per call how the trajectory is solved."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .solve import odeint_parallel, odeint_sequential, sdeint_parallel, sdeint_sequential

MODES = ("sequential", "parallel", "graph")


class MLPField(nn.Module):
    """``f(t, y)``: an MLP on the state (autonomous unless ``time=True``, then ``t`` is an input)."""

    def __init__(self, dim: int, width: int = 64, depth: int = 2, time: bool = False, activation=nn.Tanh):
        super().__init__()
        self.time = time
        layers: list[nn.Module] = []
        d = dim + int(time)
        for _ in range(depth):
            layers += [nn.Linear(d, width), activation()]
            d = width
        layers.append(nn.Linear(d, dim))
        self.net = nn.Sequential(*layers)

    def forward(self, t: Tensor, y: Tensor) -> Tensor:
        if self.time:
            t = torch.as_tensor(t, dtype=y.dtype, device=y.device).expand(y.shape[0])
            y = torch.cat([y, t[:, None]], dim=1)
        return self.net(y)


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f'mode must be one of {MODES}, got "{mode}"')


class NeuralODE(nn.Module):
    """``dy/dt = field(t, y)`` on a fixed grid (Chen et al., 2018).

    ``mode="sequential"`` integrates with torchdiffeq (``adjoint=True``: its adjoint
    method); ``"parallel"`` solves all steps at once on the backend (``solver`` newton,
    anderson, picard or window; gradients by exact implicit differentiation of the
    trajectory fixed point, or ``backward="jfb"|"phantom"``); ``"graph"`` is the
    CUDA-graph sequential loop (inference only).
    """

    def __init__(self, field: nn.Module, *, method: str = "rk4", solver: str = "newton", tol: float = 1e-7,
                 solver_options: dict | None = None):
        super().__init__()
        self.field, self.method, self.solver, self.tol = field, method, solver, tol
        self.solver_options = dict(solver_options or {})
        self.last_result = None

    def forward(self, y0: Tensor, t: Tensor, *, mode: str = "parallel", adjoint: bool = False) -> Tensor:
        _check_mode(mode)
        if mode == "parallel":
            ys, self.last_result = odeint_parallel(self.field, y0, t, method=self.method, solver=self.solver,
                                                   tol=self.tol, **self.solver_options)
            return ys
        return odeint_sequential(self.field, y0, t, method=self.method, graph=mode == "graph", adjoint=adjoint)


class NeuralSDE(nn.Module):
    """SDE ``dy = drift(t, y) dt + diffusion(t, y) dW`` (diagonal noise) on a fixed grid.

    ``method``: ``"euler"`` (Euler-Maruyama, Ito), ``"milstein"`` or ``"milstein_grad_free"``
    (torchsde's Milstein with and without autograd); ``sde_type`` ``"ito"`` or ``"stratonovich"``
    (Milstein only). ``forward(y0, t, bm)`` takes a torchsde ``BrownianInterval`` (or any
    ``bm(t0, t1)``) so the sequential (torchsde) and parallel paths integrate the same Brownian path.
    """

    def __init__(self, drift: nn.Module, diffusion: nn.Module, *, method: str = "euler", sde_type: str = "ito",
                 solver: str = "newton", tol: float = 1e-7, solver_options: dict | None = None):
        super().__init__()
        self.drift, self.diffusion, self.solver, self.tol = drift, diffusion, solver, tol
        self.method, self.sde_type = method, sde_type
        self.solver_options = dict(solver_options or {})
        self.last_result = None

    def forward(self, y0: Tensor, t: Tensor, bm: Any, *, mode: str = "parallel", adjoint: bool = False) -> Tensor:
        _check_mode(mode)
        if mode == "parallel":
            from .solve import _check_grid, brownian_increments

            dW = brownian_increments(bm, _check_grid(y0, t))
            ys, self.last_result = sdeint_parallel(self.drift, self.diffusion, y0, t, dW, method=self.method,
                                                   sde_type=self.sde_type, solver=self.solver, tol=self.tol,
                                                   **self.solver_options)
            return ys
        if mode == "graph":
            raise ValueError('mode="graph" is not available for SDEs; use "sequential" or "parallel"')
        return sdeint_sequential(self.drift, self.diffusion, y0, t, bm, method=self.method, sde_type=self.sde_type,
                                 adjoint=adjoint)
