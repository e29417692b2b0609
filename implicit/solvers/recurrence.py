"""Parallel-in-time solution of a recurrence ``x_{k+1} = step(x_k, k)`` as one fixed point.

Given ``x_0`` and ``K`` steps, the whole trajectory ``X = (x_1, ..., x_K)`` solves
``X = T(X)`` with ``T(X)_k = step(x_{k-1}, k-1)``: one evaluation of ``T`` applies
``step`` to all ``K`` states at once (one batched model call, chunked to a memory
budget), so the ``K`` sequential calls become a few parallel rounds. This is the
view of DEQ-DDIM (Pokle et al., arXiv 2210.12867), ParaDiGMS (Shih et al., arXiv
2305.16317) and ParaTAA (Tang et al., arXiv 2402.09970). The methods:

- ``"picard"``: Jacobi sweeps ``X <- T(X)``. Because ``T`` is lower triangular in
  time, sweep ``j`` makes the first ``j`` states exact: at most ``K`` sweeps.
- ``"anderson"``: Anderson acceleration on the stacked trajectory (DEQ-DDIM, and in
  spirit ParaTAA).
- ``"newton"``: Newton on the trajectory with the block-bidiagonal linear step solved
  by a parallel scan (DEER; :mod:`implicit.solvers.newton_recurrence`): a handful of
  rounds for smooth dynamics, at the cost of ``d x d`` Jacobians per step.
- ``"window"``: ParaDiGMS's sliding window: each round applies ``step`` to ``window``
  states from the first non-final one; states whose input moved by at most ``tol``
  are final and the window slides past them; states entering the window start from
  the newest computed state. ``tol_scale`` gives each state its own tolerance
  (ParaDiGMS compares state ``k``'s change with ``tol`` times the noise scale of step
  ``k``; the caller, who knows the schedule, passes that scale). ``compact=True`` runs
  the rounds on window-sized buffers instead of the whole trajectory, optionally
  replayed from a CUDA graph (:mod:`implicit.solvers._window`).

All of them run in the shared loop :func:`implicit.solvers.iterate` (so they get its
per-sample statuses, NaN detection, sync-every-k and CUDA-graph capture), except the
compact window, which has its own small driver with the same statuses; the shared-loop
window sets the loop's ``Method.finished`` flag, because a small change inside the
window does not mean the states beyond it are done. When ``step(x, k) = a_k x + r(x, k)``
with a known ``a_k`` (``linear=``), every method iterates the anchored form instead,
each state written from ``x_0`` and the ``r`` of earlier states; near-identity steps
(DDIM, Euler) then converge in a few rounds instead of about ``K``. Gradients through the
solution use :mod:`implicit.backward` on the full map ``T``: exact implicit
differentiation (``"ift"``; the adjoint of a triangular ``T`` is exact in ``K``
Picard sweeps), ``"phantom"``, ``"jfb"`` or ``"unrolled"``.

The neural ODE/SDE trajectories and the DDIM chain both call :func:`solve_recurrence`.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any, Callable

import torch
from torch import Tensor

from .._weak import weak_callable
from ._loop import Method, check_options, iterate
from ._result import SolverResult
from .anderson import _Anderson
from .picard import _Picard

__all__ = ["RECURRENCE_METHODS", "rollout", "solve_recurrence"]

RECURRENCE_METHODS = ("picard", "anderson", "window", "newton")

Step = Callable[..., Tensor]


def _call_step(step: Step, x: Tensor, k: Tensor, u: Tensor | None, chunk: int | None) -> Tensor:
    """``step`` on rows ``x`` (N, ...) at step indices ``k`` (N,), at most ``chunk`` rows per call."""
    n = x.shape[0]
    if chunk is None or chunk >= n:
        return step(x, k) if u is None else step(x, k, u)
    outs = []
    for a in range(0, n, chunk):
        b = min(a + chunk, n)
        outs.append(step(x[a:b], k[a:b]) if u is None else step(x[a:b], k[a:b], u[a:b]))
    if isinstance(outs[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*outs))
    return torch.cat(outs)


def _split(res, prev: Tensor, linear) -> tuple[Tensor, Tensor]:
    """``(out, a)`` as (N, n): the step output and its linear coefficient per element."""
    N = prev.shape[0]
    if isinstance(linear, str):  # step returned (x_next, a), a broadcastable to x
        out, a = res
        return out.reshape(N, -1), a.expand_as(out).reshape(N, -1)
    return res.reshape(N, -1), linear.reshape(N, 1).expand(N, prev[0].numel())


def scaled_scan(a: Tensor, r: Tensor, y0: Tensor) -> Tensor:
    """All of ``y_{j+1} = a_j y_j + r_j`` for ``j < L`` at once: (B, L, n) from ``a`` (B, L, n), ``r`` (B, L, n), ``y0`` (B, n).

    A Hillis-Steele scan over composed elementwise affine maps: ``log2(L)`` passes, exact
    for any ``a`` (zeros included), no host syncs.
    """
    A, R = a, r
    offset, L = 1, r.shape[1]
    while offset < L:
        R = torch.cat([R[:, :offset], A[:, offset:] * R[:, :-offset] + R[:, offset:]], dim=1)
        A = torch.cat([A[:, :offset], A[:, offset:] * A[:, :-offset]], dim=1)
        offset *= 2
    return A * y0[:, None] + R


class _TrajectoryMap:
    """The trajectory map on ``X`` of shape (B, K, ...).

    Without ``linear``: ``T(X) = [step(x_0, 0), step(x_1, 1), ..., step(x_{K-1}, K-1)]``.
    With ``linear`` coefficients ``a`` (B, K): the anchored form ``T(X) = scan(a, r(X))``
    with ``r_k = step(x_k, k) - a_k x_k``, the same fixed point, every state tied to ``x_0``.
    """

    def __init__(self, step: Step, x0: Tensor, inputs: Tensor | None, K: int, chunk: int | None,
                 linear: Tensor | None = None):
        self.step, self.x0, self.inputs, self.K, self.chunk, self.linear = step, x0, inputs, K, chunk, linear
        B = x0.shape[0]
        self.k = torch.arange(K, device=x0.device).repeat(B)  # row b*K + k is step k of sample b

    def __call__(self, X: Tensor) -> Tensor:
        B, K, S = X.shape[0], self.K, X.shape[2:]
        prev = torch.cat([self.x0[:, None], X[:, :-1]], dim=1).reshape(B * K, *S)
        u = None if self.inputs is None else self.inputs.reshape(B * K, *self.inputs.shape[2:])
        res = _call_step(self.step, prev, self.k, u, self.chunk)
        if self.linear is None:
            return res.reshape(B, K, *S)
        out, a = _split(res, prev, self.linear)
        r = (out - a * prev.reshape(B * K, -1)).reshape(B, K, -1)
        return scaled_scan(a.reshape(B, K, -1), r, self.x0.reshape(B, -1)).reshape(B, K, *S)


class _WindowMap(_TrajectoryMap):
    """``T`` applied only inside each sample's window ``[s, s + w)``; other states pass through."""

    def __init__(self, step, x0, inputs, K, chunk, method: "_Window", linear=None):
        super().__init__(step, x0, inputs, K, chunk, linear)
        self.method = method
        self.offsets = torch.arange(method.w, device=x0.device)
        self.rows = torch.arange(x0.shape[0], device=x0.device)[:, None]

    def __call__(self, X: Tensor) -> Tensor:
        B, K, S, w = X.shape[0], self.K, X.shape[2:], self.method.w
        idx = self.method.s[:, None] + self.offsets  # (B, w): step indices, i.e. input positions
        valid = idx < K
        idxc = idx.clamp(max=K - 1)
        full = torch.cat([self.x0[:, None], X], dim=1)  # position p holds x_p
        prev = full[self.rows, idxc].reshape(B * w, *S)
        u = None if self.inputs is None else self.inputs[self.rows, idxc].reshape(B * w, *self.inputs.shape[2:])
        res = _call_step(self.step, prev, idxc.reshape(-1), u, self.chunk)
        if self.linear is None:
            out = res.reshape(B, w, *S)
        else:  # anchored to the window's first input, which is final
            lin = self.linear if isinstance(self.linear, str) else self.linear[self.rows, idxc]
            o, a = _split(res, prev, lin)
            r = (o - a * prev.reshape(B * w, -1)).reshape(B, w, -1)
            y0 = full[self.rows[:, 0], idxc[:, 0]].reshape(B, -1)
            out = scaled_scan(a.reshape(B, w, -1), r, y0).reshape(B, w, *S)
        buf = torch.cat([X, X[:, :1]], dim=1)  # slot K is scratch for rows outside the trajectory
        buf[self.rows, torch.where(valid, idx, K)] = out
        return buf[:, :K]


