"""Small problems with known answers, shared by the solver and gradient tests."""

from __future__ import annotations

import torch
from torch import nn


def linear_contraction(batch=4, n=16, dtype=torch.float64, seed=0):
    """``f(z) = A z + b`` with ``||A|| = 0.5``; the solution solves ``(I - A) z = b``."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=dtype)
    A = 0.5 * A / torch.linalg.matrix_norm(A, 2)
    b = torch.randn(batch, n, generator=g, dtype=dtype)
    z_star = torch.linalg.solve(torch.eye(n, dtype=dtype) - A, b.T).T
    return (lambda z: z @ A.T + b), torch.zeros_like(b), z_star


def picard_divergent(batch=4, n=16, dtype=torch.float64, seed=0):
    """``f(z) = A z + b`` with symmetric ``A`` of eigenvalues in [-3, 0.5]: Picard diverges
    (spectral radius 3) but ``I - A`` is well conditioned, so quasi-Newton methods converge."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=dtype))
    A = Q @ torch.diag(torch.linspace(-3, 0.5, n, dtype=dtype)) @ Q.T
    b = torch.randn(batch, n, generator=g, dtype=dtype)
    z_star = torch.linalg.solve(torch.eye(n, dtype=dtype) - A, b.T).T
    return (lambda z: z @ A.T + b), torch.zeros_like(b), z_star


class TanhLayer(nn.Module):
    """``f(z, x) = tanh(W z + U x + c)`` with ``||W|| = scale`` (a contraction for scale < 1)."""

    def __init__(self, n=8, scale=0.8, dtype=torch.float64, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        W = torch.randn(n, n, generator=g, dtype=dtype)
        self.W = nn.Parameter(scale * W / torch.linalg.matrix_norm(W, 2))
        self.U = nn.Parameter(torch.randn(n, n, generator=g, dtype=dtype) / n**0.5)
        self.c = nn.Parameter(0.1 * torch.randn(n, generator=g, dtype=dtype))

    def forward(self, z, x):
        return torch.tanh(z @ self.W.T + x @ self.U.T + self.c)


def tanh_problem(batch=4, n=8, dtype=torch.float64, seed=0):
    layer = TanhLayer(n, dtype=dtype, seed=seed)
    x = torch.randn(batch, n, generator=torch.Generator().manual_seed(seed + 1), dtype=dtype)
    with torch.no_grad():
        return (lambda z: layer(z, x)), torch.zeros_like(x), None
