"""The honest fastest *sequential* baseline: a recurrence rolled out from a CUDA graph.

``rollout`` in :mod:`implicit.solvers.recurrence` calls ``step`` K times from
Python; for small models that loop is bound by kernel launches and Python, not
arithmetic. Here one step (gather the step's inputs by a device-side counter,
call ``step``, write the trajectory row, advance the counter) is captured once as
a CUDA graph, cached per ``step`` object and shape, and replayed K times. On the
CPU (or with ``graph=False``) it falls back to the plain loop, so results match.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable

import torch
from torch import Tensor

from .._weak import weak_callable
from ._loop import capture_graph

_CACHE: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


class _GraphedStep:
    def __init__(self, step: Callable[..., Tensor], x0: Tensor, K: int, inputs: Tensor | None, trajectory: bool):
        B = x0.shape[0]
        self.x = x0.detach().clone()
        self.inputs = None if inputs is None else inputs.detach().clone()
        self.traj = x0.new_empty(B, K, *x0.shape[1:]) if trajectory else None
        self.k = torch.zeros(1, dtype=torch.long, device=x0.device)
        self.step, self.B = step, B

        @torch.no_grad()
        def one() -> None:
            kk = self.k.expand(self.B)
            if self.inputs is None:
                y = self.step(self.x, kk)
            else:
                y = self.step(self.x, kk, self.inputs.index_select(1, self.k)[:, 0])
            if self.traj is not None:
                self.traj.index_copy_(1, self.k, y[:, None])
            self.x.copy_(y)
            self.k.add_(1)

        # run() resets x and k before every replay, so the warm-up call needs no state restored
        self.graph = capture_graph(one, 1, [], "a sequential step", "step")

    def run(self, x0: Tensor, inputs: Tensor | None, K: int) -> Tensor:
        self.x.copy_(x0)
        if inputs is not None:
            self.inputs.copy_(inputs)
        self.k.zero_()
        for _ in range(K):
            self.graph.replay()
        return self.x.clone() if self.traj is None else self.traj.clone()


def graphed_rollout(step: Callable[..., Tensor], x0: Tensor, n_steps: int, *, inputs: Tensor | None = None,
                    graph: bool = True, trajectory: bool = True) -> Tensor:
    """``x_{k+1} = step(x_k, k)`` for ``k < n_steps`` one step at a time; returns ``(B, K, ...)``,
    or only the final state ``(B, ...)`` with ``trajectory=False`` (no trajectory is stored then).

    ``step`` is called as in :func:`implicit.solvers.recurrence.solve_recurrence`
    (``step(x, k)`` or ``step(x, k, u)`` with ``k`` a ``(B,)`` long tensor). On CUDA with
    ``graph=True`` one step is captured as a CUDA graph (cached on ``step``, which must be
    weak-referenceable and must not sync with the host) and replayed ``n_steps`` times.
    No gradients flow through the graphed path.
    """
    K = int(n_steps)
    if K < 1:
        raise ValueError(f"n_steps must be a positive integer, got {n_steps}")
    if inputs is not None and tuple(inputs.shape[:2]) != (x0.shape[0], K):
        raise ValueError(f"inputs must have shape (B, n_steps, ...) = ({x0.shape[0]}, {K}, ...), "
                         f"got {tuple(inputs.shape)}")
    if not (graph and x0.is_cuda):
        from .recurrence import rollout

        traj = rollout(step, x0, K, inputs=inputs)
        return traj if trajectory else traj[:, -1]
    try:
        cache = _CACHE.setdefault(step, {})
    except TypeError:
        raise TypeError("graphed_rollout caches the captured step on step, so step must support weak "
                        f"references (a function or module); got {type(step).__name__}") from None
    key = (tuple(x0.shape), x0.dtype, x0.device, K, trajectory,
           None if inputs is None else (tuple(inputs.shape), inputs.dtype))
    if key not in cache:
        cache[key] = _GraphedStep(weak_callable(step), x0, K, inputs, trajectory)  # not holding its own key
    with torch.no_grad():
        return cache[key].run(x0, inputs, K)