class _Window(Method):
    """Sliding-window Picard (ParaDiGMS): advance each sample's window past its final states."""

    def __init__(self, w: int, K: int, tol: Tensor, rel: bool, fill: bool):
        self.w, self.K, self.tol, self.rel, self.fill = w, K, tol.clone(), rel, fill  # tol: (B, K), one per state

    def key(self) -> tuple:
        return ("window", self.w, self.K, self.rel, self.fill)

    def init(self, z: Tensor) -> None:
        B, dev = z.shape[0], z.device
        self.s = torch.zeros(B, device=dev, dtype=torch.long)  # states x_1..x_s are final
        self.frontier = torch.zeros(B, device=dev, dtype=torch.long)  # states from here on never computed
        self.finished = torch.zeros(B, device=dev, dtype=torch.bool)
        self.offsets = torch.arange(self.w, device=dev)
        self.rows = torch.arange(B, device=dev)[:, None]

    def reset(self) -> None:
        self.s.zero_()
        self.frontier.zero_()
        self.finished.zero_()

    def step(self, z: Tensor, g: Tensor, it: Tensor) -> Tensor:
        B, K, w = z.shape[0], self.K, self.w
        new = (z + g).view(B, K, -1)
        idx = self.s[:, None] + self.offsets
        valid = idx < K
        idxc = idx.clamp(max=K - 1)
        err = torch.linalg.vector_norm(g.view(B, K, -1)[self.rows, idxc], dim=2)
        if self.rel:
            err = err / (torch.linalg.vector_norm(new[self.rows, idxc], dim=2) + torch.finfo(z.dtype).tiny)
        bad = valid & ~(err <= self.tol[self.rows, idxc])  # a NaN counts as not converged
        # Output j is final when its input (output j-1 of the last round) moved by <= tol.
        stride = torch.where(bad.any(1), bad.int().argmax(1) + 1, w)
        s_new = torch.clamp(self.s + stride, max=K)
        frontier = torch.maximum(self.frontier, torch.clamp(self.s + w, max=K))
        if self.fill:  # states entering the window start from the newest computed state
            q = s_new[:, None] + self.offsets
            enter = (q < K) & (q >= frontier[:, None])
            src = new[self.rows, torch.where(enter, frontier[:, None] - 1, 0)]
            buf = torch.cat([new, new[:, :1]], dim=1)
            buf[self.rows, torch.where(enter, q, K)] = src
            new = buf[:, :K]
            frontier = torch.maximum(frontier, torch.clamp(s_new + w, max=K))
        self.frontier.copy_(frontier)
        self.s.copy_(s_new)
        self.finished.copy_(s_new >= K)
        return new.reshape(B, -1)


