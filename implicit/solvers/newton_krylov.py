"""Inexact Newton-Krylov for batched roots ``F(z) = 0``, matrix-free."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from ._loop import check_options
from ._result import RUNNING, SolverResult, Status
from ._tree import Flattener, batch_norm
from .linear import gmres


def newton_krylov(
    F: Callable[[Any], Any],
    z0: Any,
    *,
    tol: float = 1e-6,
    max_iter: int = 50,
    stop_mode: str = "rel",
    krylov_dim: int = 30,
    krylov_max_iter: int | None = None,
    forcing: float = 1e-2,
    line_search: bool = True,
    max_backtracks: int = 8,
    trace: bool = False,
) -> SolverResult:
    """Newton's method with GMRES inner solves and a backtracking line search.

    Each Newton step solves ``J d = -F(z)`` to relative tolerance ``forcing``
    (inexact Newton, Dembo-Eisenstat-Steihaug) with :func:`gmres`, where
    ``J v`` is a forward-mode JVP (:func:`torch.func.jvp`) so no Jacobian is
    formed. The step is halved per sample until the Armijo condition
    ``||F(z + a d)|| <= (1 - 1e-4 a) ||F(z)||`` holds.

    The host syncs once per Newton step (and per backtrack, only when some
    sample needs one); each Newton step costs tens of evaluations of ``F``.

    Args:
        F: batched residual, ``(B, ...) -> (B, ...)``, differentiable by ``torch.func``.
        z0: initial guess. tol: tolerance on ``||F(z)||`` (``"abs"``) or on
            ``||F(z)|| / ||F(z0)||`` (``"rel"``). max_iter: most Newton steps.
        krylov_dim: GMRES restart length. krylov_max_iter: most JVPs per Newton step.
        forcing: relative tolerance of each linear solve.
        line_search: backtrack (``True``) or always take the full step.
        trace: record the per-sample residual after every Newton step.

    Returns:
        A :class:`SolverResult`; ``stats["krylov_iters"]`` holds the JVPs per sample.
    """
    check_options(tol, max_iter, stop_mode, 1)
    flat = Flattener(z0)
    Ff = flat.wrap(F)
    with torch.no_grad():
        z = flat.flatten(z0).clone()
        B = z.shape[0]
        tiny = torch.finfo(z.dtype).tiny
        Fz = Ff(z)
        res = batch_norm(Fz)
        res0 = res.clamp_min(tiny)
        scale = res0 if stop_mode == "rel" else torch.ones_like(res)
        status = torch.full((B,), RUNNING, dtype=torch.int8, device=z.device)
        n_iter = torch.zeros(B, dtype=torch.long, device=z.device)
        krylov_iters = torch.zeros(B, dtype=torch.long, device=z.device)
        traces: list[Tensor] = []

        def update_status() -> None:
            r = res / scale
            running = status == RUNNING
            new = torch.where(running & ~torch.isfinite(r), Status.NONFINITE, status)
            status.copy_(torch.where(running & torch.isfinite(r) & (r <= tol), Status.CONVERGED, new))

        update_status()
        for _ in range(max_iter):
            if not bool((status == RUNNING).any()):
                break
            running = status == RUNNING
            zc = z

            def jvp(v: Tensor) -> Tensor:
                return torch.func.jvp(Ff, (zc,), (v,))[1]

            lin = gmres(
                jvp, -Fz, tol=forcing, restart=krylov_dim,
                max_iter=krylov_max_iter or krylov_dim, stop_mode="rel",
            )
            d = lin.z
            krylov_iters += running * lin.n_iter
            alpha = torch.ones(B, 1, dtype=z.dtype, device=z.device)
            z_new, F_new = z + d, Ff(z + d)
            res_new = batch_norm(F_new)
            if line_search:
                ok = res_new <= (1 - 1e-4 * alpha[:, 0]) * res
                for _ in range(max_backtracks):
                    if bool((ok | ~running).all()):
                        break
                    alpha = torch.where(ok[:, None], alpha, alpha / 2)
                    z_try = z + alpha * d
                    F_try = Ff(z_try)
                    res_try = batch_norm(F_try)
                    take = ~ok & (res_try < res_new)
                    z_new = torch.where(take[:, None], z_try, z_new)
                    F_new = torch.where(take[:, None], F_try, F_new)
                    res_new = torch.where(take, res_try, res_new)
                    ok = ok | (res_try <= (1 - 1e-4 * alpha[:, 0]) * res)
            z = torch.where(running[:, None], z_new, z)
            Fz = torch.where(running[:, None], F_new, Fz)
            res = torch.where(running, res_new, res)
            n_iter += running
            update_status()
            if trace:
                traces.append(res / scale)
        status.masked_fill_(status == RUNNING, Status.MAX_ITER)
        return SolverResult(
            z=flat.unflatten(z),
            residual=res,
            rel_residual=res / res0,
            n_iter=n_iter,
            converged=status == Status.CONVERGED,
            status=status,
            trace=torch.stack(traces) if traces else None,
            stats={"krylov_iters": krylov_iters},
        )
