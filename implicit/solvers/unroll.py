"""A fixed number of plain iterations with autograd through every one: the unrolled forward.

Weight-tied recurrent nets (IFNO, DT-net-style recurrent baselines), GET's unrolled training and
fixed-iteration sampling, FNO-DEQ's warm-up and the progressive loss's last ``k`` steps all apply
a map exactly ``K`` times and backpropagate through the chain. That is an architecture, not a
solver: no tolerance ends it early, and it keeps the last iterate rather than the lowest-residual
one. It lives here, with the solvers, so that no model family carries its own loop, and it
returns a :class:`SolverResult` so analysis tools treat unrolled and equilibrium models alike.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from ._result import SolverResult, Status


def unroll(f: Callable[[Tensor], Tensor], z0: Tensor, *, max_iter: int, tol: float | None = None,
           iterates: bool = False, checkpoint: bool = False, **_: Any) -> SolverResult:
    """``z_k = f(z_{k-1})`` for ``k = 1..max_iter`` from ``z0`` (B, ...), differentiable throughout.

    Args:
        f: the map, batch-first.
        z0: the initial state.
        max_iter: ``K``, the number of applications of ``f`` (at least 1).
        tol: relative residual at or below which a sample is marked ``CONVERGED`` (``None``: every
            sample is ``MAX_ITER``); it never stops the loop.
        iterates: keep ``z_1, ..., z_K`` in ``result.stats["iterates"]`` (a list, with graphs).
        checkpoint: under autograd, keep only each iterate for the backward and recompute ``f``'s
            activations there (``torch.utils.checkpoint``, non-reentrant): the same gradient, memory that
            grows by one state per iteration instead of one pass of ``f``'s activations, at about one more
            forward of ``f`` per iteration.

    Returns:
        A :class:`SolverResult` with ``z = z_K`` and the last step's residual ``||z_K - z_{K-1}||``
        (absolute and relative to ``||z_K||``), per sample, in float32 or wider; a sample whose
        ``z_K`` holds NaN or inf has status ``NONFINITE``. Other solver
        options (``stop_mode``, ``check_every``, ...) are accepted and ignored, so ``unroll`` can
        stand wherever a solver is expected.
    """
    if int(max_iter) != max_iter or max_iter < 1:
        raise ValueError(f"unroll needs max_iter >= 1 applications of f, got {max_iter!r}")
    step = f
    if checkpoint and torch.is_grad_enabled():
        from torch.utils.checkpoint import checkpoint as recompute

        def step(z: Tensor) -> Tensor:
            return recompute(f, z, use_reentrant=False)
    z, kept = z0, []
    for _ in range(int(max_iter)):
        prev, z = z, step(z)
        if iterates:
            kept.append(z)
    with torch.no_grad():
        wide = torch.promote_types(z.dtype, torch.float32)
        residual = torch.linalg.vector_norm((z - prev).flatten(1).to(wide), dim=1)
        rel = residual / (torch.linalg.vector_norm(z.flatten(1).to(wide), dim=1) + torch.finfo(wide).tiny)
        finite = torch.isfinite(z.flatten(1)).all(1)
        converged = rel <= tol if tol is not None else torch.zeros_like(rel, dtype=torch.bool)
        status = torch.where(converged, int(Status.CONVERGED), int(Status.MAX_ITER))
        status = torch.where(finite, status, int(Status.NONFINITE)).to(torch.int8)
        n_iter = torch.full_like(residual, int(max_iter), dtype=torch.long)
    stats = {"iterates": kept} if iterates else {}
    return SolverResult(z=z, residual=residual, rel_residual=rel, n_iter=n_iter, converged=converged,
                        status=status, stats=stats)
