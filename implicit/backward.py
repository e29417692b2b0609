"""Gradients through a fixed point, as swappable strategies.

Each strategy takes ``f`` (the layer on flat ``(B, n)`` states, built with
autograd enabled so gradients reach its parameters and injected input) and the
solver's detached solution ``z_star``, and returns a tensor whose value is
(close to) ``z_star`` and whose backward pass is the strategy's gradient:

- ``ift``: exact implicit differentiation. The upstream gradient ``g`` is
  replaced by the solution of the adjoint fixed point ``u = J^T u + g``
  (``J = df/dz`` at ``z_star``), solved by the same backend solvers.
- ``phantom``: ``steps`` damped iterations ``z <- (1 - damping) z + damping f(z)``
  from ``z_star`` (Geng et al., 2021).
- ``jfb``: one step ``f(z_star)``, Jacobian-free backprop (Fung et al., 2022).
- ``unrolled``: ``steps`` plain iterations from ``z_star``, backprop through all
  of them (truncated backprop through the last iterations).
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
from torch import Tensor

from .solvers import NonConvergenceWarning, SolverResult, get_solver

FlatFn = Callable[[Tensor], Tensor]


def ift(
    f: FlatFn,
    z_star: Tensor,
    *,
    solver: str = "anderson",
    tol: float = 1e-6,
    max_iter: int = 60,
    stop_mode: str = "rel",
    on_result: Callable[[SolverResult], None] | None = None,
    **solver_options: Any,
) -> Tensor:
    """Exact implicit gradient: solve ``u = J^T u + g`` in the backward pass.

    ``on_result`` receives the adjoint solve's :class:`SolverResult` (for
    diagnostics); by default a non-converged adjoint warns.
    """
    z_in = z_star.detach().requires_grad_()
    z_out = f(z_in)
    if not z_out.requires_grad:
        return z_out
    solve = get_solver(solver)

    def hook(grad: Tensor | None) -> Tensor | None:
        if grad is None:
            return grad

        def adjoint(u: Tensor) -> Tensor:
            return torch.autograd.grad(z_out, z_in, u, retain_graph=True)[0] + grad

        result = solve(adjoint, grad, tol=tol, max_iter=max_iter, stop_mode=stop_mode, **solver_options)
        if on_result is not None:
            on_result(result)
        elif not result.all_converged:
            warnings.warn(f"implicit backward: adjoint solve did not converge ({result.summary()})",
                          NonConvergenceWarning, stacklevel=2)
        return result.z

    # The hook goes on a copy: a hook on z_out that refers to z_out would be a reference cycle, and the
    # graph of f (GPU memory) would wait for Python's cyclic collector instead of being freed at once.
    # The VJPs above flow through z_out only, so they do not re-enter the hook either.
    z = z_out.clone()
    z.register_hook(hook)
    return z


def phantom(f: FlatFn, z_star: Tensor, *, steps: int = 1, damping: float = 0.5, **_: Any) -> Tensor:
    """Phantom gradient: backprop through ``steps`` damped iterations from ``z_star``."""
    if steps < 1 or not 0 < damping <= 1:
        raise ValueError(f"phantom needs steps >= 1 and damping in (0, 1], got {steps}, {damping}")
    z = z_star.detach()
    for _ in range(steps):
        z = (1 - damping) * z + damping * f(z)
    return z


def jfb(f: FlatFn, z_star: Tensor, **_: Any) -> Tensor:
    """Jacobian-free backprop: the gradient of one application ``f(z_star)``."""
    return f(z_star.detach())


def unrolled(f: FlatFn, z_star: Tensor, *, steps: int = 5, **_: Any) -> Tensor:
    """Backprop through ``steps`` undamped iterations started at ``z_star``."""
    if steps < 1:
        raise ValueError(f"unrolled needs steps >= 1, got {steps}")
    z = z_star.detach()
    for _ in range(steps):
        z = f(z)
    return z


BACKWARDS: dict[str, Callable[..., Tensor]] = {"ift": ift, "phantom": phantom, "jfb": jfb, "unrolled": unrolled}


def get_backward(name: str | Callable[..., Tensor]) -> Callable[..., Tensor]:
    """The backward strategy registered as ``name`` (a callable passes through)."""
    if callable(name):
        return name
    try:
        return BACKWARDS[name]
    except KeyError:
        raise ValueError(f'Unknown backward "{name}". Must be one of {sorted(BACKWARDS)}.') from None
