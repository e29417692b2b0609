"""The one loop shared by every fixed-point solver.

A method (Picard, Anderson, Broyden) supplies only its update rule: given the
iterate ``z`` and its residual ``g = f(z) - z`` it proposes the next iterate.
This loop does everything else once: per-sample residual norms, best-iterate
tracking, freezing of samples that have finished, NaN/inf and divergence
detection, the per-sample status, iteration counts and traces.

Nothing here reads a device value on the host inside a block of
``check_every`` iterations; the loop syncs once per block to see whether every
sample has finished. All state lives in preallocated tensors updated in place,
which is what lets ``graph=True`` capture a whole block as one CUDA graph and
replay it, removing the per-kernel launch cost that dominates small problems.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from ._result import RUNNING, SolverResult, Status
from ._tree import Flattener, batch_norm

STOP_MODES = ("rel", "abs")


class Method:
    """Update rule of a fixed-point solver, working on flat ``(B, n)`` tensors.

    ``period`` is the length after which the method's bookkeeping repeats
    (the history size for ring buffers); CUDA-graph blocks are a multiple of it.
    """

    period: int = 1

    def init(self, z: Tensor) -> None:
        """Allocate state for an iterate shaped like ``z``."""

    def step(self, i: int, z: Tensor, g: Tensor) -> Tensor:
        """Next iterate after iteration ``i`` (0-based) from ``z`` and ``g = f(z) - z``."""
        raise NotImplementedError


def check_options(tol: float, max_iter: int, stop_mode: str, check_every: int) -> None:
    """Validate the options shared by every solver; raise with the allowed values."""
    if stop_mode not in STOP_MODES:
        raise ValueError(f'stop_mode must be one of {STOP_MODES}, got "{stop_mode}"')
    if not tol > 0:
        raise ValueError(f"tol must be positive, got {tol}")
    if int(max_iter) != max_iter or max_iter < 1:
        raise ValueError(f"max_iter must be a positive integer, got {max_iter}")
    if int(check_every) != check_every or check_every < 1:
        raise ValueError(f"check_every must be a positive integer, got {check_every}")


def iterate(
    f: Callable[[Any], Any],
    z0: Any,
    method: Method,
    *,
    tol: float = 1e-4,
    max_iter: int = 50,
    stop_mode: str = "rel",
    check_every: int = 8,
    trace: bool = False,
    graph: bool = False,
    diverge_factor: float | None = None,
) -> SolverResult:
    """Run ``method`` on the fixed-point problem ``z = f(z)`` from ``z0``.

    Args:
        f: maps a batch-first tensor (or tuple of tensors) to one of the same structure.
        z0: initial iterate, ``(B, ...)`` or a tuple of such tensors.
        method: the update rule.
        tol: tolerance on the residual chosen by ``stop_mode``.
        max_iter: the most evaluations of ``f``.
        stop_mode: ``"rel"`` judges ``||f(z) - z|| / ||f(z)||``, ``"abs"`` judges ``||f(z) - z||``.
        check_every: iterations between host checks of whether every sample has finished.
        trace: keep the per-iteration residual of every sample in ``result.trace``.
        graph: on CUDA, capture a block of iterations as a CUDA graph and replay it.
        diverge_factor: mark a sample ``DIVERGED`` once its absolute residual exceeds
            this multiple of its first one (``None``: never).

    Returns:
        A :class:`SolverResult` whose ``z`` is each sample's lowest-residual iterate.
    """
    check_options(tol, max_iter, stop_mode, check_every)
    flat = Flattener(z0)
    F = flat.wrap(f)
    with torch.no_grad():
        z = flat.flatten(z0).clone()
        B = z.shape[0]
        dev = z.device
        best_z = z.clone()
        best_abs = torch.full((B,), float("inf"), device=dev, dtype=z.dtype)
        best_rel = best_abs.clone()
        first_r = best_abs.clone()
        status = torch.full((B,), RUNNING, device=dev, dtype=torch.int8)
        n_iter = torch.zeros(B, device=dev, dtype=torch.long)
        trace_buf = torch.zeros(max_iter if trace else 1, B, device=dev, dtype=z.dtype)
        counter = torch.zeros(1, device=dev, dtype=torch.long)
        method.init(z)
        rel = stop_mode == "rel"
        tiny = torch.finfo(z.dtype).tiny

        def one_iteration(i: int) -> None:
            fz = F(z)
            g = fz - z
            abs_r = batch_norm(g)
            rel_r = abs_r / (batch_norm(fz) + tiny)
            r = rel_r if rel else abs_r
            running = status == RUNNING
            n_iter.add_(running)
            finite = torch.isfinite(r)
            best_r = best_rel if rel else best_abs
            better = running & finite & (r < best_r)
            best_z.copy_(torch.where(better[:, None], z, best_z))
            best_abs.copy_(torch.where(better, abs_r, best_abs))
            best_rel.copy_(torch.where(better, rel_r, best_rel))
            new = torch.where(running & ~finite, Status.NONFINITE, status)
            new = torch.where(running & finite & (r <= tol), Status.CONVERGED, new)
            if diverge_factor is not None:
                if i == 0:
                    first_r.copy_(abs_r)
                new = torch.where(running & finite & (abs_r > diverge_factor * first_r), Status.DIVERGED, new)
            status.copy_(new)
            if trace:
                trace_buf.index_copy_(0, counter, r[None])
                counter.add_(1)
            z_next = method.step(i, z, g)
            z.copy_(torch.where((status == RUNNING)[:, None], z_next, best_z))

        block = check_every
        use_graph = graph and dev.type == "cuda"
        if use_graph:
            block = -(-check_every // method.period) * method.period
        cuda_graph = None
        i = 0
        while i < max_iter:
            n = min(block, max_iter - i)
            if use_graph and i > 0 and n == block:
                if cuda_graph is None:
                    cuda_graph = _capture(lambda start=i: [one_iteration(start + j) for j in range(block)])
                cuda_graph.replay()
            else:
                for j in range(n):
                    one_iteration(i + j)
            i += n
            if not bool((status == RUNNING).any()):
                break
        status.masked_fill_(status == RUNNING, Status.MAX_ITER)
        return SolverResult(
            z=flat.unflatten(best_z),
            residual=best_abs,
            rel_residual=best_rel,
            n_iter=n_iter,
            converged=status == Status.CONVERGED,
            status=status,
            trace=trace_buf[: int(counter)] if trace else None,
        )


def _capture(block: Callable[[], Any]) -> "torch.cuda.CUDAGraph":
    """Record ``block`` (already warmed up eagerly) as a CUDA graph."""
    cuda_graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(cuda_graph):
            block()
    except RuntimeError as err:
        raise RuntimeError(
            "graph=True could not capture the solver loop as a CUDA graph; f must not sync "
            "with the host (.item(), boolean indexing, printing tensors) or change shapes. "
            "Use graph=False for such f."
        ) from err
    return cuda_graph
