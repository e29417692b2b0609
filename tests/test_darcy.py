"""Darcy: second-order convergence, an SPD operator, PCG against a direct solve, true residuals."""

import math

import numpy as np
import pytest
import scipy.sparse.linalg as sla
import torch

from pde.darcy import apply_operator, assemble_matrix, darcy_residual, dst1, face_coefficients, solve_darcy
from pde.grf import darcy_coefficient, sample_grf

pi = math.pi


def _manufactured(s: int):
    """u = sin(pi x) sin(pi y) x(1 + y) / 2-free smooth; a = 2 + sin(2 pi x) cos(3 pi y); f = -div(a grad u)."""
    x = torch.linspace(0, 1, s, dtype=torch.float64)
    X, Y = torch.meshgrid(x, x, indexing="ij")
    u = torch.sin(pi * X) * torch.sin(2 * pi * Y) * torch.exp(X)
    ux = torch.sin(2 * pi * Y) * torch.exp(X) * (pi * torch.cos(pi * X) + torch.sin(pi * X))
    uy = 2 * pi * torch.sin(pi * X) * torch.cos(2 * pi * Y) * torch.exp(X)
    uxx = torch.sin(2 * pi * Y) * torch.exp(X) * (2 * pi * torch.cos(pi * X) + (1 - pi**2) * torch.sin(pi * X))
    uyy = -4 * pi**2 * u
    a = 2 + torch.sin(2 * pi * X) * torch.cos(3 * pi * Y)
    ax = 2 * pi * torch.cos(2 * pi * X) * torch.cos(3 * pi * Y)
    ay = -3 * pi * torch.sin(2 * pi * X) * torch.sin(3 * pi * Y)
    f = -(ax * ux + ay * uy + a * (uxx + uyy))
    return a[None], f[None], u[None]


def test_second_order_convergence_manufactured():
    errors = []
    for s in (17, 33, 65, 129):
        a, f, u = _manufactured(s)
        sol = solve_darcy(a, f, tol=1e-12)
        assert bool(sol.converged.all())
        errors.append((sol.u - u).abs().max().item())
    ratios = [errors[i] / errors[i + 1] for i in range(len(errors) - 1)]
    assert all(3.6 < r < 4.4 for r in ratios[1:]), ratios  # error ~ h^2
    assert errors[-1] < 1e-3


def test_operator_symmetric_positive_definite_and_matches_stencil():
    a = darcy_coefficient(sample_grf(1, 9, generator=torch.Generator().manual_seed(0)))[0]
    for average in ("arithmetic", "harmonic"):
        A = assemble_matrix(a, average).toarray()
        assert np.abs(A - A.T).max() == 0.0
        assert np.linalg.eigvalsh(A).min() > 0
        u = torch.randn(1, 7, 7, dtype=torch.float64)
        ax, ay = face_coefficients(a[None], average)
        Au = apply_operator(u, ax, ay) * 8**2  # apply_operator returns h^2 A u
        assert np.allclose(A @ u.reshape(-1).numpy(), Au.reshape(-1).numpy(), rtol=1e-12, atol=1e-9)


def test_pcg_matches_direct_solve_and_reports_true_residual():
    a = darcy_coefficient(sample_grf(3, 41, generator=torch.Generator().manual_seed(1)))
    sol = solve_darcy(a, 1.0, tol=1e-10)
    assert bool(sol.converged.all())
    assert torch.allclose(sol.rel_residual, darcy_residual(a, sol.u), rtol=1e-8, atol=0)
    assert float(sol.rel_residual.max()) <= 1e-10
    A = assemble_matrix(a[1])
    ref = sla.spsolve(A.tocsc(), np.ones(A.shape[0]))
    got = sol.u[1, 1:-1, 1:-1].reshape(-1).numpy()
    assert np.abs(got - ref).max() <= 1e-9 * np.abs(ref).max()
    assert torch.all(sol.u[:, 0] == 0) and torch.all(sol.u[:, :, -1] == 0)


def test_fft_preconditioner_iterations_do_not_grow_with_resolution():
    its = []
    for s in (33, 129):
        a = darcy_coefficient(sample_grf(2, s, generator=torch.Generator().manual_seed(2)))
        its.append(int(solve_darcy(a).iterations.max()))
    assert its[1] <= its[0] + 6 and its[1] < 40, its
    a = darcy_coefficient(sample_grf(2, 33, generator=torch.Generator().manual_seed(2)))
    jac = solve_darcy(a, preconditioner="jacobi", max_iter=2000)
    fft = solve_darcy(a, preconditioner="fft")
    assert int(jac.iterations.min()) > 2 * int(fft.iterations.max())
    assert torch.allclose(jac.u, fft.u, rtol=0, atol=1e-9 * fft.u.abs().max().item())


def test_dst_is_its_own_inverse():
    x = torch.randn(2, 5, 11, dtype=torch.float64)
    assert torch.allclose(dst1(dst1(x, -1), -1), 6 * x, atol=1e-12)
    import scipy.fft

    assert np.allclose(dst1(x, -2).numpy(), scipy.fft.dst(x.numpy(), type=1, axis=-2) / 2)


def test_bad_input():
    with pytest.raises(ValueError, match="shape"):
        solve_darcy(torch.ones(4, 4))
    with pytest.raises(ValueError, match="preconditioner"):
        solve_darcy(torch.ones(1, 5, 5, dtype=torch.float64), preconditioner="ilu")
    with pytest.raises(ValueError, match="face_average"):
        solve_darcy(torch.ones(1, 5, 5, dtype=torch.float64), face_average="geometric")
