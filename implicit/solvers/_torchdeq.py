"""Our solvers under torchdeq's solver interface, so ``torchdeq.get_deq`` models can use them."""

from __future__ import annotations

from typing import Any, Callable

from ._result import SolverResult

NAMES = {"implicit_anderson": "anderson", "implicit_broyden": "broyden", "implicit_picard": "picard"}
# torchdeq option names that mean something to our solvers; the rest are torchdeq-internal.
_RENAME = {"tau": "damping", "m": "m", "lam": "lam", "beta": "beta"}


def as_torchdeq_solver(solver: Callable[..., SolverResult], accepts: set[str]) -> Callable:
    """Wrap ``solver`` to return torchdeq's ``(z, trajectory, SolverStat)``."""
    from torchdeq.solver.stat import SolverStat

    def run(func, x0, max_iter=50, tol=1e-3, stop_mode="abs", indexing=None, **kwargs: Any):
        options = {_RENAME[k]: v for k, v in kwargs.items() if k in _RENAME and _RENAME[k] in accepts}
        result = solver(func, x0, max_iter=max_iter, tol=tol, stop_mode=stop_mode, trace=True, **options)
        rel = result.trace.T if stop_mode == "rel" else result.rel_residual[:, None]
        absolute = result.trace.T if stop_mode == "abs" else result.residual[:, None]
        info = SolverStat(
            abs_lowest=result.residual, rel_lowest=result.rel_residual, nstep=result.n_iter.float(),
            abs_trace=absolute, rel_trace=rel,
        )
        return result.z, ([result.z] if indexing else []), info

    run.__name__ = f"torchdeq_{solver.__name__}"
    return run


def register_with_torchdeq() -> list[str]:
    """Register ``implicit_anderson``, ``implicit_broyden``, ``implicit_picard`` with torchdeq."""
    from torchdeq.solver import register_solver

    from . import SOLVERS

    accepts = {"anderson": {"m", "lam", "beta"}, "broyden": {"m"}, "picard": {"damping"}}
    for name, ours in NAMES.items():
        register_solver(name, as_torchdeq_solver(SOLVERS[ours], accepts[ours]))
    return sorted(NAMES)
