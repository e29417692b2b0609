"""The sliding window of :func:`implicit.solvers.solve_recurrence` on window-sized buffers (``compact=True``).

The shared loop (:func:`implicit.solvers.iterate`) runs the window as a fixed point of
the whole trajectory: every round it forms, compares and tracks ``K`` states although
only ``w`` of them change, and it spends one more round verifying the finished
trajectory. Here a round touches only the window: gather its ``w`` inputs from the
trajectory buffer, apply ``step`` to them in one batched call, compare each output
with its previous value against that state's tolerance, write the outputs back,
slide, and seed the states entering the window (ParaDiGMS, Shih et al., arXiv
2305.16317, Algorithm 1). All state lives in static device buffers and the
window start ``s`` is a device tensor, so a round is the same kernels every time:
with ``graph=True`` on CUDA a block of ``check_every`` rounds is captured once as a
CUDA graph (cached on ``step``, after a warm-up on a side stream, as
:func:`implicit.solvers.sequential.graphed_rollout` does) and replayed; the host
reads back only whether every window has slid past the end. Without the graph
(or on the CPU) the same rounds run eagerly and give identical results.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor

from .._weak import weak_callable
from ._loop import capture_graph
from ._result import SolverResult, Status
from .recurrence import _call_step, _split, scaled_scan

# Captured rounds kept per step function, like graphed_rollout's cache.
_CACHE: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


class WindowRounds:
    """Static buffers and the round body of a compact sliding-window solve.

    Args:
        step, K, chunk: as in ``solve_recurrence``.
        x0: (B, ...) initial states; ``inputs`` (B, K, ...) or None; ``linear`` None, ``"step"``
            or (B, K) coefficients (the anchored form, as ``_WindowMap`` uses).
        w: window size; ``tol`` (B, K): the tolerance of output ``k`` (state ``x_{k+1}``).
        rel: compare ``||change|| / ||output||`` instead of ``||change||``.
        fill: states entering the window start from the newest computed state.
        max_iter: most rounds per sample.
    """

    def __init__(self, step, x0: Tensor, K: int, w: int, inputs, linear, tol: Tensor, rel: bool, fill: bool,
                 chunk, max_iter: int):
        B, dev = x0.shape[0], x0.device
        self.step, self.K, self.w, self.chunk, self.rel, self.fill = step, K, w, chunk, rel, fill
        self.max_iter, self.S = max_iter, x0.shape[1:]
        # position p < K + 1 holds x_p; position K + 1 is scratch for writes outside the trajectory
        self.traj = x0.new_zeros(B, K + 2, x0[0].numel())
        self.inputs = None if inputs is None else inputs.detach().clone()
        self.linear = linear.clone() if torch.is_tensor(linear) else linear
        self.tol = tol.clone()
        self.s = torch.zeros(B, dtype=torch.long, device=dev)  # x_0..x_s are final
        self.frontier = torch.zeros(B, dtype=torch.long, device=dev)  # x_{frontier+1}.. never computed
        self.rounds = torch.zeros(B, dtype=torch.long, device=dev)
        self.residual = torch.zeros(B, dtype=x0.dtype, device=dev)  # change of the window in the last round
        self.rel_residual = torch.zeros_like(self.residual)
        self.offsets = torch.arange(w, device=dev)
        self.rows = torch.arange(B, device=dev)[:, None]
        self.graph = None

    def load(self, x0: Tensor, init: Tensor | None, inputs, linear, tol: Tensor) -> None:
        """Reset the buffers in place for a new solve (cached graphs stay valid)."""
        B, K = x0.shape[0], self.K
        flat = x0.reshape(B, 1, -1)
        self.traj[:, :1].copy_(flat)
        self.traj[:, 1:].copy_(flat.expand(B, K + 1, -1) if init is None else
                               torch.cat([init.reshape(B, K, -1), flat], dim=1))
        if inputs is not None:
            self.inputs.copy_(inputs)
        if torch.is_tensor(linear):
            self.linear.copy_(linear)
        self.tol.copy_(tol)
        for t in (self.s, self.frontier, self.rounds, self.residual, self.rel_residual):
            t.zero_()

    def round(self) -> None:
        """One round for every sample still running; samples past the end or at max_iter are untouched."""
        B, K, w, S, rows = self.traj.shape[0], self.K, self.w, self.S, self.rows
        s = self.s
        running = (s < K) & (self.rounds < self.max_iter)
        idx = s[:, None] + self.offsets  # (B, w): step indices, i.e. input positions
        valid = (idx < K) & running[:, None]
        idxc = idx.clamp(max=K - 1)
        prev = self.traj[rows, idxc]  # (B, w, n) inputs x_idx
        u = None if self.inputs is None else self.inputs[rows, idxc].reshape(B * w, *self.inputs.shape[2:])
        res = _call_step(self.step, prev.reshape(B * w, *S), idxc.reshape(-1), u, self.chunk)
        if self.linear is None:
            out = res.reshape(B, w, -1)
        else:  # anchored to the window's first input, which is final
            lin = self.linear if isinstance(self.linear, str) else self.linear[rows, idxc]
            o, a = _split(res, prev.reshape(B * w, *S), lin)
            r = (o - a * prev.reshape(B * w, -1)).reshape(B, w, -1)
            out = scaled_scan(a.reshape(B, w, -1), r, prev[:, 0])
        change = torch.linalg.vector_norm(out - self.traj[rows, idxc + 1], dim=2)  # (B, w)
        size = torch.linalg.vector_norm(out, dim=2)
        err = change / (size + torch.finfo(out.dtype).tiny) if self.rel else change
        bad = valid & ~(err <= self.tol[rows, idxc])  # a NaN counts as not converged
        # Output j is final when its input (output j-1 of the last round) moved within tolerance.
        stride = torch.where(bad.any(1), bad.int().argmax(1) + 1, w)
        s_new = torch.where(running, torch.clamp(s + stride, max=K), s)
        self.traj[rows, torch.where(valid, idx + 1, K + 1)] = out
        frontier = torch.where(running, torch.maximum(self.frontier, torch.clamp(s + w, max=K)), self.frontier)
        if self.fill:  # states entering the window start from the newest computed state
            q = s_new[:, None] + self.offsets
            enter = (q < K) & (q >= frontier[:, None]) & running[:, None]
            src = self.traj[rows, frontier[:, None].expand(B, w)]  # x_frontier
            self.traj[rows, torch.where(enter, q + 1, K + 1)] = src
            frontier = torch.where(running, torch.maximum(frontier, torch.clamp(s_new + w, max=K)), frontier)
        change_all = torch.where(valid, change, 0).square().sum(1).sqrt()
        size_all = torch.where(valid, size, 0).square().sum(1).sqrt()
        self.residual.copy_(torch.where(running, change_all, self.residual))
        self.rel_residual.copy_(torch.where(running, change_all / (size_all + torch.finfo(out.dtype).tiny),
                                            self.rel_residual))
        self.frontier.copy_(frontier)
        self.rounds.add_(running.long())
        self.s.copy_(s_new)

    def block(self, n: int, graph: bool) -> None:
        """``n`` rounds: replayed from a CUDA graph when ``graph`` (captured on first use)."""
        if not graph:
            for _ in range(n):
                self.round()
            return
        if self.graph is None:
            state = [self.traj, self.s, self.frontier, self.rounds, self.residual, self.rel_residual]
            self.graph = capture_graph(self.round, n, state, "a compact window round", "step")
        self.graph.replay()

    def result(self) -> SolverResult:
        B, K = self.traj.shape[0], self.K
        z = self.traj[:, 1:K + 1].reshape(B, K, *self.S).clone()
        finite = torch.isfinite(z.reshape(B, -1)).all(1)
        done = self.s >= K
        status = torch.full((B,), int(Status.MAX_ITER), dtype=torch.int8, device=z.device)
        status[done] = int(Status.CONVERGED)
        status[~finite] = int(Status.NONFINITE)
        return SolverResult(z=z, residual=self.residual.clone(), rel_residual=self.rel_residual.clone(),
                            n_iter=self.rounds.clone(), converged=done & finite, status=status)


def solve_window(step, x0: Tensor, K: int, w: int, *, inputs, linear, init, tol: Tensor, rel: bool, fill: bool,
                 chunk, max_iter: int, check_every: int, graph: bool) -> SolverResult:
    """Run compact window rounds until every sample's window has slid past step ``K`` (or ``max_iter``).

    ``tol`` is (B, K). With ``graph`` on CUDA the rounds object is cached on ``step`` and a
    block of ``check_every`` rounds is replayed from a CUDA graph; the host syncs once a block.
    """
    use_graph = graph and x0.is_cuda
    with torch.no_grad():
        if use_graph:
            try:
                cache = _CACHE.setdefault(step, {})
            except TypeError:
                raise TypeError("graph=True caches the captured window round on step, so step must support weak "
                                f"references (a function or module); got {type(step).__name__}") from None
            key = (tuple(x0.shape), x0.dtype, x0.device, K, w, rel, fill, chunk, max_iter, check_every,
                   None if inputs is None else (tuple(inputs.shape), inputs.dtype),
                   linear if linear is None or isinstance(linear, str) else "tensor")
            if key not in cache:
                # called weakly: a cached value holding its own key would never be freed
                cache[key] = WindowRounds(weak_callable(step), x0, K, w, inputs, linear, tol, rel, fill, chunk,
                                          max_iter)
            rounds = cache[key]
        else:
            rounds = WindowRounds(step, x0, K, w, inputs, linear, tol, rel, fill, chunk, max_iter)
        rounds.load(x0, init, inputs, linear, tol)
        done = 0
        while done < max_iter:
            rounds.block(check_every, use_graph)
            done += check_every
            if not bool(((rounds.s < K) & (rounds.rounds < max_iter)).any()):
                break
        return rounds.result()
