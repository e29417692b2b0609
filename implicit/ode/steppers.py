"""Fixed-grid one-step methods ``y1 = y0 + increment(func, t0, dt, y0)``.

The formulas are the classical explicit Runge-Kutta schemes, written so that
``t0`` and ``dt`` may be per-row tensors: the parallel-in-time solver evaluates
one step at many times at once. ``rk4`` is Kutta's 3/8 rule, the variant
torchdiffeq's fixed-grid ``"rk4"`` uses, so both produce the same trajectory.
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor

Field = Callable[[Tensor, Tensor], Tensor]


def _b(t: Tensor, y: Tensor) -> Tensor:
    """Broadcast per-row times ``(N,)`` against states ``(N, ...)``; scalars pass through."""
    return t.reshape(-1, *([1] * (y.dim() - 1))) if t.dim() == 1 else t


def euler(func: Field, t0: Tensor, dt: Tensor, y0: Tensor) -> Tensor:
    return y0 + _b(dt, y0) * func(t0, y0)


def midpoint(func: Field, t0: Tensor, dt: Tensor, y0: Tensor) -> Tensor:
    h = _b(dt, y0)
    k1 = func(t0, y0)
    return y0 + h * func(t0 + dt / 2, y0 + h / 2 * k1)


def heun2(func: Field, t0: Tensor, dt: Tensor, y0: Tensor) -> Tensor:
    h = _b(dt, y0)
    k1 = func(t0, y0)
    k2 = func(t0 + dt, y0 + h * k1)
    return y0 + h * (k1 / 2 + k2 / 2)


def rk4(func: Field, t0: Tensor, dt: Tensor, y0: Tensor) -> Tensor:
    h = _b(dt, y0)
    k1 = func(t0, y0)
    k2 = func(t0 + dt / 3, y0 + h * k1 / 3)
    k3 = func(t0 + dt * 2 / 3, y0 + h * (k2 - k1 / 3))
    k4 = func(t0 + dt, y0 + h * (k1 - k2 + k3))
    return y0 + (k1 + 3 * (k2 + k3) + k4) * h * 0.125


STEPPERS: dict[str, Callable[[Field, Tensor, Tensor, Tensor], Tensor]] = {
    "euler": euler, "midpoint": midpoint, "heun2": heun2, "rk4": rk4,
}


def get_stepper(name: str):
    try:
        return STEPPERS[name]
    except KeyError:
        raise ValueError(f'Unknown fixed-grid method "{name}". Must be one of {sorted(STEPPERS)}.') from None
