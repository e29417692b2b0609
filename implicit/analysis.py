"""Diagnostics of equilibria: residual traces and the spectral radius of ``df/dz`` at ``z*``."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import Tensor

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
        fig.savefig(path, dpi=120)
    return fig
