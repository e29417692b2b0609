"""Fixed-grid ODE and SDE trajectories, sequentially or in parallel in time.

A fixed-grid trajectory is the recurrence ``y_{k+1} = y_k + increment(t_k, dt_k, y_k)``
(plus ``g(t_k, y_k) dW_k`` and, for Milstein, its ``g g'`` term, for an SDE with a fixed Brownian path), so it is one
fixed point over all steps, handed unchanged to the backend's recurrence solver
(:func:`implicit.solvers.recurrence.solve_recurrence`): Newton with a parallel-scan
linear solve (DEER), Anderson, Picard or ParaDiGMS-style windows. The sequential
reference paths are torchdiffeq's ``odeint`` and torchsde's ``sdeint`` with the same
method and grid, and a CUDA-graph loop (:func:`implicit.solvers.sequential.graphed_rollout`).

Trajectories are returned as torchdiffeq does: ``(T, B, ...)`` with ``ys[0] = y0``.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable

import torch
from torch import Tensor

from .._weak import weak_callable
from ..solvers import NonFiniteError, SolverResult, Status
from ..solvers.recurrence import solve_recurrence
from ..solvers.sequential import graphed_rollout
from .steppers import get_sde_stepper, get_stepper

Field = Callable[[Tensor, Tensor], Tensor]


class GridStep:
    """``step(y, k)``: one fixed-grid step of ``func`` from ``t[k]`` to ``t[k+1]`` for rows ``y``.

    With a ``diffusion`` it is an SDE step (``method`` ``euler``: Euler-Maruyama ``y + f dt + g dW``,
    or ``milstein`` / ``milstein_grad_free``) taking the Brownian increments ``dW`` as its third
    argument. The grid lives in a buffer that :func:`_grid_step` refreshes in place, so a cached
    CUDA graph stays valid.
    """

    def __init__(self, func: Field, t: Tensor, method: str, diffusion: Field | None = None,
                 sde_type: str = "ito"):
        self.func, self.diffusion, self.method = func, diffusion, method
        if diffusion is None:
            self.increment = get_stepper(method)
        else:
            self.sde_increment = get_sde_stepper(method, sde_type)
        self.t = t.clone()

    def __call__(self, y: Tensor, k: Tensor, dW: Tensor | None = None) -> Tensor:
        t0 = self.t[k]
        dt = self.t[k + 1] - t0
        if self.diffusion is None:
            return self.increment(self.func, t0, dt, y)
        return self.sde_increment(self.func, self.diffusion, t0, dt, y, dW)


_STEPS: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def _grid_step(func: Field, t: Tensor, method: str, diffusion: Field | None, persistent: bool,
               sde_type: str = "ito") -> GridStep:
    """A step for ``func`` on grid ``t``; the same object across calls when ``persistent`` (graphs)."""
    if not persistent:
        return GridStep(func, t, method, diffusion, sde_type)
    key = (method, diffusion, sde_type, tuple(t.shape), t.dtype, t.device)
    cache = _STEPS.setdefault(func, {})
    if key not in cache:
        # func called weakly: a cached value holding its own key would never be freed
        cache[key] = GridStep(weak_callable(func), t, method, diffusion, sde_type)
    step = cache[key]
    step.t.copy_(t)
    return step


def _check_grid(y0: Tensor, t: Tensor) -> Tensor:
    if not torch.is_tensor(y0) or y0.dim() < 1 or not y0.is_floating_point():
        raise ValueError("y0 must be a floating-point tensor of shape (B, ...)")
    t = torch.as_tensor(t)
    if t.dim() != 1 or t.numel() < 2:
        raise ValueError(f"t must be a 1-D grid of at least two times, got shape {tuple(t.shape)}")
    t = t.to(device=y0.device, dtype=y0.dtype)
    dt = t[1:] - t[:-1]
    if not bool(((dt > 0).all() | (dt < 0).all())):
        raise ValueError("t must be strictly monotonic")
    return t


def check_finite(ys: Tensor, t: Tensor, what: str = "trajectory") -> None:
    """Raise :class:`NonFiniteError` naming the first step and time where ``ys`` (T, B, ...) blows up."""
    finite = torch.isfinite(ys.reshape(ys.shape[0], ys.shape[1], -1)).all(dim=2)  # (T, B)
    if bool(finite.all()):
        return
    bad_t, bad_b = (~finite).nonzero()[0].tolist()
    raise NonFiniteError(
        f"the {what} became NaN/inf at step {bad_t} (t={float(t[bad_t]):.6g}) for sample {bad_b}; "
        "the field blows up on this grid: shrink the step or check the model"
    )


def _parallel(step: GridStep, y0: Tensor, t: Tensor, inputs: Tensor | None, solver: str, tol: float,
              options: dict) -> tuple[Tensor, SolverResult]:
    K = t.numel() - 1
    result = solve_recurrence(step, y0, K, method=solver, inputs=inputs, tol=tol, **options)
    ys = torch.cat([y0[None], result.z.transpose(0, 1)])
    bad = result.status == Status.NONFINITE
    if bool(bad.any()):
        # Locate the blow-up exactly: roll the failing samples out step by step (error path only).
        from ..solvers.recurrence import rollout

        with torch.no_grad():
            sub = None if inputs is None else inputs[bad]
            traj = rollout(step, y0[bad], K, inputs=sub)
        check_finite(torch.cat([y0[bad][None], traj.transpose(0, 1)]), t)
        raise NonFiniteError("the parallel trajectory solve met a NaN/inf (the field blows up on this grid)")
    return ys, result


def odeint_parallel(func: Field, y0: Tensor, t: Tensor, *, method: str = "rk4", solver: str = "newton",
                    tol: float = 1e-7, graph: bool = False, **options: Any) -> tuple[Tensor, SolverResult]:
    """Solve ``dy/dt = func(t, y)`` on the fixed grid ``t`` with all steps in parallel.

    Args:
        func: the field ``func(t, y)``; ``t`` is a scalar or per-row ``(N,)`` tensor, ``y`` ``(N, ...)``.
        y0: ``(B, ...)`` initial states. t: ``(T,)`` grid. method: ``euler``, ``midpoint``,
            ``heun2`` or ``rk4`` (torchdiffeq's fixed-grid formulas).
        solver: the recurrence method: ``newton``, ``anderson``, ``picard`` or ``window``.
        tol: tolerance (relative, on the whole trajectory unless ``stop_mode="abs"``).
        graph: capture the solver's rounds as a CUDA graph (cached on ``func``).
        options: passed to :func:`~implicit.solvers.recurrence.solve_recurrence`
            (``max_iter``, ``chunk``, ``window``, ``backward``, ``check_every``...).

    Returns:
        ``(ys, result)``: the trajectory ``(T, B, ...)`` (differentiable through the chosen
        backward strategy) and the solver result (rounds per sample in ``n_iter``).
    """
    t = _check_grid(y0, t)
    step = _grid_step(func, t, method, None, graph)
    return _parallel(step, y0, t, None, solver, tol, dict(options, graph=graph))


def sdeint_parallel(drift: Field, diffusion: Field, y0: Tensor, t: Tensor, dW: Tensor, *,
                    method: str = "euler", sde_type: str = "ito", solver: str = "newton", tol: float = 1e-7,
                    graph: bool = False, **options: Any) -> tuple[Tensor, SolverResult]:
    """Solve the SDE ``dy = f dt + g dW`` (diagonal noise) on the fixed grid ``t`` with all steps in parallel.

    Args:
        drift, diffusion: ``f(t, y)`` and ``g(t, y)``, both ``(N, ...)`` like ``y`` (diagonal noise).
        y0: ``(B, ...)`` initial states. t: ``(T,)`` grid.
        dW: ``(B, K, ...)``: the Brownian increments over each grid interval, e.g.
            :func:`brownian_increments` of a torchsde ``BrownianInterval``, so the result equals
            ``torchsde.sdeint(..., method=method)`` driven by the same path.
        method: ``"euler"`` (Euler-Maruyama, Ito), ``"milstein"`` (torchsde's default Milstein,
            derivative by autograd) or ``"milstein_grad_free"`` (torchsde's ``grad_free=True``).
        sde_type: ``"ito"`` or ``"stratonovich"`` (Milstein only).
        solver, tol, graph, options: as in :func:`odeint_parallel`.

    Returns:
        ``(ys, result)``: the trajectory ``(T, B, ...)`` and the solver result.
    """
    t = _check_grid(y0, t)
    K = t.numel() - 1
    if tuple(dW.shape) != (y0.shape[0], K, *y0.shape[1:]):
        raise ValueError(f"dW must have shape (B, K, ...) = {(y0.shape[0], K, *y0.shape[1:])}, got {tuple(dW.shape)}")
    step = _grid_step(drift, t, method, diffusion, graph, sde_type)
    return _parallel(step, y0, t, dW, solver, tol, dict(options, graph=graph))


def brownian_increments(bm: Callable[[Tensor, Tensor], Tensor], t: Tensor) -> Tensor:
    """``bm(t_k, t_{k+1})`` for each interval of ``t``, stacked as ``(B, K, ...)``."""
    return torch.stack([bm(t[k], t[k + 1]) for k in range(t.numel() - 1)], dim=1)


def odeint_sequential(func: Field, y0: Tensor, t: Tensor, *, method: str = "rk4", graph: bool = False,
                      adjoint: bool = False) -> Tensor:
    """The sequential reference: torchdiffeq's fixed-grid ``odeint`` (``odeint_adjoint`` with
    ``adjoint=True``, ``func`` then an ``nn.Module``), or with ``graph=True`` on CUDA a CUDA-graph
    loop of the same steps (no gradients). Returns ``(T, B, ...)``."""
    t = _check_grid(y0, t)
    get_stepper(method)  # validates the name
    if graph and y0.is_cuda:
        step = _grid_step(func, t, method, None, True)
        ys = torch.cat([y0[None], graphed_rollout(step, y0, t.numel() - 1).transpose(0, 1)])
    elif adjoint:
        from torchdiffeq import odeint_adjoint

        ys = odeint_adjoint(func, y0, t, method=method)
    else:
        from torchdiffeq import odeint

        ys = odeint(func, y0, t, method=method)
    check_finite(ys, t)
    return ys


class _TorchsdeAdapter(torch.nn.Module):
    noise_type = "diagonal"

    def __init__(self, drift: Field, diffusion: Field, sde_type: str = "ito"):
        super().__init__()
        self.drift, self.diffusion, self.sde_type = drift, diffusion, sde_type

    def f(self, t, y):
        return self.drift(t, y)

    def g(self, t, y):
        return self.diffusion(t, y)


def sdeint_sequential(drift: Field, diffusion: Field, y0: Tensor, t: Tensor, bm: Any, *, method: str = "euler",
                      sde_type: str = "ito", adjoint: bool = False) -> Tensor:
    """torchsde's fixed-step ``sdeint`` on grid ``t`` driven by ``bm`` (a ``BrownianInterval``). ``(T, B, d)``.

    ``method``: ``"euler"``, ``"milstein"`` or ``"milstein_grad_free"`` (torchsde's ``milstein`` with
    ``options={"grad_free": True}``), the same steps :func:`sdeint_parallel` takes.
    """
    import torchsde

    t = _check_grid(y0, t)
    get_sde_stepper(method, sde_type)  # validates the pair
    sde = _TorchsdeAdapter(drift, diffusion, sde_type)
    integrate = torchsde.sdeint_adjoint if adjoint else torchsde.sdeint
    options = {"grad_free": True} if method == "milstein_grad_free" else None
    name = "milstein" if method.startswith("milstein") else method
    dt = float((t[1:] - t[:-1]).abs().min())
    if _steps_on_grid(t.tolist(), dt):
        ys = integrate(sde, y0, t, bm=bm, method=name, dt=dt, options=options)
    else:
        # torchsde steps t + dt + dt + ...; off the grid by rounding, its Brownian queries would differ
        # from ``bm(t_k, t_{k+1})`` by bridge samples of size sqrt(rounding). One call per interval
        # (with a step a hair longer than the interval, clamped to its end) keeps every step on the grid.
        ys, y = [y0], y0
        for k in range(t.numel() - 1):
            h = float(t[k + 1] - t[k]) * (1 + 1e-12)
            y = integrate(sde, y, t[k:k + 2], bm=bm, method=name, dt=h, options=options)[-1]
            ys.append(y)
        ys = torch.stack(ys)
    check_finite(ys, t)
    return ys


def _steps_on_grid(t: list[float], dt: float) -> bool:
    """Whether torchsde's fixed-step loop (``next = min(cur + dt, t[-1])``) visits exactly the times ``t``."""
    cur = t[0]
    for out in t[1:]:
        cur = min(cur + dt, t[-1])
        if cur != out:
            return False
    return True
