"""Diagnostics of equilibria: residual traces, the spectral radius of ``df/dz`` at ``z*`` and the
asymptotic-alignment (path independence) score."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from .results import save_figure_atomic
from .solvers import SolverResult
from .solvers._tree import Flattener, batch_norm


def spectral_radius(f: Callable[[Any], Any], z_star: Any, *, n_iter: int = 50, seed: int = 0) -> Tensor:
    """Power-iteration estimate of the spectral radius of ``df/dz`` at ``z_star``, per sample.

    Uses forward-mode JVPs (:func:`torch.func.jvp`), so no Jacobian is formed.
    The estimate ``||J v_k|| / ||v_k||`` converges to the largest-magnitude
    eigenvalue when it is unique; values below 1 mean the fixed point is locally
    attracting under plain iteration.

    Returns:
        ``(B,)`` estimates.
    """
    flat = Flattener(z_star)
    F = flat.wrap(f)
    z = flat.flatten(z_star).detach()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.randn(z.shape, generator=gen, dtype=z.dtype).to(z.device)
    v = v / batch_norm(v)[:, None]
    estimate = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
    with torch.no_grad():
        for _ in range(n_iter):
            Jv = torch.func.jvp(F, (z,), (v,))[1]
            estimate = batch_norm(Jv)
            v = Jv / estimate.clamp_min(torch.finfo(z.dtype).tiny)[:, None]
    return estimate


def plot_residual_traces(traces: Mapping[str, SolverResult | Tensor], path: str | None = None, *, title: str = ""):
    """Plot the median (and 10-90% band) residual per iteration of each named solve.

    ``traces`` maps a label to a :class:`SolverResult` solved with ``trace=True``
    or to an ``(iterations, B)`` tensor. Saves a PNG when ``path`` is given.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, trace in traces.items():
        t = trace.trace if isinstance(trace, SolverResult) else trace
        if t is None:
            raise ValueError(f'"{label}": the result has no trace; solve with trace=True')
        t = t.detach().double().cpu()
        steps = torch.arange(1, t.shape[0] + 1)
        q = torch.quantile(t, torch.tensor([0.1, 0.5, 0.9], dtype=t.dtype), dim=1)
        (line,) = ax.semilogy(steps, q[1], label=label)
        ax.fill_between(steps, q[0], q[2], color=line.get_color(), alpha=0.2)
    ax.set_xlabel("iteration")
    ax.set_ylabel("residual")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    if path is not None:
        save_figure_atomic(fig, path, close=False, dpi=120)
    return fig


@dataclass(frozen=True)
class AlignmentResult:
    """Asymptotic alignment of a batch (see :func:`asymptotic_alignment`).

    Attributes:
        score: ``(B,)`` cosine similarity of input ``j``'s two final states.
        mean: the batch average of ``score`` (the model-level AA score).
        source: ``(B,)`` index ``i`` whose fixed point started the second solve of input ``j``.
        first, second: the solves from ``z0`` and from the other inputs' fixed points.
    """

    score: Tensor
    mean: float
    source: Tensor
    first: SolverResult
    second: SolverResult


def asymptotic_alignment(
    f: Callable[[Any, Any], Any],
    x: Any,
    z0: Any,
    *,
    solver: str | Callable[..., SolverResult] = "anderson",
    source: Tensor | None = None,
    **solver_options: Any,
) -> AlignmentResult:
    """Asymptotic-alignment (AA) score of ``z = f(z, x)`` per sample (Anil et al., 2022, Alg. 1).

    Solves every input ``x_j`` from ``z0`` to its final state ``z*_j``, solves ``x_j`` again
    starting from the final state ``z*_i`` of another input ``i = source[j]``, and returns the
    cosine similarity of the two flattened final states. A path-independent model reaches the
    same state from both starts (score 1); a path-dependent one remembers where it started.
    Both solves are single batched calls of the backend solver.

    Args:
        f: ``f(z, x)`` with ``z`` batch-first (a tensor or tuple of tensors).
        x: the inputs, passed to ``f`` unchanged.
        z0: the first solve's initial state (zeros in the paper).
        solver: backend solver name or function; ``solver_options`` go to it (``tol``, ``max_iter``...).
        source: ``(B,)`` indices pairing each input with the one whose fixed point starts its
            second solve; default: the next sample (``roll`` by one), so ``i != j`` when ``B > 1``.
    """
    from .solvers import get_solver

    solve = get_solver(solver)
    flat = Flattener(z0)
    batch = flat.batch
    if source is None:
        if batch < 2:
            raise ValueError("asymptotic_alignment needs at least 2 inputs to pair, got 1")
        source = torch.roll(torch.arange(batch, device=flat.device), shifts=1)
    source = torch.as_tensor(source, device=flat.device).long()
    if source.shape != (batch,):
        raise ValueError(f"source must have shape ({batch},), got {tuple(source.shape)}")
    with torch.no_grad():
        first = solve(lambda z: f(z, x), z0, **solver_options)
        z_star = flat.flatten(first.z)
        second = solve(lambda z: f(z, x), flat.unflatten(z_star[source]), **solver_options)
        z_again = flat.flatten(second.z)
        score = torch.nn.functional.cosine_similarity(z_star, z_again, dim=1, eps=torch.finfo(z_star.dtype).tiny)
    return AlignmentResult(score, float(score.mean()), source, first, second)