# Maps and methods kept per step function when graph=True, so the loop's captured graph is reused.
_GRAPH_MAPS: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def _check(step, x0, n_steps, method, inputs, init, window, chunk, tol_scale=None, compact=False) -> None:
    if not callable(step):
        raise TypeError(f"step must be callable, got {type(step).__name__}")
    if not torch.is_tensor(x0) or x0.dim() < 1 or not x0.is_floating_point():
        raise ValueError("x0 must be a floating-point tensor with a leading batch dimension (B, ...)")
    if int(n_steps) != n_steps or n_steps < 1:
        raise ValueError(f"n_steps must be a positive integer, got {n_steps}")
    if method not in RECURRENCE_METHODS:
        raise ValueError(f'Unknown recurrence method "{method}". Must be one of {sorted(RECURRENCE_METHODS)}.')
    B = x0.shape[0]
    if inputs is not None and (not torch.is_tensor(inputs) or tuple(inputs.shape[:2]) != (B, n_steps)):
        got = tuple(inputs.shape) if torch.is_tensor(inputs) else type(inputs).__name__
        raise ValueError(f"inputs must have shape (B, n_steps, ...) = ({B}, {n_steps}, ...), got {got}")
    if init is not None and (not torch.is_tensor(init) or tuple(init.shape) != (B, n_steps, *x0.shape[1:])):
        got = tuple(init.shape) if torch.is_tensor(init) else type(init).__name__
        raise ValueError(f"init must have shape (B, n_steps, ...) = {(B, n_steps, *x0.shape[1:])}, got {got}")
    if window is not None and (int(window) != window or window < 1):
        raise ValueError(f"window must be a positive integer, got {window}")
    if chunk is not None and (int(chunk) != chunk or chunk < 1):
        raise ValueError(f"chunk must be a positive integer or None, got {chunk}")
    if (tol_scale is not None or compact) and method != "window":
        raise ValueError(f'tol_scale and compact apply to method="window" only, got method="{method}"')


