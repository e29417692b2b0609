"""Damped fixed-point (Picard / Krasnosel'skii-Mann) iteration."""

from __future__ import annotations

from typing import Any, Callable

from torch import Tensor

from ._loop import Method, iterate
from ._result import SolverResult


class _Picard(Method):
    def __init__(self, damping: float):
        if not 0 < damping <= 1:
            raise ValueError(f"damping must be in (0, 1], got {damping}")
        self.damping = damping

    def key(self) -> tuple:
        return ("picard", self.damping)

    def step(self, z: Tensor, g: Tensor, it: Tensor) -> Tensor:
        return z + self.damping * g


def picard(f: Callable[[Any], Any], z0: Any, *, damping: float = 1.0, **options: Any) -> SolverResult:
    """Damped fixed-point iteration ``z <- z + damping * (f(z) - z)``.

    Converges when ``f`` is a contraction; ``damping < 1`` widens that to
    averaged (nonexpansive) maps. ``options`` are the shared ones of
    :func:`implicit.solvers.iterate` (``tol``, ``max_iter``, ``stop_mode``,
    ``check_every``, ``trace``, ``graph``, ``diverge_factor``).
    """
    return iterate(f, z0, _Picard(damping), **options)
