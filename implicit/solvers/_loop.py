"""The one loop shared by every fixed-point solver.

A method (Picard, Anderson, Broyden) supplies only its update rule: given the
iterate ``z``, its residual ``g = f(z) - z`` and the iteration counter it
proposes the next iterate. This loop does everything else once: per-sample
residual norms, best-iterate tracking, freezing of samples that have finished,
NaN/inf and divergence detection, per-sample status, iteration counts, traces.

Nothing inside a block of ``check_every`` iterations reads a device value on
the host; the loop syncs once per block to see whether every sample has
finished. All state lives in preallocated tensors updated in place and the
iteration counter and the budget are device tensors, so one block is the same
sequence of kernels every time, whatever ``max_iter`` the call asks for. That
is what ``graph=True`` exploits: the block is captured once as a CUDA graph,
cached with ``f``, and replayed in later calls, removing the per-kernel launch
and Python cost that dominates small problems.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any, Callable

import torch
from torch import Tensor

from .._weak import weak_callable
from ._result import RUNNING, SolverResult, Status
from ._tree import Flattener, batch_norm

STOP_MODES = ("rel", "abs")


class Method:
    """Update rule of a fixed-point solver on flat ``(B, n)`` tensors.

    ``init`` allocates state; ``reset`` zeroes it in place (so cached CUDA graphs
    stay valid); ``step`` proposes the next iterate from ``z``, ``g = f(z) - z``
    and the device iteration counter ``it`` (shape ``(1,)``, 0 at the first call).

    A method whose iterate is final only when the method says so (the sliding
    window of :func:`implicit.solvers.solve_recurrence`) sets ``finished`` to a
    ``(B,)`` bool tensor it updates in place; a sample then converges only when
    its residual is within tolerance *and* its ``finished`` flag is set.
    """

    finished: Tensor | None = None

    def key(self) -> tuple:
        """Options that change the kernels ``step`` launches (part of the graph cache key)."""
        return (type(self).__name__,)

    def init(self, z: Tensor) -> None:
        """Allocate state for an iterate shaped like ``z``."""

    def reset(self) -> None:
        """Zero the state in place before a new solve."""

    def step(self, z: Tensor, g: Tensor, it: Tensor) -> Tensor:
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


class _Loop:
    """State and one-iteration body of a solve, reusable across calls of the same shape."""

    def __init__(self, F, z: Tensor, method: Method, tol, max_iter, stop_mode, trace, diverge_factor, block,
                 compile: bool = False):
        B, dev, dt = z.shape[0], z.device, z.dtype
        self.F, self.method, self.tol = F, method, tol
        self.rel, self.diverge_factor, self.block = stop_mode == "rel", diverge_factor, block
        self.z = z.clone()
        self.best_z = torch.empty_like(z)
        self.best_abs = torch.empty(B, device=dev, dtype=dt)
        self.best_rel = torch.empty_like(self.best_abs)
        self.first_r = torch.empty_like(self.best_abs)
        self.status = torch.empty(B, device=dev, dtype=torch.int8)
        self.n_iter = torch.empty(B, device=dev, dtype=torch.long)
        self.it = torch.empty(1, device=dev, dtype=torch.long)
        # a device tensor, so one captured graph serves every iteration budget
        self.max_iter = torch.empty(1, device=dev, dtype=torch.long)
        self.trace = torch.empty(max_iter + block, B, device=dev, dtype=dt) if trace else None
        self.tiny = torch.finfo(dt).tiny
        method.init(z)
        self.cuda_graph = None
        # Everything after f in one iteration; compiled, its many small kernels fuse into a few.
        # A plain function, not a bound method: self -> bound method -> self would be a reference cycle,
        # and the loop's state (the method's history: GPU memory) would wait for the cyclic collector.
        self.update = torch.compile(_Loop._update, fullgraph=True, dynamic=False) if compile else _Loop._update

    def reset(self, z0: Tensor, max_iter: int) -> None:
        self.z.copy_(z0)
        self.max_iter.fill_(max_iter)
        self.best_z.copy_(z0)
        self.best_abs.fill_(float("inf"))
        self.best_rel.fill_(float("inf"))
        self.status.fill_(RUNNING)
        self.n_iter.zero_()
        self.it.zero_()
        self.method.reset()

    def iteration(self) -> None:
        fz = self.F(self.z)  # under the caller's autocast, if any
        # the bookkeeping and the method's update (Gram matrices, small linear solves) stay in z's
        # precision: under autocast they would silently drop to bfloat16 or fail on mixed dtypes
        with torch.autocast(self.z.device.type, enabled=False):
            self.update(self, fz.to(self.z.dtype))

    def _update(self, fz: Tensor) -> None:
        z, it = self.z, self.it
        g = fz - z
        abs_r = batch_norm(g)
        rel_r = abs_r / (batch_norm(fz) + self.tiny)
        r = rel_r if self.rel else abs_r
        running = (self.status == RUNNING) & (it < self.max_iter)
        self.n_iter.add_(running)
        finite = torch.isfinite(r)
        better = running & finite & (r < (self.best_rel if self.rel else self.best_abs))
        self.best_z.copy_(torch.where(better[:, None], z, self.best_z))
        self.best_abs.copy_(torch.where(better, abs_r, self.best_abs))
        self.best_rel.copy_(torch.where(better, rel_r, self.best_rel))
        new = torch.where(running & ~finite, Status.NONFINITE, self.status)
        within = r <= self.tol
        if self.method.finished is not None:
            within = within & self.method.finished
        new = torch.where(running & finite & within, Status.CONVERGED, new)
        if self.diverge_factor is not None:
            self.first_r.copy_(torch.where(it == 0, abs_r, self.first_r))
            diverged = running & finite & (abs_r > self.diverge_factor * self.first_r)
            new = torch.where(diverged, Status.DIVERGED, new)
        self.status.copy_(new)
        if self.trace is not None:
            self.trace.index_copy_(0, it, r[None])
        z_next = self.method.step(z, g, it)
        self.it.add_(1)
        still = (self.status == RUNNING) & (self.it < self.max_iter)
        z.copy_(torch.where(still[:, None], z_next, self.best_z))

    def run_block(self, graph: bool) -> None:
        if not graph:
            for _ in range(self.block):
                self.iteration()
            return
        if self.cuda_graph is None:
            self.cuda_graph = _capture(self)
        self.cuda_graph.replay()

    def finish(self, flat: Flattener, iterations: int, max_iter: int) -> SolverResult:
        status = self.status.clone()
        status.masked_fill_(status == RUNNING, Status.MAX_ITER)
        n = min(iterations, max_iter)
        return SolverResult(
            z=flat.unflatten(self.best_z.clone()),
            residual=self.best_abs.clone(),
            rel_residual=self.best_rel.clone(),
            n_iter=self.n_iter.clone(),
            converged=status == Status.CONVERGED,
            status=status,
            trace=self.trace[:n].clone() if self.trace is not None else None,
        )


# Captured or compiled loops, kept as long as the f they were made for is alive.
_LOOP_CACHE: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def iterate(
    f: Callable[[Any], Any],
    z0: Any,
    method: Method,
    *,
    tol: float = 1e-4,
    max_iter: int = 50,
    stop_mode: str = "rel",
    check_every: int = 4,
    trace: bool = False,
    graph: bool = False,
    compile: bool = False,
    diverge_factor: float | None = None,
) -> SolverResult:
    """Run ``method`` on the fixed-point problem ``z = f(z)`` from ``z0``.

    Args:
        f: maps a batch-first tensor (or tuple of tensors) to one of the same structure.
        z0: initial iterate, ``(B, ...)`` or a tuple of such tensors.
        method: the update rule.
        tol: tolerance on the residual chosen by ``stop_mode``.
        max_iter: the most evaluations of ``f`` per sample.
        stop_mode: ``"rel"`` judges ``||f(z) - z|| / ||f(z)||``, ``"abs"`` judges ``||f(z) - z||``.
        check_every: iterations between host checks of whether every sample has finished.
        trace: keep the per-iteration residual of every sample in ``result.trace``.
        graph: on CUDA, capture a block of ``check_every`` iterations as a CUDA graph the
            first time and replay it, in this and later calls with the same ``f`` object,
            shapes and options. ``f`` must read its inputs from the same tensors each call
            (update them in place) and must not sync with the host.
        compile: fuse the loop's bookkeeping and the method's update with
            :func:`torch.compile` (compiled once per cached loop; pays off with ``graph=True``).
        diverge_factor: mark a sample ``DIVERGED`` once its absolute residual exceeds
            this multiple of its first one (``None``: never).

    Returns:
        A :class:`SolverResult` whose ``z`` is each sample's lowest-residual iterate.
    """
    check_options(tol, max_iter, stop_mode, check_every)
    flat = Flattener(z0)
    with torch.no_grad():
        z = flat.flatten(z0)
        use_graph = graph and z.device.type == "cuda"
        cached = use_graph or compile  # reuse the captured graph / compiled update across calls
        # the budget is a device tensor of the loop, so it is in the key only where it sizes the trace
        args = (tol, max_iter if trace else None, stop_mode, trace, diverge_factor, check_every, compile)
        loop = None
        if cached:
            try:
                cache = _LOOP_CACHE.setdefault(f, {})
            except TypeError:
                raise TypeError("graph=True and compile=True cache the loop on f, so f must support weak "
                                f"references (a function or module); got {type(f).__name__}") from None
            key = (tuple(z.shape), z.dtype, z.device, method.key(), args)
            loop = cache.get(key)
        if loop is None:
            # a cached loop calls f through a weak reference: a strong one would keep f, its cache key,
            # alive for good, and with it the captured graph and its memory
            F = flat.wrap(weak_callable(f) if cached else f)
            loop = _Loop(F, z, method, tol, max_iter, stop_mode, trace, diverge_factor, check_every, compile)
            if cached:
                cache[key] = loop
        loop.reset(z, max_iter)
        done = 0
        while done < max_iter:
            loop.run_block(use_graph)
            done += check_every
            if not bool(((loop.status == RUNNING) & (loop.it < max_iter)).any()):
                break
        return loop.finish(flat, done, max_iter)


def _capture(loop: _Loop) -> "torch.cuda.CUDAGraph":
    """Record one block of ``loop`` as a CUDA graph."""
    return capture_graph(loop.iteration, loop.block, _state_tensors(loop), "the solver loop", "f")


@functools.lru_cache(maxsize=None)
def _warmup_stream(device: int) -> "torch.cuda.Stream":
    """One side stream per device for every warm-up: libraries keep per-stream state (cuBLAS a 32 MiB
    workspace per stream on Hopper), so a new stream per capture would leave that much behind each time."""
    return torch.cuda.Stream(device)


def capture_graph(body: Callable[[], None], repeats: int, state: list[Tensor], what: str,
                  fn_name: str) -> "torch.cuda.CUDAGraph":
    """Record ``repeats`` calls of ``body`` as one CUDA graph, after one warm-up call on a side stream.

    The warm-up makes lazy initialisation (cuBLAS handles, FFT plans) happen outside the capture;
    ``state``, the tensors ``body`` updates in place, is restored after it. ``what`` and ``fn_name``
    name the captured work and the user's function in the error raised when capture fails.
    """
    saved = [t.clone() for t in state]
    stream = _warmup_stream(torch.cuda.current_device())
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        body()
    torch.cuda.current_stream().wait_stream(stream)
    for t, v in zip(state, saved):
        t.copy_(v)
    cuda_graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(cuda_graph):
            for _ in range(repeats):
                body()
    except torch.OutOfMemoryError:
        raise  # a RuntimeError too, but no fault of the function's: callers may retry smaller
    except RuntimeError as err:
        raise RuntimeError(
            f"graph=True could not capture {what} as a CUDA graph; {fn_name} must not sync "
            f"with the host (.item(), boolean indexing, printing tensors) or change shapes. "
            f"Use graph=False for such {fn_name}."
        ) from err
    return cuda_graph


def _state_tensors(loop: _Loop) -> list[Tensor]:
    own = [loop.z, loop.best_z, loop.best_abs, loop.best_rel, loop.first_r, loop.status, loop.n_iter, loop.it]
    if loop.trace is not None:
        own.append(loop.trace)
    return own + [t for t in vars(loop.method).values() if torch.is_tensor(t)]
