"""Fixed-grid one-step methods ``y1 = y0 + increment(func, t0, dt, y0)``.

The formulas are the classical explicit Runge-Kutta schemes, written so that
``t0`` and ``dt`` may be per-row tensors: the parallel-in-time solver evaluates
one step at many times at once. ``rk4`` is Kutta's 3/8 rule, the variant
torchdiffeq's fixed-grid ``"rk4"`` uses, so both produce the same trajectory.
The SDE steps (Euler-Maruyama, Milstein) follow torchsde's formulas for diagonal noise.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
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


# --- SDE steps with diagonal noise: ``y1 = step(drift, diffusion, t0, dt, y0, dW)`` -------------------
#
# ``dW`` (N, ...) is the Brownian increment over ``[t0, t0 + dt]``. The formulas are torchsde's
# (``torchsde/_core/methods/{euler,milstein}.py``), so with the same increments both give the
# same path to rounding. Every derivative is taken with :mod:`torch.func`, so the steps compose
# with the forward-mode Jacobians of the parallel-in-time Newton solver and with autograd.

SDEStep = Callable[[Field, Field, Tensor, Tensor, Tensor, Tensor], Tensor]


def euler_maruyama(drift: Field, diffusion: Field, t0: Tensor, dt: Tensor, y0: Tensor, dW: Tensor) -> Tensor:
    """Euler-Maruyama (Ito): ``y0 + f dt + g dW``."""
    return y0 + drift(t0, y0) * _b(dt, y0) + diffusion(t0, y0) * dW


def _milstein_v(dt: Tensor, dW: Tensor, sde_type: str) -> Tensor:
    """``dW^2 - dt`` (Ito) or ``dW^2`` (Stratonovich): the iterated integral ``2 I_(1,1)``."""
    if sde_type == "ito":
        return dW**2 - _b(dt, dW)
    if sde_type == "stratonovich":
        return dW**2
    raise ValueError(f'sde_type must be "ito" or "stratonovich", got "{sde_type}"')


def milstein(drift: Field, diffusion: Field, t0: Tensor, dt: Tensor, y0: Tensor, dW: Tensor,
             sde_type: str = "ito") -> Tensor:
    """Milstein with diagonal noise, derivative by autograd (torchsde's default ``grad_free=False``).

    ``y1 = y0 + f dt + g dW + (1/2) (dg/dy)^T (g v)`` with ``v = dW^2 - dt`` (Ito) or ``dW^2``
    (Stratonovich). The last term is the vector-Jacobian product torchsde takes
    (``g_prod_and_gdg_prod_diagonal``): ``sum_j g_j v_j dg_j/dy_i``, which is ``g_i g_i' v_i``
    when each ``g_i`` depends on ``y_i`` alone (the commutative case Milstein's order 1 needs).
    """
    v = _milstein_v(dt, dW, sde_type)
    f = drift(t0, y0)
    g, pullback = torch.func.vjp(lambda y: diffusion(t0, y), y0)
    (gdg,) = pullback(g * (0.5 * v))
    return y0 + f * _b(dt, y0) + g * dW + gdg


def milstein_grad_free(drift: Field, diffusion: Field, t0: Tensor, dt: Tensor, y0: Tensor, dW: Tensor,
                       sde_type: str = "ito") -> Tensor:
    """Derivative-free Milstein (torchsde's ``options={"grad_free": True}``).

    ``dg/dy g`` is replaced by the difference ``(g(y') - g(y)) / sqrt(dt)`` at the support point
    ``y' = y + f dt + g sqrt(dt)`` (Ito; ``y + g sqrt(dt)`` for Stratonovich).
    """
    v = _milstein_v(dt, dW, sde_type)
    h = _b(dt, y0)
    sqrt_h = h.sqrt()
    f = drift(t0, y0)
    g = diffusion(t0, y0)
    support = y0 + (f * h if sde_type == "ito" else 0.0) + g * sqrt_h
    gdg = (diffusion(t0, support) - g) * v / (2 * sqrt_h)
    return y0 + f * h + g * dW + gdg


SDE_STEPPERS: dict[str, Callable[..., Tensor]] = {
    "euler": euler_maruyama, "milstein": milstein, "milstein_grad_free": milstein_grad_free,
}


def get_sde_stepper(name: str, sde_type: str = "ito") -> SDEStep:
    """The SDE step ``name`` (``euler``, ``milstein``, ``milstein_grad_free``) for ``sde_type``."""
    if name not in SDE_STEPPERS:
        raise ValueError(f'Unknown fixed-grid SDE method "{name}". Must be one of {sorted(SDE_STEPPERS)}.')
    if sde_type not in ("ito", "stratonovich"):
        raise ValueError(f'sde_type must be "ito" or "stratonovich", got "{sde_type}"')
    if name == "euler":
        if sde_type != "ito":
            raise ValueError('Euler-Maruyama solves Ito SDEs; use method="milstein" for sde_type="stratonovich"')
        return euler_maruyama
    return functools.partial(SDE_STEPPERS[name], sde_type=sde_type)
