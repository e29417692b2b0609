"""Batched CG, GMRES and Newton-Krylov against dense solutions."""

import pytest
import torch

from implicit.solvers import Status, cg, gmres, newton_krylov


def spd_batch(batch=3, n=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q = torch.randn(batch, n, n, generator=g, dtype=torch.float64)
    A = Q @ Q.transpose(1, 2) + n * torch.eye(n, dtype=torch.float64)
    b = torch.randn(batch, n, generator=g, dtype=torch.float64)
    return A, b


def apply(A):
    return lambda v: (A @ v[..., None])[..., 0]


def test_cg_matches_dense_solve_and_reports_true_residual():
    A, b = spd_batch()
    result = cg(apply(A), b, tol=1e-12)
    assert result.converged.all()
    assert torch.allclose(result.z, torch.linalg.solve(A, b), atol=1e-10)
    assert torch.allclose(result.residual, (b - apply(A)(result.z)).norm(dim=1))


def test_cg_preconditioner_cuts_iterations():
    A, b = spd_batch(n=40)
    A = A * torch.logspace(0, 3, 40, dtype=torch.float64)  # badly scaled rows/cols
    A = (A + A.transpose(1, 2)) / 2 + 40 * torch.eye(40, dtype=torch.float64) * torch.logspace(0, 3, 40, dtype=torch.float64)
    diag = torch.diagonal(A, dim1=1, dim2=2)
    plain = cg(apply(A), b, tol=1e-10, max_iter=2000)
    jacobi = cg(apply(A), b, M=lambda r: r / diag, tol=1e-10, max_iter=2000)
    assert plain.converged.all() and jacobi.converged.all()
    assert jacobi.n_iter.max() < plain.n_iter.max()
    assert torch.allclose(jacobi.z, torch.linalg.solve(A, b), rtol=1e-7, atol=1e-9)


def test_cg_max_iter_status():
    A, b = spd_batch(n=30)
    result = cg(apply(A), b, tol=1e-14, max_iter=3)
    assert (result.status == Status.MAX_ITER).all()
    assert not result.converged.any()


def test_gmres_nonsymmetric_with_restarts():
    A, b = spd_batch(n=30)
    A = A + 5 * torch.randn(30, 30, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    result = gmres(apply(A), b, tol=1e-11, restart=10, max_iter=400)
    assert result.converged.all()
    assert torch.allclose(result.z, torch.linalg.solve(A, b), atol=1e-8)


def low_rank_systems(ranks=(1, 3, 2), n=40, seed=2):
    """A = I + U V^T with U, V of the given rank per sample: GMRES is exact after rank + 1 steps."""
    g = torch.Generator().manual_seed(seed)
    A = torch.eye(n, dtype=torch.float64).repeat(len(ranks), 1, 1)
    for i, r in enumerate(ranks):
        U = torch.randn(n, r, generator=g, dtype=torch.float64)
        V = torch.randn(n, r, generator=g, dtype=torch.float64)
        A[i] += U @ V.T / n
    return A, torch.randn(len(ranks), n, generator=g, dtype=torch.float64)


def counting(A):
    calls = []

    def op(v):
        calls.append(v.shape[0])
        return apply(A)(v)

    return op, calls


def test_gmres_batched_nonsymmetric_matches_dense_solve_float32():
    A, b = spd_batch(batch=4, n=24)
    A = A + 4 * torch.randn(4, 24, 24, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    result = gmres(apply(A.float()), b.float(), tol=1e-5, restart=8, max_iter=400, check_every=3)
    assert result.converged.all()
    exact = torch.linalg.solve(A, b)
    assert ((result.z.double() - exact).norm(dim=1) / exact.norm(dim=1)).max() < 1e-3
    assert (result.rel_residual <= 1e-5).all()


def test_gmres_stops_inside_a_cycle_once_every_sample_is_within_tolerance():
    A, b = low_rank_systems()
    op, calls = counting(A)
    result = gmres(op, b, tol=1e-10, restart=30, max_iter=300, check_every=1)
    assert result.converged.all()
    assert torch.allclose(result.z, torch.linalg.solve(A, b), atol=1e-9)
    # each sample freezes at its own step (rank + 1); the batch stops at the slowest
    assert result.n_iter.tolist() == [2, 4, 3]
    # 4 Arnoldi products + 1 true residual, not a full 30-step cycle
    assert len(calls) == 5 and result.stats["matvecs"] == 5
    # checking every 3 steps costs at most 2 more products, still far from a full cycle
    op, calls = counting(A)
    coarse = gmres(op, b, tol=1e-10, restart=30, max_iter=300, check_every=3)
    assert coarse.n_iter.tolist() == [2, 4, 3] and len(calls) <= 7
    assert torch.allclose(coarse.z, result.z, atol=1e-12)


def test_gmres_per_sample_status_and_tolerance():
    A, b = low_rank_systems(ranks=(1, 6, 2))
    tol = torch.tensor([1e-10, 1e-10, 1e-30], dtype=torch.float64)  # the last one cannot be met
    result = gmres(apply(A), b, tol=tol, restart=3, max_iter=9, stop_mode="abs")
    assert result.status.tolist() == [Status.CONVERGED, Status.MAX_ITER, Status.MAX_ITER]
    assert result.converged.tolist() == [True, False, False]
    assert result.n_iter.tolist() == [2, 9, 9]
    # the first sample stopped changing once it converged
    assert torch.allclose(result.z[0], torch.linalg.solve(A[0], b[0]), atol=1e-12)
    b_bad = b.clone()
    b_bad[1, 0] = float("nan")
    bad = gmres(apply(A), b_bad, tol=1e-10, restart=5, max_iter=20)
    assert bad.status.tolist() == [Status.CONVERGED, Status.NONFINITE, Status.CONVERGED]
    with pytest.raises(ValueError, match="tol"):
        gmres(apply(A), b, tol=torch.tensor([1e-3, -1.0, 1e-3], dtype=torch.float64))


def coupled_cubic(n: int = 25):
    """Elementwise cubic coupled by a linear term: ``F(z) = z^3 + z + 0.1 L z - c``; returns ``(F, L, c)``."""
    g = torch.Generator().manual_seed(0)
    L = torch.randn(n, n, generator=g, dtype=torch.float64) / n
    c = 3 * torch.randn(4, n, generator=g, dtype=torch.float64)

    def F(z):
        return z**3 + z + 0.1 * z @ L.T - c

    return F, L, c


def test_newton_krylov_nonlinear_root():
    n = 25
    F, _, c = coupled_cubic(n)
    result = newton_krylov(F, torch.zeros_like(c), tol=1e-12, krylov_dim=n)
    assert result.converged.all()
    assert (F(result.z).norm(dim=1) <= 1e-12 * F(torch.zeros_like(c)).norm(dim=1)).all()
    assert result.n_iter.max() < 20  # Newton, not a crawl
    assert (result.stats["krylov_iters"] > 0).all()


def test_newton_krylov_line_search_rescues_far_start():
    """arctan(z) = 0 from |z0| = 3: undamped Newton overshoots and diverges; backtracking converges."""
    z0 = torch.full((2, 3), 3.0, dtype=torch.float64)
    plain = newton_krylov(torch.atan, z0, tol=1e-10, line_search=False, max_iter=10, stop_mode="abs")
    damped = newton_krylov(torch.atan, z0, tol=1e-10, max_iter=30, stop_mode="abs")
    assert not plain.converged.any()
    assert damped.converged.all()
    assert damped.z.abs().max() < 1e-9


@pytest.mark.parametrize("solver", [cg, gmres])
def test_linear_solvers_reject_mismatched_x0(solver):
    A, b = spd_batch()
    with pytest.raises(ValueError, match="x0"):
        solver(apply(A), b, x0=torch.zeros(3, 5, dtype=torch.float64))


def test_newton_krylov_eisenstat_walker_and_measure():
    n = 25
    F, L, c = coupled_cubic(n)
    z0 = torch.zeros_like(c)
    const = newton_krylov(F, z0, tol=1e-10, krylov_dim=n, forcing=1e-6)
    ew = newton_krylov(F, z0, tol=1e-10, krylov_dim=n, forcing=1e-6, forcing_mode="eisenstat-walker")
    assert const.converged.all() and ew.converged.all()
    assert torch.allclose(ew.z, const.z, atol=1e-8)
    assert ew.stats["krylov_iters"].sum() < const.stats["krylov_iters"].sum()
    # a caller's measure decides convergence: the max-norm of F, judged in absolute terms
    jac = lambda z: lambda v: 3 * z**2 * v + v + 0.1 * v @ L.T  # noqa: E731
    meas = newton_krylov(F, z0, tol=1e-9, stop_mode="abs", krylov_dim=n, linearize=jac,
                         measure=lambda z, Fz: Fz.abs().amax(dim=1))
    assert meas.converged.all() and (F(meas.z).abs().amax(dim=1) <= 1e-9).all()
    assert torch.allclose(meas.residual, F(meas.z).abs().amax(dim=1))
    with pytest.raises(ValueError, match="forcing_mode"):
        newton_krylov(F, z0, forcing_mode="fast")