def solve_recurrence(
    step: Step,
    x0: Tensor,
    n_steps: int,
    *,
    method: str = "anderson",
    inputs: Tensor | None = None,
    linear: float | Tensor | None = None,
    init: Tensor | None = None,
    tol: float = 1e-5,
    max_iter: int | None = None,
    stop_mode: str = "rel",
    window: int | None = None,
    fill: bool = True,
    tol_scale: Tensor | None = None,
    compact: bool = False,
    chunk: int | None = None,
    check_every: int = 4,
    trace: bool = False,
    graph: bool = False,
    backward: str | Callable[..., Tensor] | None = "ift",
    backward_options: dict | None = None,
    **method_options: Any,
) -> SolverResult:
    """Solve ``x_{k+1} = step(x_k, k)``, ``k = 0..n_steps-1``, for all ``k`` at once.

    Args:
        step: ``step(x, k) -> x_next`` on a batch of states ``x`` (N, ...) with step indices
            ``k`` (N,) (long, on ``x0``'s device); rows mix samples and steps freely. With
            ``inputs``, called as ``step(x, k, u)`` with the matching rows ``u`` of ``inputs``.
        x0: initial states (B, ...).
        n_steps: ``K``, the number of steps.
        method: ``"picard"``, ``"anderson"`` or ``"window"`` (see the module docstring).
        inputs: optional per-step data (B, K, ...), e.g. DDIM or SDE noise, gathered per row.
        linear: coefficients ``a_k`` of the part of ``step`` linear in ``x``, ``step(x, k) = a_k x +
            r(x, k)``: a float, (K,) or (B, K). The solver then iterates the anchored form
            ``X = scan(a, r(X))`` (DEQ-DDIM's form of the DDIM chain; ParaDiGMS's cumulative-sum
            Picard when ``a = 1``, e.g. Euler steps ``x + h f(x)``): the same solution, but a
            slowly varying ``r`` converges in far fewer rounds than the plain map. ``"step"``:
            ``step`` returns ``(x_next, a)`` with ``a`` broadcastable to ``x``, a per-element
            coefficient that may depend on the state (e.g. zero where DDIM clips). ``None``:
            the plain map ``T(X)_k = step(x_{k-1}, k-1)``.
        init: initial guess of the trajectory (B, K, ...); default ``x0`` repeated.
        tol: tolerance in ``stop_mode`` on the whole trajectory (``"picard"``, ``"anderson"``),
            or on each state's change per round (``"window"``).
        max_iter: most rounds (evaluations of the map); default ``K + 1``, enough for Picard
            and the window to be exact (``2 K + 10`` for Anderson).
        stop_mode: ``"rel"`` or ``"abs"``, as in :func:`implicit.solvers.iterate`.
        window: states per round of ``"window"`` (default ``min(K, 32)``).
        fill: ``"window"`` starts entering states from the newest computed one (ParaDiGMS).
        tol_scale: ``"window"`` only: per-state tolerance factors, (K,) or (B, K); state ``x_{k+1}``
            (the output of step ``k``) is final-ready when its change is at most ``tol * tol_scale[k]``
            in ``stop_mode``. ParaDiGMS's rule for diffusion, mean squared change at most
            ``tol^2 sigma^2``, is ``stop_mode="abs"`` with ``tol_scale = sqrt(D) sigma`` (``D`` elements
            per state). ``None``: ``tol`` for every state.
        compact: ``"window"`` only: run each round on the window's states alone (static window-sized
            buffers, no whole-trajectory bookkeeping, no extra round to verify the finished trajectory;
            ``trace`` is not available). With ``graph=True`` on CUDA a block of ``check_every`` rounds
            is captured once as a CUDA graph (cached on ``step``) and replayed; the host reads back only
            whether the windows have reached the end. Same trajectory as ``compact=False`` (to
            rounding), one round fewer.
        chunk: most rows per ``step`` call (a memory budget); ``None``: one call per round.
        check_every, trace, graph: as in :func:`implicit.solvers.iterate`; with ``graph=True``
            the map is cached on ``step`` (which must then be weak-referenceable and capturable).
        backward: gradient strategy from :mod:`implicit.backward` used when autograd is on
            (``"ift"``, ``"phantom"``, ``"jfb"``, ``"unrolled"``, or ``None`` for a detached result).
        backward_options: options for it (for ``"ift"``: ``solver``, default ``"picard"``, exact
            after ``K`` sweeps of the nilpotent adjoint; ``tol``; ``max_iter``, default ``K + 1``).
        method_options: Anderson's ``m``, ``beta``, ``lam``, or Picard's ``damping``.

    Returns:
        A :class:`SolverResult` whose ``z`` is the trajectory ``(B, K, ...)``: ``z[:, k]`` is
        ``x_{k+1}``, so ``z[:, -1]`` is the final state. ``n_iter`` counts parallel rounds per
        sample; ``stats`` holds ``"rounds"`` (B,), ``"states_per_round"`` and ``"step_evaluations"`` (B,).

    Raises:
        ValueError: on bad shapes or option values.
    """
    _check(step, x0, n_steps, method, inputs, init, window, chunk, tol_scale, compact)
    K, B = int(n_steps), x0.shape[0]
    if max_iter is None:  # Picard and the window are exact after K rounds; Anderson has no such bound
        max_iter = 2 * K + 10 if method == "anderson" else K + 1
    w = min(K, 32 if window is None else int(window))
    if method == "window":
        tol_k = _tolerances(tol, tol_scale, B, K, x0)
        if compact:
            if trace:
                raise ValueError("trace=True is not available with compact=True")
            if method_options:
                raise ValueError(f"unexpected options for method {method!r}: {sorted(method_options)}")
            check_options(tol, max_iter, stop_mode, check_every)
            return _compact(step, x0, inputs, linear, init, K, w, tol_k, stop_mode, fill, chunk, max_iter,
                            check_every, graph, backward, backward_options)
        rule: Method = _Window(w, K, tol_k, stop_mode == "rel", fill)
    elif method == "newton":  # DEER: Newton with a parallel-scan solve (implicit/solvers/newton_recurrence.py)
        from .newton_recurrence import NewtonRecurrence

        rule = NewtonRecurrence(step, x0.detach(), K, None if inputs is None else inputs.detach(), chunk)
    elif method == "anderson":
        rule = _Anderson(method_options.pop("m", 5), method_options.pop("beta", 1.0), method_options.pop("lam", 1e-4))
    else:
        rule = _Picard(method_options.pop("damping", 1.0))
    if method_options:
        raise ValueError(f"unexpected options for method {method!r}: {sorted(method_options)}")

    x0d = x0.detach()
    ud = None if inputs is None else inputs.detach()
    lin = _linear(linear, B, K, x0)
    if method == "newton" and isinstance(lin, str):
        raise ValueError('linear="step" (a step returning (x_next, a)) is not supported by method="newton"')
    lin_map = None if method == "newton" else lin  # Newton linearises the plain map itself
    if graph and x0.device.type == "cuda":
        key = (method, rule.key(), tuple(x0.shape), x0.dtype, x0.device, K, chunk,
               None if ud is None else (tuple(ud.shape), ud.dtype), lin_map is None)
        try:
            cache = _GRAPH_MAPS.setdefault(step, {})
        except TypeError:
            raise TypeError("graph=True caches the trajectory map on step, so step must support weak "
                            f"references (a function or module); got {type(step).__name__}") from None
        if key not in cache:
            x0_buf = x0d.clone()
            u_buf = None if ud is None else ud.clone()
            lin_buf = lin_map.clone() if torch.is_tensor(lin_map) else lin_map
            weak_step = weak_callable(step)  # a cached value holding its own key would never be freed
            F = (_WindowMap(weak_step, x0_buf, u_buf, K, chunk, rule, lin_buf) if method == "window"
                 else _TrajectoryMap(weak_step, x0_buf, u_buf, K, chunk, lin_buf))
            cache[key] = F
        F = cache[key]
        F.x0.copy_(x0d)
        if ud is not None:
            F.inputs.copy_(ud)
        if torch.is_tensor(lin_map):
            F.linear.copy_(lin_map)
        if method == "window":
            F.method.tol.copy_(rule.tol)
            rule = F.method
    else:
        F = (_WindowMap(step, x0d, ud, K, chunk, rule, lin_map) if method == "window"
             else _TrajectoryMap(step, x0d, ud, K, chunk, lin_map))

    z0 = x0d[:, None].expand(B, K, *x0.shape[1:]).contiguous() if init is None else init.detach()
    result = iterate(F, z0, rule, tol=tol, max_iter=max_iter, stop_mode=stop_mode, check_every=check_every,
                     trace=trace, graph=graph)
    per_round = w if method == "window" else K
    stats = dict(result.stats, rounds=result.n_iter, states_per_round=per_round,
                 step_evaluations=result.n_iter * per_round)
    z = result.z
    if backward is not None and torch.is_grad_enabled():
        z = _attach_gradient(step, x0, inputs, lin, K, chunk, z, backward, backward_options)
    return dataclasses.replace(result, z=z, stats=stats)


