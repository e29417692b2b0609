"""Inexact Newton-Krylov for batched roots ``F(z) = 0``, matrix-free."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from ._loop import check_options
from ._result import RUNNING, SolverResult, Status
from ._tree import Flattener, batch_norm
from .linear import gmres

FORCING_MODES = ("constant", "eisenstat-walker")


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
    linearize: Callable[[Any], Callable[[Any], Any]] | None = None,
    forcing_mode: str = "constant",
    forcing_max: float = 0.5,
    measure: Callable[[Any, Any], Tensor] | None = None,
    krylov_check_every: int = 2,
) -> SolverResult:
    """Newton's method with GMRES inner solves and a backtracking line search.

    Each Newton step solves ``J d = -F(z)`` to a relative tolerance ``eta``
    (inexact Newton, Dembo-Eisenstat-Steihaug) with :func:`gmres`, where
    ``J v`` is a forward-mode JVP (:func:`torch.func.jvp`) or the caller's
    ``linearize``, so no Jacobian is formed. ``eta`` is ``forcing`` throughout
    (``forcing_mode="constant"``) or, per sample, Eisenstat & Walker's (1996)
    choice 2: ``eta_k = 0.9 (||F_k|| / ||F_{k-1}||)^2`` with their safeguard,
    between ``forcing`` and ``forcing_max``, starting at ``forcing_max``, and
    never tighter than the last step needs (half the reduction still missing
    to ``tol``). The step is halved per sample until the Armijo condition
    ``||F(z + a d)|| <= (1 - 1e-4 a) ||F(z)||`` holds.

    The host syncs once per Newton step (and per backtrack, only when some
    sample needs one), plus GMRES's checks every ``krylov_check_every`` products.

    Args:
        F: batched residual, ``(B, ...) -> (B, ...)``, differentiable by ``torch.func``.
        z0: initial guess. tol: tolerance on ``||F(z)||`` (``"abs"``) or on
            ``||F(z)|| / ||F(z0)||`` (``"rel"``). max_iter: most Newton steps.
        krylov_dim: GMRES restart length. krylov_max_iter: most JVPs per Newton step.
        forcing: relative tolerance of each linear solve (the smallest one, with
            ``forcing_mode="eisenstat-walker"``).
        line_search: backtrack (``True``) or always take the full step.
        trace: record the per-sample residual (the one judged against ``tol``) after every Newton step.
        linearize: optional ``linearize(z)`` returning the Jacobian-vector product
            ``v -> F'(z) v`` at ``z`` (same structure as ``z0``); it replaces the
            forward-mode JVP, and may precompute what all products at ``z`` share.
        forcing_mode: ``"constant"`` or ``"eisenstat-walker"``. forcing_max: the
            loosest linear tolerance of the adaptive mode (and its first one).
        measure: optional ``measure(z, F(z)) -> (B,)`` residual judged against ``tol``
            instead of ``||F(z)||`` (e.g. the unpreconditioned residual when ``F`` is
            a preconditioned form); Newton steps and line search still use ``||F||``.
        krylov_check_every: GMRES's ``check_every``.

    Returns:
        A :class:`SolverResult` whose residuals are those judged against ``tol``;
        ``stats["krylov_iters"]`` holds the JVPs per sample.
    """
    check_options(tol, max_iter, stop_mode, krylov_check_every)
    if forcing_mode not in FORCING_MODES:
        raise ValueError(f'forcing_mode must be one of {FORCING_MODES}, got "{forcing_mode}"')
    if not 0 < forcing <= forcing_max < 1:
        raise ValueError(f"need 0 < forcing <= forcing_max < 1, got forcing={forcing}, forcing_max={forcing_max}")
    flat = Flattener(z0)
    Ff = flat.wrap(F)
    adaptive = forcing_mode == "eisenstat-walker"
    with torch.no_grad():
        z = flat.flatten(z0).clone()
        B = z.shape[0]
        tiny = torch.finfo(z.dtype).tiny

        def judged(z: Tensor, Fz: Tensor, norm: Tensor) -> Tensor:
            return norm if measure is None else measure(flat.unflatten(z), flat.unflatten(Fz)).to(norm)

        Fz = Ff(z)
        res = batch_norm(Fz)
        m = judged(z, Fz, res)
        m0 = m.clamp_min(tiny)
        scale = m0 if stop_mode == "rel" else torch.ones_like(m)
        status = torch.full((B,), RUNNING, dtype=torch.int8, device=z.device)
        n_iter = torch.zeros(B, dtype=torch.long, device=z.device)
        krylov_iters = torch.zeros(B, dtype=torch.long, device=z.device)
        eta = torch.full((B,), forcing_max if adaptive else forcing, dtype=z.dtype, device=z.device)
        traces: list[Tensor] = []

        def update_status() -> None:
            r = m / scale
            running = status == RUNNING
            new = torch.where(running & ~torch.isfinite(r), Status.NONFINITE, status)
            status.copy_(torch.where(running & torch.isfinite(r) & (r <= tol), Status.CONVERGED, new))

        update_status()
        for _ in range(max_iter):
            if not bool((status == RUNNING).any()):
                break
            running = status == RUNNING
            zc = z
            if linearize is not None:
                jvp = flat.wrap(linearize(flat.unflatten(zc)))
            else:
                def jvp(v: Tensor) -> Tensor:
                    return torch.func.jvp(Ff, (zc,), (v,))[1]

            if adaptive:  # do not solve tighter than the remaining reduction to tol needs
                eta_k = torch.maximum(eta, 0.5 * tol * scale / m.clamp_min(tiny)).clamp(forcing, forcing_max)
                eta_k = torch.where(torch.isfinite(eta_k), eta_k, forcing_max)
            else:
                eta_k = eta
            lin = gmres(
                jvp, -Fz, tol=eta_k, restart=krylov_dim,
                max_iter=krylov_max_iter or krylov_dim, stop_mode="rel", check_every=krylov_check_every,
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
            if adaptive:  # Eisenstat-Walker choice 2 (gamma 0.9, alpha 2) with their safeguard
                ratio = res_new / res.clamp_min(tiny)
                new_eta = 0.9 * ratio**2
                guard = 0.9 * eta**2
                new_eta = torch.where(guard > 0.1, torch.maximum(new_eta, guard), new_eta)
                eta = torch.where(running, new_eta.clamp(forcing, forcing_max), eta)
            z = torch.where(running[:, None], z_new, z)
            Fz = torch.where(running[:, None], F_new, Fz)
            res = torch.where(running, res_new, res)
            m = torch.where(running, judged(z, Fz, res), m)
            n_iter += running
            update_status()
            if trace:
                traces.append(m / scale)
        status.masked_fill_(status == RUNNING, Status.MAX_ITER)
        return SolverResult(
            z=flat.unflatten(z),
            residual=m,
            rel_residual=m / m0,
            n_iter=n_iter,
            converged=status == Status.CONVERGED,
            status=status,
            trace=torch.stack(traces) if traces else None,
            stats={"krylov_iters": krylov_iters},
        )
