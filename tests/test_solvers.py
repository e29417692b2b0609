"""The fixed-point solvers: correctness, per-sample convergence, statuses and input checks."""

import shutil
import weakref

import pytest
import torch
from problems import linear_contraction, picard_divergent, tanh_problem

from implicit.bench._timing import saved_for_backward_bytes
from implicit.solvers import SOLVERS, Status, anderson, broyden, get_solver, picard, register_solver, solve, unroll

FIXED_POINT = ["picard", "anderson", "broyden"]


def residual(f, z):
    return (f(z) - z).norm(dim=1)


@pytest.mark.parametrize("name", FIXED_POINT)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_linear_contraction_known_solution(name, dtype, tol):
    f, z0, z_star = linear_contraction(dtype=dtype)
    result = solve(f, z0, name, tol=tol, max_iter=200)
    assert result.converged.all()
    assert (result.status == Status.CONVERGED).all()
    assert torch.allclose(result.z, z_star, atol=50 * tol, rtol=0)
    assert result.z.dtype == dtype


@pytest.mark.parametrize("name", FIXED_POINT)
def test_tanh_layer_converges(name):
    f, z0, _ = tanh_problem()
    result = solve(f, z0, name, tol=1e-10, max_iter=200)
    assert result.converged.all()
    assert torch.allclose(residual(f, result.z), result.residual)
    assert (result.rel_residual <= 1e-10).all()


@pytest.mark.parametrize("name", ["anderson", "broyden"])
def test_quasi_newton_converges_where_picard_diverges(name):
    f, z0, z_star = picard_divergent()
    assert not picard(f, z0, tol=1e-8, max_iter=200).converged.any()
    result = solve(f, z0, name, tol=1e-10, max_iter=300)
    assert result.converged.all()
    assert torch.allclose(result.z, z_star, atol=1e-8)


def test_picard_divergence_is_reported():
    f, z0, _ = picard_divergent()
    result = picard(f, z0, tol=1e-8, max_iter=100, diverge_factor=1e3)
    assert (result.status == Status.DIVERGED).all()
    assert (result.n_iter < 100).all()


@pytest.mark.parametrize("name", FIXED_POINT)
def test_hard_sample_leaves_easy_samples_unchanged(name):
    """Convergence is per sample: one slow sample must not change the others' answers or counts."""
    n = 12
    g = torch.Generator().manual_seed(3)
    W = torch.randn(n, n, generator=g, dtype=torch.float64)
    W = W / torch.linalg.matrix_norm(W, 2)
    x = torch.randn(5, n, generator=g, dtype=torch.float64)
    scale = torch.tensor([0.3, 0.3, 0.3, 0.3, 0.97], dtype=torch.float64)[:, None]  # last one is hard

    def f(z, scale=scale, x=x):
        return torch.tanh(scale * (z @ W.T) + x)

    easy = solve(lambda z: f(z, scale[:4], x[:4]), torch.zeros_like(x[:4]), name, tol=1e-9, max_iter=500)
    mixed = solve(f, torch.zeros_like(x), name, tol=1e-9, max_iter=500)
    assert mixed.converged.all()
    assert mixed.n_iter[4] > mixed.n_iter[:4].max()
    assert torch.equal(mixed.n_iter[:4], easy.n_iter)
    assert torch.allclose(mixed.z[:4], easy.z, atol=1e-13, rtol=0)


@pytest.mark.parametrize("name", FIXED_POINT)
def test_converged_mask_matches_residual(name):
    f, z0, _ = tanh_problem(batch=6)
    tol = 1e-6
    result = solve(f, z0, name, tol=tol, max_iter=4)  # too few iterations for some samples
    assert torch.equal(result.converged, result.rel_residual <= tol)
    assert torch.equal(result.status == Status.MAX_ITER, ~result.converged)
    assert (result.n_iter <= 4).all()


def test_nonfinite_sample_is_flagged_and_others_finish():
    f0, z0, z_star = linear_contraction(batch=3)

    def f(z):
        out = f0(z)
        return torch.cat([out[:1] * float("nan"), out[1:]])

    result = anderson(f, z0, tol=1e-10, max_iter=100)
    assert result.status[0] == Status.NONFINITE
    assert result.n_iter[0] == 1
    assert result.converged[1:].all()
    assert torch.allclose(result.z[1:], z_star[1:], atol=1e-8)