def _tolerances(tol: float, tol_scale, B: int, K: int, x0: Tensor) -> Tensor:
    """Per-state tolerances (B, K) of the window: ``tol`` times ``tol_scale`` ((K,) or (B, K)) if given."""
    if tol_scale is None:
        return torch.full((B, K), float(tol), dtype=x0.dtype, device=x0.device)
    scale = torch.as_tensor(tol_scale, dtype=x0.dtype, device=x0.device)
    if tuple(scale.shape) not in ((K,), (B, K)):
        raise ValueError(f"tol_scale must have shape (K,) = ({K},) or (B, K) = ({B}, {K}), got {tuple(scale.shape)}")
    if not bool((scale >= 0).all()):
        raise ValueError("tol_scale must be non-negative")
    return (tol * scale).expand(B, K).contiguous()


def _compact(step, x0, inputs, linear, init, K, w, tol_k, stop_mode, fill, chunk, max_iter, check_every, graph,
             backward, backward_options) -> SolverResult:
    """The window on window-sized buffers (:mod:`implicit.solvers._window`), then the chosen gradient."""
    from ._window import solve_window

    B = x0.shape[0]
    lin = _linear(linear, B, K, x0)
    result = solve_window(step, x0.detach(), K, w, inputs=None if inputs is None else inputs.detach(), linear=lin,
                          init=None if init is None else init.detach(), tol=tol_k, rel=stop_mode == "rel",
                          fill=fill, chunk=chunk, max_iter=max_iter, check_every=check_every, graph=graph)
    stats = dict(result.stats, rounds=result.n_iter, states_per_round=w, step_evaluations=result.n_iter * w)
    z = result.z
    if backward is not None and torch.is_grad_enabled():
        z = _attach_gradient(step, x0, inputs, lin, K, chunk, z, backward, backward_options)
    return dataclasses.replace(result, z=z, stats=stats)


