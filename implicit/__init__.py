"""Implicit models for scientific machine learning on one batched root-finding backend."""

from .solvers import (
    SOLVERS as SOLVERS,
    NonConvergenceWarning as NonConvergenceWarning,
    NonFiniteError as NonFiniteError,
    SolverResult as SolverResult,
    Status as Status,
    get_solver as get_solver,
    register_solver as register_solver,
    solve as solve,
)

__version__ = "0.1.0"
