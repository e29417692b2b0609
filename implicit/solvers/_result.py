"""The one result type every solver returns, and the per-sample status codes."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = ["Status", "SolverResult", "NonConvergenceWarning", "NonFiniteError"]


class Status(enum.IntEnum):
    """Per-sample outcome of a solve. Each member carries its message."""

    CONVERGED = 0
    MAX_ITER = 1
    DIVERGED = 2
    NONFINITE = 3

    @property
    def message(self) -> str:
        return {
            Status.CONVERGED: "converged to tolerance",
            Status.MAX_ITER: "stopped at max_iter above tolerance",
            Status.DIVERGED: "residual grew past diverge_factor times its initial value",
            Status.NONFINITE: "a NaN or inf appeared in the iterate",
        }[self]


# Internal marker for samples still iterating; never left in a returned result.
RUNNING = -1


class NonConvergenceWarning(RuntimeWarning):
    """A solve stopped above its tolerance."""


class NonFiniteError(FloatingPointError):
    """A NaN or inf appeared in a solver iterate."""


@dataclass(frozen=True)
class SolverResult:
    """Solution and per-sample diagnostics of a batched solve.

    Attributes:
        z: the solution, same structure, shapes and dtype as ``z0`` (a tensor or a tuple).
        residual: ``(B,)`` absolute residual ``||f(z) - z||`` (or ``||F(z)||`` for roots) of ``z``.
        rel_residual: ``(B,)`` residual relative to ``||f(z)||`` (fixed points) or ``||F(z0)||`` /
            ``||b||`` (roots, linear systems).
        n_iter: ``(B,)`` iterations spent on each sample (function evaluations for fixed points).
        converged: ``(B,)`` bool, residual at or below tolerance in the chosen ``stop_mode``.
        status: ``(B,)`` int8 :class:`Status` codes.
        trace: optional ``(iterations, B)`` residual (in ``stop_mode``) after each iteration.
        stats: solver-specific extras (e.g. Krylov iteration counts).
    """

    z: Any
    residual: Tensor
    rel_residual: Tensor
    n_iter: Tensor
    converged: Tensor
    status: Tensor
    trace: Tensor | None = None
    stats: dict = field(default_factory=dict)

    @property
    def all_converged(self) -> bool:
        """True when every sample converged (syncs with the device)."""
        return bool(self.converged.all())

    def summary(self) -> str:
        """One line: worst residual, iteration range and a count per status."""
        counts = torch.bincount(self.status.long().cpu(), minlength=len(Status))
        parts = [f"{Status(i).name.lower()}={int(c)}" for i, c in enumerate(counts) if c > 0]
        return (
            f"residual max {self.residual.max().item():.3e} (rel {self.rel_residual.max().item():.3e}), "
            f"iterations {int(self.n_iter.min())}-{int(self.n_iter.max())}, " + ", ".join(parts)
        )