def _linear(linear, B: int, K: int, x0: Tensor) -> Tensor | str | None:
    if linear is None or linear == "step":
        return linear
    a = torch.as_tensor(linear, dtype=x0.dtype, device=x0.device)
    if a.dim() == 0 or tuple(a.shape) == (K,):
        return a.expand(B, K).contiguous()
    if tuple(a.shape) != (B, K):
        raise ValueError(f"linear must be a float or have shape (K,) = ({K},) or (B, K) = ({B}, {K}), "
                         f"got {tuple(a.shape)}")
    return a.contiguous()


def _attach_gradient(step, x0, inputs, lin, K, chunk, z_star, backward, options) -> Tensor:
    """Rebuild the solution with the chosen backward strategy on the full map ``T``.

    With ``linear`` the map is the anchored form, so ``"jfb"`` is DEQ-DDIM's one-step
    gradient: ``x_0`` reaches every state through its linear term.
    """
    from ..backward import get_backward  # backward imports the solvers package

    F = _TrajectoryMap(step, x0, inputs, K, chunk, lin)
    shape = z_star.shape
    B = shape[0]

    def f_flat(v: Tensor) -> Tensor:
        return F(v.reshape(shape)).reshape(B, -1)

    opts = dict(options or {})
    if backward == "ift":  # the adjoint of a triangular map is exact after K Picard sweeps
        opts.setdefault("solver", "picard")
        opts.setdefault("max_iter", K + 1)
    return get_backward(backward)(f_flat, z_star.reshape(B, -1), **opts).reshape(shape)


def rollout(step: Step, x0: Tensor, n_steps: int, *, inputs: Tensor | None = None) -> Tensor:
    """The sequential reference: ``K`` calls of ``step``; returns the trajectory (B, K, ...)."""
    _check(step, x0, n_steps, "picard", inputs, None, None, None)
    B, x, xs = x0.shape[0], x0, []
    for k in range(int(n_steps)):
        kk = torch.full((B,), k, device=x0.device, dtype=torch.long)
        x = step(x, kk) if inputs is None else step(x, kk, inputs[:, k])
        xs.append(x)
    return torch.stack(xs, dim=1)
