"""Batched fixed-point, root and linear solvers sharing one result type.

Every fixed-point solver has the signature ``solver(f, z0, *, tol, max_iter,
stop_mode, check_every, trace, graph, diverge_factor, **method_options)`` and
returns a :class:`SolverResult`. ``SOLVERS`` names them; :func:`get_solver`
looks one up and :func:`register_solver` adds your own.
"""

from __future__ import annotations

from typing import Any, Callable

from ._loop import Method, iterate
from ._result import NonConvergenceWarning, NonFiniteError, SolverResult, Status
from .anderson import anderson
from .broyden import broyden
from .linear import cg, gmres
from .newton_krylov import newton_krylov
from .picard import picard
from .recurrence import RECURRENCE_METHODS, rollout, solve_recurrence
from .unroll import unroll

SOLVERS: dict[str, Callable[..., SolverResult]] = {
    "anderson": anderson,
    "broyden": broyden,
    "picard": picard,
}


def get_solver(name: str | Callable[..., SolverResult]) -> Callable[..., SolverResult]:
    """The fixed-point solver registered as ``name`` (a callable passes through)."""
    if callable(name):
        return name
    try:
        return SOLVERS[name]
    except KeyError:
        raise ValueError(f'Unknown solver "{name}". Must be one of {sorted(SOLVERS)}.') from None


def register_solver(name: str, solver: Callable[..., SolverResult]) -> None:
    """Make ``solver`` available as ``name`` to :func:`solve` and the DEQ layer."""
    if not callable(solver):
        raise TypeError(f"solver must be callable, got {type(solver).__name__}")
    SOLVERS[name] = solver


def solve(f: Callable[[Any], Any], z0: Any, solver: str = "anderson", **options: Any) -> SolverResult:
    """Solve ``z = f(z)`` from ``z0`` with the named solver."""
    return get_solver(solver)(f, z0, **options)


__all__ = [
    "SOLVERS", "Method", "NonConvergenceWarning", "NonFiniteError", "SolverResult", "Status",
    "anderson", "broyden", "cg", "get_solver", "gmres", "iterate", "newton_krylov", "picard",
    "register_solver", "solve", "unroll",
    "RECURRENCE_METHODS", "rollout", "solve_recurrence",
]
