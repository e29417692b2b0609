"""Gaussian random fields on the unit square and the FNO Darcy coefficient.

A field ``g ~ N(0, sigma^2 (-Laplacian + tau^2 I)^(-alpha))`` is sampled by its
Karhunen-Loeve expansion in the eigenfunctions of the Neumann Laplacian on
[0, 1]^2, ``e_kl(x, y) = c_k c_l cos(pi k x) cos(pi l y)`` (``c_0 = 1``,
``c_k = sqrt(2)``), eigenvalues ``pi^2 (k^2 + l^2)``:

    g = sum_{(k,l) != (0,0)} sigma (pi^2 (k^2 + l^2) + tau^2)^(-alpha/2) xi_kl e_kl,  xi_kl ~ N(0, 1).

This is the construction of the FNO benchmark (Li et al., "Fourier Neural
Operator for Parametric PDEs", arXiv 2010.08895, Sec. 5.2: ``mu = N(0, (-Delta +
9 I)^-2)`` with zero Neumann conditions, i.e. ``tau = 3, alpha = 2``; their
``GRF.m`` scales by ``sigma = tau^(alpha - 1)`` and drops the constant mode), which
the FNO-DEQ paper (Marwah et al., arXiv 2312.00234) reuses for its Darcy data.
We evaluate the expansion directly on the vertex grid ``x_i = i / (n - 1)``
with the first ``n`` modes per axis (two small matrix products per sample),
so no interpolation from cell centres is needed.

The Darcy coefficient is the pushforward ``a = psi(g)`` with ``psi = 12`` on
``[0, inf)`` and ``3`` on ``(-inf, 0)`` (FNO paper, Sec. 5.2; FNO's
``demo.m`` uses 4 for the negative part, the paper and this package 3).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["grf_eigenvalues", "cosine_basis", "sample_grf", "darcy_coefficient", "default_sigma"]


def default_sigma(alpha: float, tau: float) -> float:
    """The FNO scale ``tau^(alpha - 1)`` (covariance ``tau^(2 alpha - 2) (-Lap + tau^2)^-alpha``)."""
    return float(tau) ** (float(alpha) - 1.0)


def _check(n: int, alpha: float, tau: float) -> None:
    if int(n) != n or n < 2:
        raise ValueError(f"resolution must be an integer >= 2, got {n}")
    if not alpha > 1.0:
        raise ValueError(f"alpha must exceed d/2 = 1 for a field with finite variance, got {alpha}")
    if not tau >= 0.0:
        raise ValueError(f"tau must be non-negative, got {tau}")


def grf_eigenvalues(n: int, alpha: float, tau: float, sigma: float, *,
                    device: torch.device | str | None = None, dtype: torch.dtype = torch.float64) -> Tensor:
    """Covariance eigenvalues ``(n, n)`` of mode ``(k, l)``: ``sigma^2 (pi^2 (k^2+l^2) + tau^2)^-alpha``; zero at (0, 0)."""
    _check(n, alpha, tau)
    k = torch.arange(n, device=device, dtype=dtype)
    lam = math.pi**2 * (k[:, None] ** 2 + k[None, :] ** 2)
    ev = sigma**2 * (lam + tau**2) ** (-alpha)
    ev[0, 0] = 0.0
    return ev


def cosine_basis(n: int, *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float64) -> Tensor:
    """``(n_modes, n_points)`` matrix of the L2-orthonormal Neumann eigenfunctions on the vertex grid."""
    x = torch.linspace(0.0, 1.0, n, device=device, dtype=dtype)
    k = torch.arange(n, device=device, dtype=dtype)
    basis = torch.cos(math.pi * k[:, None] * x[None, :]) * math.sqrt(2.0)
    basis[0] = 1.0
    return basis


def sample_grf(
    batch: int,
    n: int,
    *,
    alpha: float = 2.0,
    tau: float = 3.0,
    sigma: float | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """``batch`` samples ``(batch, n, n)`` of ``N(0, sigma^2 (-Lap + tau^2)^-alpha)`` on the vertex grid.

    ``sigma=None`` takes FNO's ``tau^(alpha-1)``. Index ``[b, i, j]`` is the value at
    ``(x_i, y_j)``. Samples are a deterministic function of ``generator``'s state.
    """
    if int(batch) != batch or batch < 0:
        raise ValueError(f"batch must be a non-negative integer, got {batch}")
    sigma = default_sigma(alpha, tau) if sigma is None else float(sigma)
    if generator is not None:
        device = generator.device
    ev = grf_eigenvalues(n, alpha, tau, sigma, device=device, dtype=dtype)
    xi = torch.randn(batch, n, n, generator=generator, device=device, dtype=dtype)
    basis = cosine_basis(n, device=device, dtype=dtype)
    coef = xi * ev.sqrt()
    return basis.T @ coef @ basis


def darcy_coefficient(field: Tensor, high: float = 12.0, low: float = 3.0) -> Tensor:
    """FNO's threshold pushforward: ``high`` where ``field >= 0``, ``low`` elsewhere."""
    if not (high > 0 and low > 0):
        raise ValueError(f"coefficient values must be positive for an elliptic problem, got high={high}, low={low}")
    return torch.where(field >= 0, torch.full_like(field, high), torch.full_like(field, low))