def test_tuple_state():
    f1, z1, s1 = linear_contraction(n=6, seed=1)
    f2, z2, s2 = linear_contraction(n=3, seed=2)
    result = anderson(lambda z: (f1(z[0]), f2(z[1][..., 0])[..., None]), (z1, z2[..., None]), tol=1e-10)
    assert isinstance(result.z, tuple)
    assert torch.allclose(result.z[0], s1, atol=1e-8)
    assert torch.allclose(result.z[1][..., 0], s2, atol=1e-8)


def test_half_precision_f_gets_float32_state():
    f, z0, z_star = linear_contraction(dtype=torch.float32)
    result = anderson(lambda z: f(z.float()).to(torch.bfloat16), z0.to(torch.bfloat16), tol=1e-2, max_iter=50)
    assert result.z.dtype == torch.bfloat16
    assert result.residual.dtype == torch.float32
    assert torch.allclose(result.z.float(), z_star, atol=0.1)


@pytest.mark.parametrize("name", FIXED_POINT)
def test_solvers_run_under_autocast(name):
    """Mixed-precision training calls the solver inside autocast: f runs in bfloat16 there, but the
    solver's own bookkeeping (Gram matrices, small linear solves) must stay in the state's float32."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 16)
    with torch.no_grad():
        lin.weight.mul_(0.3)
    z0 = torch.zeros(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = get_solver(name)(lambda z: torch.tanh(lin(z)), z0, tol=1e-2, max_iter=40)
    assert result.z.dtype == torch.float32
    assert bool(result.converged.all())
    exact = get_solver(name)(lambda z: torch.tanh(lin(z)), z0, tol=1e-6, max_iter=100).z
    assert float((result.z - exact).abs().max()) < 0.05  # bfloat16 f, so agreement to its precision


@pytest.mark.parametrize("name", FIXED_POINT)
def test_trace_records_residual_per_iteration(name):
    f, z0, _ = tanh_problem()
    result = solve(f, z0, name, tol=1e-10, max_iter=100, trace=True, check_every=3)
    assert result.trace.shape[1] == 4
    assert result.trace.shape[0] >= int(result.n_iter.max())
    assert torch.allclose(result.trace[result.n_iter - 1, torch.arange(4)], result.rel_residual)


def test_check_every_does_not_change_the_answer():
    f, z0, _ = tanh_problem()
    a = anderson(f, z0, tol=1e-10, check_every=1)
    b = anderson(f, z0, tol=1e-10, check_every=7)
    assert torch.equal(a.n_iter, b.n_iter)
    assert torch.equal(a.z, b.z)


def test_registry_and_errors():
    with pytest.raises(ValueError, match="Unknown solver"):
        get_solver("newton_raphson")
    with pytest.raises(ValueError, match="stop_mode"):
        anderson(lambda z: z, torch.zeros(2, 3), stop_mode="max")
    with pytest.raises(ValueError, match="max_iter"):
        picard(lambda z: z, torch.zeros(2, 3), max_iter=0)
    with pytest.raises(ValueError, match="batch"):
        picard(lambda z: z, torch.tensor(1.0))
    with pytest.raises(ValueError, match="damping"):
        picard(lambda z: z, torch.zeros(2, 3), damping=1.5)
    with pytest.raises(ValueError, match="history"):
        anderson(lambda z: z, torch.zeros(2, 3), m=0)
    register_solver("my_picard", lambda f, z0, **kw: picard(f, z0, damping=0.5, **kw))
    try:
        f, z0, z_star = linear_contraction()
        assert torch.allclose(solve(f, z0, "my_picard", tol=1e-10, max_iter=300).z, z_star, atol=1e-8)
    finally:
        SOLVERS.pop("my_picard")
    assert broyden  # exported


def test_unroll_matches_the_closed_form_and_its_gradient():
    """z_k = a z_{k-1} + b, K times: z_K = a^K z0 + b (1 - a^K) / (1 - a), dz_K/dz0 = a^K."""
    a, b, K = 0.7, torch.tensor([[0.5, -1.0, 2.0]], dtype=torch.float64), 6
    z0 = torch.tensor([[1.0, 2.0, -3.0], [0.0, 0.1, 0.2]], dtype=torch.float64, requires_grad=True)
    result = unroll(lambda z: a * z + b, z0, max_iter=K, iterates=True)
    torch.testing.assert_close(result.z, a ** K * z0 + b * (1 - a ** K) / (1 - a))
    (grad,) = torch.autograd.grad(result.z.sum(), z0)
    torch.testing.assert_close(grad, torch.full_like(z0, a ** K))
    steps = result.stats["iterates"]
    assert len(steps) == K and steps[-1] is result.z
    torch.testing.assert_close(result.residual, (steps[-1] - steps[-2]).norm(dim=1).detach())
    assert (result.n_iter == K).all() and not result.converged.any()
    assert (result.status == Status.MAX_ITER).all()


def test_unroll_marks_converged_samples_but_never_stops_early():
    calls = []

    def f(z):  # fixed point 2
        calls.append(1)
        return 0.5 * z + 1.0

    result = unroll(f, torch.tensor([[2.0], [1000.0]]), max_iter=5, tol=1e-3)
    assert len(calls) == 5  # a converged sample does not end the loop: the depth is the architecture
    assert result.converged.tolist() == [True, False]
    assert result.status.tolist() == [int(Status.CONVERGED), int(Status.MAX_ITER)]
    nan = unroll(f, torch.tensor([[2.0], [float("nan")]]), max_iter=3, tol=1e-3)
    assert nan.status.tolist() == [int(Status.CONVERGED), int(Status.NONFINITE)]
    with pytest.raises(ValueError, match="max_iter"):
        unroll(f, torch.zeros(1, 1), max_iter=0)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("clang++") is None,
                    reason="torch.compile on the CPU needs a C++ compiler")
def test_a_cached_solver_loop_is_reused_for_its_function_and_dropped_with_it():
    """``compile=True`` (like ``graph=True`` on a GPU) caches the loop on ``f``: a second solve reuses it,
    and once the caller lets go of ``f`` the loop goes too (it must not keep its own key alive)."""
    import gc

    from implicit.solvers._loop import _LOOP_CACHE

    cached_before = len(_LOOP_CACHE)
    W = 0.5 * torch.eye(6)
    z0 = torch.randn(3, 6, generator=torch.Generator().manual_seed(0))
    f = lambda z: torch.tanh(z @ W + 1.0)  # noqa: E731 - a fresh function object, as a caller's would be
    first = picard(f, z0, tol=1e-6, max_iter=60, compile=True)
    again = picard(f, 2 * z0, tol=1e-6, max_iter=60, compile=True)
    eager = picard(f, 2 * z0, tol=1e-6, max_iter=60)
    assert len(_LOOP_CACHE[f]) == 1 and bool(first.converged.all())
    torch.testing.assert_close(again.z, eager.z)
    key = weakref.ref(f)
    del f
    gc.collect()
    assert key() is None and len(_LOOP_CACHE) == cached_before


def test_unroll_checkpoint_same_iterates_and_gradient_one_state_kept_per_iteration():
    """``unroll(checkpoint=True)`` recomputes ``f`` in the backward: the same ``z_K`` and gradient, while
    autograd keeps one state per iteration (without it, every activation of every application)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 16)).double()
    x = torch.randn(8, 16, dtype=torch.float64)

    def run(checkpoint: bool, k: int):
        saved, z = saved_for_backward_bytes(lambda: unroll(lambda z: 0.5 * torch.tanh(net(z)) + x, torch.zeros_like(x),
                                                           max_iter=k, checkpoint=checkpoint).z)
        return saved, z, torch.autograd.grad(z.square().sum(), list(net.parameters()))

    state = x.numel() * x.element_size()
    full8, z_full, g_full = run(False, 8)
    ck8, z_ck, g_ck = run(True, 8)
    ck16, _, _ = run(True, 16)
    torch.testing.assert_close(z_ck, z_full, rtol=0, atol=0)
    for a, b in zip(g_ck, g_full):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert ck16 - ck8 == 8 * state  # one state per extra iteration
    assert full8 > 4 * ck8
    with torch.no_grad():  # no autograd: nothing to recompute, the plain loop
        torch.testing.assert_close(unroll(lambda z: 0.5 * torch.tanh(net(z)) + x, torch.zeros_like(x), max_iter=8,
                                          checkpoint=True).z, z_full.detach())
