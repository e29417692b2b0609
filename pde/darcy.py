"""Darcy flow ``-div(a grad u) = f`` on (0,1)^2, ``u = 0`` on the boundary, solved batched by PCG.

Discretisation (the FNO data's convention, Li et al. arXiv 2010.08895, their
``solve_gwf.m``): an ``s x s`` vertex grid including the boundary, ``h = 1/(s-1)``,
the coefficient sampled at the vertices, and the second-order five-point scheme

    (A u)_ij = [ a_{i+1/2,j}(u_ij - u_{i+1,j}) + a_{i-1/2,j}(u_ij - u_{i-1,j})
               + a_{i,j+1/2}(u_ij - u_{i,j+1}) + a_{i,j-1/2}(u_ij - u_{i,j-1}) ] / h^2

on the ``(s-2)^2`` interior unknowns. Face coefficients are the arithmetic mean
of the two vertex values (as ``solve_gwf.m``); ``face_average="harmonic"`` is
available. ``A`` is symmetric positive definite.

The operator is applied matrix-free (a few slices per sample, batched on the
GPU) and the systems go to the backend's :func:`implicit.solvers.cg`. The default
preconditioner is the fast Poisson solver of the constant-coefficient Laplacian
scaled by ``sqrt(a_min a_max)`` (Concus & Golub, 1973), applied with a discrete
sine transform built on ``torch.fft``: ``A`` and ``a_bar L`` are spectrally
equivalent with ``cond <= a_max / a_min`` (4 for the 12/3 coefficient), so PCG
needs a few tens of iterations at any resolution. Jacobi is available for comparison.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from implicit.solvers import cg

__all__ = [
    "face_coefficients", "apply_operator", "dst1", "PoissonPreconditioner", "DarcySolution",
    "solve_darcy", "assemble_matrix", "darcy_residual",
]

AVERAGES = ("arithmetic", "harmonic")
PRECONDITIONERS = ("fft", "jacobi", "none")


def face_coefficients(a: Tensor, average: str = "arithmetic") -> tuple[Tensor, Tensor]:
    """Face values ``(ax, ay)`` of a vertex coefficient ``a`` ``(B, s, s)``: shapes ``(B, s-1, s)`` and ``(B, s, s-1)``."""
    if average not in AVERAGES:
        raise ValueError(f'face_average must be one of {AVERAGES}, got "{average}"')
    a0x, a1x, a0y, a1y = a[:, :-1, :], a[:, 1:, :], a[:, :, :-1], a[:, :, 1:]
    if average == "arithmetic":
        return 0.5 * (a0x + a1x), 0.5 * (a0y + a1y)
    return 2 * a0x * a1x / (a0x + a1x), 2 * a0y * a1y / (a0y + a1y)


def apply_operator(u: Tensor, ax: Tensor, ay: Tensor) -> Tensor:
    """``h^2 A u`` for interior values ``u`` ``(B, s-2, s-2)``; zero Dirichlet values are padded in."""
    U = torch.nn.functional.pad(u, (1, 1, 1, 1))
    fx = ax * (U[:, 1:, :] - U[:, :-1, :])  # flux across x-faces, (B, s-1, s)
    fy = ay * (U[:, :, 1:] - U[:, :, :-1])  # (B, s, s-1)
    return -(fx[:, 1:, 1:-1] - fx[:, :-1, 1:-1]) - (fy[:, 1:-1, 1:] - fy[:, 1:-1, :-1])


def dst1(x: Tensor, dim: int = -1) -> Tensor:
    """Unnormalised DST-I along ``dim``: ``X_k = sum_j x_j sin(pi j k / (m+1))``; ``dst1(dst1(x)) = (m+1)/2 x``."""
    x = x.movedim(dim, -1)
    m = x.shape[-1]
    z = x.new_zeros(*x.shape[:-1], 1)
    y = torch.cat([z, x, z, -x.flip(-1)], dim=-1)
    X = -torch.fft.rfft(y, dim=-1).imag[..., 1 : m + 1] / 2
    return X.movedim(-1, dim)


class PoissonPreconditioner:
    """``(a_bar h^2 L)^-1`` for the Dirichlet five-point Laplacian, by DST-I on the interior grid."""

    def __init__(self, m: int, a_bar: Tensor):
        k = torch.arange(1, m + 1, device=a_bar.device, dtype=a_bar.dtype)
        s = 4 * torch.sin(math.pi * k / (2 * (m + 1))) ** 2
        self.scale = (2.0 / (m + 1)) ** 2 / ((s[:, None] + s[None, :])[None] * a_bar[:, None, None])

    def __call__(self, r: Tensor) -> Tensor:
        return dst1(dst1(dst1(dst1(r, -1), -2) * self.scale, -1), -2)


@dataclass
class DarcySolution:
    """Solution on the full vertex grid ``(B, s, s)`` (zero boundary) and per-sample PCG diagnostics.

    ``rel_residual`` is the true ``||b - A u|| / ||b||`` over the interior, recomputed after the solve.
    """

    u: Tensor
    rel_residual: Tensor
    iterations: Tensor
    converged: Tensor


def _check_grid(a: Tensor) -> None:
    if a.dim() != 3 or a.shape[1] != a.shape[2] or a.shape[1] < 3:
        raise ValueError(f"coefficient must have shape (B, s, s) with s >= 3, got {tuple(a.shape)}")


def solve_darcy(
    a: Tensor,
    f: Tensor | float = 1.0,
    *,
    tol: float = 1e-10,
    max_iter: int = 1000,
    face_average: str = "arithmetic",
    preconditioner: str = "fft",
) -> DarcySolution:
    """Solve ``-div(a grad u) = f``, ``u|boundary = 0`` for a batch of vertex coefficients ``a`` ``(B, s, s)``.

    ``f`` is a number or a ``(B, s, s)`` vertex field. Runs in ``a``'s dtype and device;
    use float64 for ``tol`` near 1e-10. A sample is ``converged`` when its *true*
    relative residual is at most ``tol``.
    """
    _check_grid(a)
    if preconditioner not in PRECONDITIONERS:
        raise ValueError(f'preconditioner must be one of {PRECONDITIONERS}, got "{preconditioner}"')
    B, s = a.shape[0], a.shape[1]
    h2 = 1.0 / (s - 1) ** 2
    ax, ay = face_coefficients(a, face_average)
    if isinstance(f, Tensor):
        b = h2 * f[:, 1:-1, 1:-1].to(a)
    else:
        b = torch.full((B, s - 2, s - 2), h2 * float(f), dtype=a.dtype, device=a.device)

    def A(u: Tensor) -> Tensor:
        return apply_operator(u, ax, ay)

    M = None
    if preconditioner == "fft":
        lo = torch.minimum(ax.amin(dim=(1, 2)), ay.amin(dim=(1, 2)))
        hi = torch.maximum(ax.amax(dim=(1, 2)), ay.amax(dim=(1, 2)))
        M = PoissonPreconditioner(s - 2, (lo * hi).sqrt())
    elif preconditioner == "jacobi":
        diag = ax[:, 1:, 1:-1] + ax[:, :-1, 1:-1] + ay[:, 1:-1, 1:] + ay[:, 1:-1, :-1]
        inv = 1.0 / diag
        M = lambda r: inv * r  # noqa: E731
    # The recursive CG residual drifts from the true one; aim lower so the true one meets tol.
    res = cg(A, b, M=M, tol=tol / 4, max_iter=max_iter, check_every=8)
    u = torch.nn.functional.pad(res.z, (1, 1, 1, 1))
    return DarcySolution(u=u, rel_residual=res.rel_residual, iterations=res.n_iter,
                         converged=res.rel_residual <= tol)


def darcy_residual(a: Tensor, u: Tensor, f: Tensor | float = 1.0, face_average: str = "arithmetic") -> Tensor:
    """Per-sample true relative residual ``||b - A u|| / ||b||`` of a full-grid ``u`` ``(B, s, s)``."""
    _check_grid(a)
    s = a.shape[1]
    h2 = 1.0 / (s - 1) ** 2
    ax, ay = face_coefficients(a, face_average)
    b = h2 * (f[:, 1:-1, 1:-1] if isinstance(f, Tensor) else torch.full_like(u[:, 1:-1, 1:-1], float(f)))
    r = b - apply_operator(u[:, 1:-1, 1:-1], ax, ay)
    return torch.linalg.vector_norm(r.flatten(1), dim=1) / torch.linalg.vector_norm(b.flatten(1), dim=1)


def assemble_matrix(a: Tensor, face_average: str = "arithmetic"):
    """The interior matrix ``A`` (with the ``1/h^2``) of one coefficient ``a`` ``(s, s)`` as ``scipy.sparse`` CSR.

    Used by the tests (symmetry, definiteness) and as the spsolve baseline; rows
    are ordered like ``u[1:-1, 1:-1].reshape(-1)``.
    """
    import numpy as np
    import scipy.sparse as sp

    if a.dim() != 2:
        raise ValueError(f"assemble_matrix takes one (s, s) coefficient, got {tuple(a.shape)}")
    s = a.shape[0]
    m = s - 2
    ax, ay = (t[0].detach().cpu().double().numpy() for t in face_coefficients(a[None], face_average))
    idx = np.arange(m * m).reshape(m, m)
    I, J = np.meshgrid(np.arange(1, s - 1), np.arange(1, s - 1), indexing="ij")
    e, w = ax[I, J], ax[I - 1, J]  # faces i+1/2 and i-1/2
    n_, s_ = ay[I, J], ay[I, J - 1]  # faces j+1/2 and j-1/2
    rows, cols, vals = [idx.ravel()], [idx.ravel()], [(e + w + n_ + s_).ravel()]
    for coef, di, dj in ((e, 1, 0), (w, -1, 0), (n_, 0, 1), (s_, 0, -1)):
        ii, jj = I - 1 + di, J - 1 + dj
        ok = (ii >= 0) & (ii < m) & (jj >= 0) & (jj < m)
        rows.append(idx[ok])
        cols.append(idx[ii[ok], jj[ok]])
        vals.append(-coef[ok])
    A = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(m * m, m * m))
    return A * (s - 1) ** 2


# ---------------------------------------------------------------------------------------------
# Data generation: one recipe section ``[darcy]`` -> one chunk of samples.

DEFAULTS: dict = {
    "fine_resolution": 421,  # grid the PDE is solved on (vertices, boundary included)
    "subsample": 5,  # stored grid = every subsample-th vertex: (421 - 1) / 5 + 1 = 85
    "alpha": 2.0,
    "tau": 3.0,
    "sigma": None,  # None: FNO's tau^(alpha - 1)
    "high": 12.0,
    "low": 3.0,
    "forcing": 1.0,
    "face_average": "arithmetic",
    "preconditioner": "fft",
    "tol": 1e-10,
    "max_iter": 1000,
    "dtype": "float64",
}
FIELDS = ("coefficient", "solution")
STATS = {"residual": "f8", "iterations": "i8"}  # per-sample diagnostics and their HDF5 dtypes


def check_params(p: dict) -> dict:
    """Validate a ``[darcy]`` section (defaults already merged); fill derived values."""
    from .grf import default_sigma

    s, k = p["fine_resolution"], p["subsample"]
    for key in ("fine_resolution", "subsample", "max_iter"):
        if not isinstance(p[key], int) or p[key] < 1:
            raise ValueError(f"darcy.{key} must be a positive integer, got {p[key]!r}")
    if s < 3:
        raise ValueError(f"darcy.fine_resolution must be at least 3, got {s}")
    if (s - 1) % k:
        raise ValueError(f"darcy.subsample={k} must divide fine_resolution - 1 = {s - 1} (vertex grids keep the boundary)")
    if p["face_average"] not in AVERAGES:
        raise ValueError(f'darcy.face_average must be one of {AVERAGES}, got "{p["face_average"]}"')
    if p["preconditioner"] not in PRECONDITIONERS:
        raise ValueError(f'darcy.preconditioner must be one of {PRECONDITIONERS}, got "{p["preconditioner"]}"')
    if p["dtype"] not in ("float32", "float64"):
        raise ValueError(f'darcy.dtype must be "float32" or "float64", got "{p["dtype"]}"')
    if not p["tol"] > 0:
        raise ValueError(f"darcy.tol must be positive, got {p['tol']}")
    if p["sigma"] is None:
        p["sigma"] = default_sigma(p["alpha"], p["tau"])
    return p


def resolution(p: dict) -> int:
    """Stored grid size for a ``[darcy]`` section."""
    return (p["fine_resolution"] - 1) // p["subsample"] + 1


def generate_chunk(p: dict, batch: int, generator: torch.Generator, device: torch.device | str) -> dict:
    """``batch`` samples: GRF -> thresholded coefficient -> PCG solve at the fine grid -> subsample."""
    from .grf import darcy_coefficient, sample_grf

    dtype = getattr(torch, p["dtype"])
    g = sample_grf(batch, p["fine_resolution"], alpha=p["alpha"], tau=p["tau"], sigma=p["sigma"],
                   generator=generator, device=device, dtype=dtype)
    a = darcy_coefficient(g, p["high"], p["low"])
    sol = solve_darcy(a, p["forcing"], tol=p["tol"], max_iter=p["max_iter"],
                      face_average=p["face_average"], preconditioner=p["preconditioner"])
    k = p["subsample"]
    return {
        "fields": {"coefficient": a[:, ::k, ::k], "solution": sol.u[:, ::k, ::k]},
        "stats": {"residual": sol.rel_residual, "iterations": sol.iterations},
        "accepted": sol.converged,
        "info": {"iterations": sol.iterations},
    }
