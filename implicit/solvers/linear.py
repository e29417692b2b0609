"""Batched Krylov solvers for linear systems ``A x = b``: preconditioned CG and restarted GMRES.

Written by hand because no maintained PyTorch library solves a *batch* of
independent systems with per-sample convergence on the GPU without syncing
with the host every iteration (``torch.linalg`` is dense-only; scipy is CPU and
unbatched). Both return the package's :class:`SolverResult`, whose residual is
the true ``||b - A x||`` recomputed at the end.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from ._loop import check_options
from ._result import RUNNING, SolverResult, Status
from ._tree import Flattener, batch_dot, batch_norm

Operator = Callable[[Any], Any]


def _setup(A: Operator, b: Any, x0: Any, M: Operator | None):
    flat = Flattener(b)
    Af = flat.wrap(A)
    Mf = flat.wrap(M) if M is not None else (lambda v: v)
    bf = flat.flatten(b)
    x = flat.flatten(x0).clone() if x0 is not None else torch.zeros_like(bf)
    if x.shape != bf.shape:
        raise ValueError(f"x0 has shape {tuple(x.shape)} after flattening, b has {tuple(bf.shape)}")
    return flat, Af, Mf, bf, x


def _finish(flat, Af, bf, x, status, n_iter, trace, stats, r: Tensor | None = None) -> SolverResult:
    """Result with the true residual ``||b - A x||`` (``r``: that residual, when the caller has it)."""
    res = batch_norm(bf - Af(x) if r is None else r)
    rel = res / batch_norm(bf).clamp_min(torch.finfo(bf.dtype).tiny)
    status.masked_fill_(status == RUNNING, Status.MAX_ITER)
    return SolverResult(
        z=flat.unflatten(x),
        residual=res,
        rel_residual=rel,
        n_iter=n_iter,
        converged=status == Status.CONVERGED,
        status=status,
        trace=torch.stack(trace) if trace else None,
        stats=stats,
    )


def _update_status(status: Tensor, r: Tensor, tol: float) -> None:
    running = status == RUNNING
    new = torch.where(running & ~torch.isfinite(r), Status.NONFINITE, status)
    status.copy_(torch.where(running & torch.isfinite(r) & (r <= tol), Status.CONVERGED, new))


def cg(
    A: Operator,
    b: Any,
    *,
    x0: Any = None,
    M: Operator | None = None,
    tol: float = 1e-8,
    max_iter: int = 1000,
    stop_mode: str = "rel",
    check_every: int = 16,
    trace: bool = False,
) -> SolverResult:
    """Preconditioned conjugate gradients (Hestenes & Stiefel, 1952) on a batch of SPD systems.

    Args:
        A: batched symmetric positive definite operator, ``(B, ...) -> (B, ...)``.
        b: right-hand sides ``(B, ...)`` (or a tuple).
        x0: initial guess (zeros if ``None``).
        M: SPD preconditioner approximating ``A^{-1}``, same signature as ``A``.
        tol: tolerance on ``||b - A x||`` (``"abs"``) or on that over ``||b||`` (``"rel"``).
        max_iter: most iterations; check_every: iterations between host syncs.
        trace: record the per-sample residual (in ``stop_mode``) every iteration.
    """
    check_options(tol, max_iter, stop_mode, check_every)
    with torch.no_grad():
        flat, Af, Mf, bf, x = _setup(A, b, x0, M)
        B = bf.shape[0]
        scale = batch_norm(bf).clamp_min(torch.finfo(bf.dtype).tiny) if stop_mode == "rel" else 1.0
        r = bf - Af(x)
        zr = Mf(r)
        p = zr.clone()
        rz = batch_dot(r, zr)
        status = torch.full((B,), RUNNING, dtype=torch.int8, device=bf.device)
        n_iter = torch.zeros(B, dtype=torch.long, device=bf.device)
        _update_status(status, batch_norm(r) / scale, tol)
        traces: list[Tensor] = []
        for i in range(max_iter):
            if i % check_every == 0 and not bool((status == RUNNING).any()):
                break
            running = (status == RUNNING)[:, None]
            Ap = Af(p)
            pAp = batch_dot(p, Ap)
            alpha = torch.where(pAp != 0, rz / torch.where(pAp != 0, pAp, 1.0), 0.0)[:, None]
            x = torch.where(running, x + alpha * p, x)
            r = torch.where(running, r - alpha * Ap, r)
            n_iter += running[:, 0]
            rnorm = batch_norm(r) / scale
            _update_status(status, rnorm, tol)
            if trace:
                traces.append(rnorm)
            zr = Mf(r)
            rz_new = batch_dot(r, zr)
            beta = torch.where(rz != 0, rz_new / torch.where(rz != 0, rz, 1.0), 0.0)[:, None]
            p = zr + beta * p
            rz = rz_new
        return _finish(flat, Af, bf, x, status, n_iter, traces, {})


def _check_tol(tol: float | Tensor, B: int, like: Tensor) -> float | Tensor:
    """A scalar tolerance, or a per-sample ``(B,)`` tensor of positive tolerances."""
    if not torch.is_tensor(tol):
        if not tol > 0:
            raise ValueError(f"tol must be positive, got {tol}")
        return tol
    if tol.shape not in ((B,), ()) or not bool((tol > 0).all()):
        raise ValueError(f"tol must be positive, a number or a ({B},) tensor; got shape {tuple(tol.shape)}")
    return tol.to(device=like.device, dtype=like.dtype)


def _least_squares(H: Tensor, beta: Tensor, eps: float, tiny: float) -> tuple[Tensor, Tensor]:
    """``y = argmin ||beta e1 - H y||`` for ``H`` ``(B, j + 1, j)`` and that minimum, per sample.

    Regularised normal equations (a ridge of ``eps`` times the largest diagonal entry), which
    also cover a lucky breakdown (a zero column). The returned residual is the explicit
    ``||beta e1 - H y||`` of the ``y`` returned, so an inaccurate ``y`` can only make it larger.
    """
    j = H.shape[2]
    HtH = H.transpose(1, 2) @ H
    ridge = eps * torch.diagonal(HtH, dim1=1, dim2=2).amax(dim=1).clamp_min(tiny)
    HtH = HtH + ridge[:, None, None] * torch.eye(j, dtype=H.dtype, device=H.device)
    y = torch.linalg.solve_ex(HtH, beta[:, None, None] * H[:, 0, :, None])[0][..., 0]
    rhs = torch.zeros_like(H[:, :, 0])
    rhs[:, 0] = beta
    return y, batch_norm(rhs - (H @ y[:, :, None])[..., 0])


def gmres(
    A: Operator,
    b: Any,
    *,
    x0: Any = None,
    M: Operator | None = None,
    tol: float | Tensor = 1e-6,
    restart: int = 30,
    max_iter: int = 300,
    stop_mode: str = "rel",
    trace: bool = False,
    check_every: int = 4,
) -> SolverResult:
    """Restarted GMRES (Saad & Schultz, 1986) on a batch of general systems, stopping inside a cycle.

    Each cycle builds a ``restart``-dimensional Krylov basis with twice-repeated
    classical Gram-Schmidt (batched matrix products, no per-sample branching).
    After every Arnoldi step the small least-squares problem is solved for every
    sample on the device; its residual ``||beta e1 - H y||`` is the GMRES residual
    of that step. A sample whose residual is within tolerance freezes: its
    correction and iteration count are those of that step, and later basis
    vectors do not change it. The host looks every ``check_every`` Arnoldi steps
    (and at the end of a cycle) whether every running sample has frozen, and ends
    the cycle early if so. At the end of a cycle the true residual ``b - A x`` is
    recomputed; it (not the estimate) decides convergence and restarts.

    Args:
        A: batched linear operator ``(B, ...) -> (B, ...)``.
        b: right-hand sides. x0: initial guess (zeros if ``None``).
        M: right preconditioner (solve ``A M y = b``, ``x = M y``).
        tol: tolerance on ``||b - A x||`` (``"abs"``) or on that over ``||b||`` (``"rel"``);
            a number or a per-sample ``(B,)`` tensor.
        restart: Krylov dimension per cycle. max_iter: most matrix-vector products in
            the Arnoldi steps, in all (plus one per cycle for the true residual).
        trace: record the per-sample true residual at the start of every cycle and at the end.
        check_every: Arnoldi steps between host checks of whether every sample has frozen.

    Returns:
        A :class:`SolverResult`; ``n_iter`` counts each sample's Arnoldi steps up to
        its freeze, ``stats["matvecs"]`` the products with ``A`` done for the whole batch.
    """
    check_options(1.0, max_iter, stop_mode, check_every)
    if int(restart) != restart or restart < 1:
        raise ValueError(f"restart must be a positive integer, got {restart}")
    with torch.no_grad():
        flat, Af, Mf, bf, x = _setup(A, b, x0, M)
        B, n = bf.shape
        tol = _check_tol(tol, B, bf)
        tiny = torch.finfo(bf.dtype).tiny
        eps = torch.finfo(bf.dtype).eps
        scale = batch_norm(bf).clamp_min(tiny) if stop_mode == "rel" else torch.ones(B, dtype=bf.dtype, device=bf.device)
        threshold = tol * scale  # on the absolute residual
        status = torch.full((B,), RUNNING, dtype=torch.int8, device=bf.device)
        n_iter = torch.zeros(B, dtype=torch.long, device=bf.device)
        traces: list[Tensor] = []
        done = 0
        matvecs = 0
        if x0 is None:
            r = bf.clone()
        else:
            r = bf - Af(x)
            matvecs += 1
        while True:
            beta = batch_norm(r)
            _update_status(status, beta / scale, tol)
            if trace:
                traces.append(beta / scale)
            if done >= max_iter or not bool((status == RUNNING).any()):
                break
            running = status == RUNNING
            k = min(restart, max_iter - done)
            V = bf.new_zeros(B, k + 1, n)
            H = bf.new_zeros(B, k + 1, k)
            Y = bf.new_zeros(B, k)  # each sample's correction coefficients, fixed when it freezes
            used = torch.zeros(B, dtype=torch.long, device=bf.device)
            frozen = ~running
            V[:, 0] = r / beta.clamp_min(tiny)[:, None]
            steps = 0
            for j in range(k):
                w = Af(Mf(V[:, j]))
                matvecs += 1
                h = torch.zeros(B, j + 1, dtype=bf.dtype, device=bf.device)
                for _ in range(2):  # CGS2: Gram-Schmidt twice for orthogonality in float32
                    c = torch.bmm(V[:, : j + 1], w[:, :, None])[..., 0]
                    w = w - torch.bmm(c[:, None, :], V[:, : j + 1])[:, 0]
                    h = h + c
                hn = batch_norm(w)
                H[:, : j + 1, j] = h
                H[:, j + 1, j] = hn
                ok = hn > eps * h.norm(dim=1).clamp_min(tiny)
                V[:, j + 1] = torch.where(ok[:, None], w / torch.where(ok, hn, 1.0)[:, None], 0.0)
                steps = j + 1
                y, est = _least_squares(H[:, : j + 2, : j + 1], beta, eps, tiny)
                take = ~frozen & ((est <= threshold) | (j == k - 1))
                Y[:, : j + 1] = torch.where(take[:, None], y, Y[:, : j + 1])
                used = torch.where(take, j + 1, used)
                frozen = frozen | take
                if j < k - 1 and (j + 1) % check_every == 0 and bool(frozen.all()):
                    break
            # samples still unfrozen after an early exit take the last step's solution
            Y[:, :steps] = torch.where(frozen[:, None], Y[:, :steps], y)
            used = torch.where(frozen, used, steps)
            dx = Mf(torch.bmm(Y[:, None, :steps], V[:, :steps])[:, 0])
            x = torch.where(running[:, None], x + dx, x)
            n_iter += running * used
            done += steps
            r = bf - Af(x)
            matvecs += 1
        return _finish(flat, Af, bf, x, status, n_iter, traces, {"matvecs": matvecs}, r=r)
