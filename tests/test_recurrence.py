"""The parallel-in-time recurrence solver: known solutions, every method, gradients, checks."""

import pytest
import torch

from implicit.solvers import Status, rollout, solve_recurrence

METHODS = ["picard", "anderson", "window"]


def linear_step(n=6, dtype=torch.float64, seed=0):
    """``x_{k+1} = A_k x_k + b_k``: the trajectory is known in closed form by rolling out."""
    g = torch.Generator().manual_seed(seed)
    K = 20
    A = torch.randn(K, n, n, generator=g, dtype=dtype)
    A = 0.9 * A / torch.linalg.matrix_norm(A, 2)[:, None, None]
    b = torch.randn(K, n, generator=g, dtype=dtype)

    def step(x, k):
        return torch.einsum("nij,nj->ni", A[k], x) + b[k]

    return step, K


def tanh_step(theta):
    def step(x, k):
        return torch.tanh(x @ theta.T + 0.1 * k[:, None].to(x.dtype)) + 0.5 * x
    return step


def closed_form(step, x0, K):
    xs, x = [], x0
    for k in range(K):
        x = step(x, torch.full((x0.shape[0],), k))
        xs.append(x)
    return torch.stack(xs, 1)


@pytest.mark.parametrize("method", METHODS)
def test_linear_recurrence_known_solution(method):
    step, K = linear_step()
    x0 = torch.randn(3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    exact = closed_form(step, x0, K)
    result = solve_recurrence(step, x0, K, method=method, tol=1e-12, window=5)
    assert result.z.shape == (3, K, 6)
    assert result.converged.all() and (result.status == Status.CONVERGED).all()
    torch.testing.assert_close(result.z, exact, atol=1e-10, rtol=0)
    assert (result.stats["rounds"] <= 2 * K + 10).all()
    assert result.stats["states_per_round"] == (5 if method == "window" else K)


def test_rollout_matches_and_contracting_steps_finish_early():
    theta = torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 0.3
    x0 = torch.randn(2, 4, dtype=torch.float64)
    K = 40

    def step(x, k):  # Lipschitz about 0.25: Picard errors shrink 4x per sweep
        return 0.2 * torch.tanh(x @ theta.T + 0.1 * k[:, None].to(x.dtype)) + 0.1 * x

    exact = rollout(step, x0, K)
    torch.testing.assert_close(exact, closed_form(step, x0, K))
    with torch.no_grad():
        for method in METHODS:
            r = solve_recurrence(step, x0, K, method=method, tol=1e-10, window=10)
            torch.testing.assert_close(r.z, exact, atol=1e-8, rtol=0)
            assert r.n_iter.max() < (K if method == "window" else K // 2), method


def test_window_advances_past_converged_steps_and_chunking_is_exact():
    theta = torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 0.3
    step = tanh_step(theta)
    x0 = torch.randn(3, 4, dtype=torch.float64)
    K = 30
    exact = rollout(step, x0, K)
    win = solve_recurrence(step, x0, K, method="window", window=8, tol=1e-11, chunk=5)
    torch.testing.assert_close(win.z, exact, atol=1e-9, rtol=0)
    assert (win.n_iter <= K + 1).all()
    calls = []

    def counting(x, k):
        calls.append(x.shape[0])
        return step(x, k)

    solve_recurrence(counting, x0, K, method="picard", tol=1e-11, chunk=7, max_iter=2)
    assert max(calls) == 7


def test_per_step_inputs_are_gathered_per_row():
    K, B = 12, 3
    noise = torch.randn(B, K, 2, dtype=torch.float64)

    def step(x, k, u):
        return 0.8 * x + u + 0.01 * k[:, None]

    x0 = torch.randn(B, 2, dtype=torch.float64)
    exact = rollout(step, x0, K, inputs=noise)
    for method in METHODS:
        r = solve_recurrence(step, x0, K, method=method, inputs=noise, tol=1e-12, window=4, max_iter=100)
        torch.testing.assert_close(r.z, exact, atol=1e-10, rtol=0)


@pytest.mark.parametrize("backward", ["ift", "unrolled"])
def test_implicit_gradient_equals_backprop_through_rollout(backward):
    g = torch.Generator().manual_seed(4)
    theta = (0.3 * torch.randn(4, 4, dtype=torch.float64, generator=g)).requires_grad_()
    x0 = torch.randn(2, 4, dtype=torch.float64, generator=g).requires_grad_()
    K = 15
    w = torch.randn(2, K, 4, dtype=torch.float64, generator=g)

    ref = (rollout(tanh_step(theta), x0, K) * w).sum()
    gt, gx = torch.autograd.grad(ref, (theta, x0))
    opts = {"tol": 1e-12} if backward == "ift" else {"steps": K + 1}
    r = solve_recurrence(tanh_step(theta), x0, K, method="picard", tol=1e-12, backward=backward,
                         backward_options=opts)
    it, ix = torch.autograd.grad((r.z * w).sum(), (theta, x0))
    torch.testing.assert_close(it, gt, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(ix, gx, atol=1e-9, rtol=1e-9)


def test_gradcheck_through_the_solve():
    K = 6

    def fn(x0, theta):
        return solve_recurrence(tanh_step(theta), x0, K, method="picard", tol=1e-13,
                                backward_options={"tol": 1e-13}).z

    x0 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    theta = (0.3 * torch.randn(3, 3, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(fn, (x0, theta), atol=1e-6)


@pytest.mark.parametrize("backward", ["jfb", "phantom"])
def test_cheap_gradients_flow(backward):
    theta = (0.3 * torch.randn(4, 4)).requires_grad_()
    x0 = torch.randn(2, 4, requires_grad=True)
    r = solve_recurrence(tanh_step(theta), x0, 10, backward=backward)
    r.z[:, -1].sum().backward()
    assert torch.isfinite(theta.grad).all() and theta.grad.abs().sum() > 0


def test_no_graph_without_autograd_or_backward():
    theta = (0.3 * torch.randn(4, 4)).requires_grad_()
    x0 = torch.randn(2, 4)
    assert not solve_recurrence(tanh_step(theta), x0, 5, backward=None).z.requires_grad
    with torch.no_grad():
        assert not solve_recurrence(tanh_step(theta), x0, 5).z.requires_grad


def test_max_iter_and_nan_are_reported():
    theta = 0.3 * torch.randn(4, 4, dtype=torch.float64)
    x0 = torch.randn(2, 4, dtype=torch.float64)
    r = solve_recurrence(tanh_step(theta), x0, 30, method="picard", tol=1e-12, max_iter=3)
    assert (r.status == Status.MAX_ITER).all() and not r.converged.any()
    w = solve_recurrence(tanh_step(theta), x0, 30, method="window", window=4, tol=1e-12, max_iter=3)
    assert not w.converged.any()

    def bad(x, k):
        return torch.where(k[:, None] == 3, float("nan"), x * 0.5)

    r = solve_recurrence(bad, x0, 8, method="window", window=8)
    assert (r.status == Status.NONFINITE).all()


def test_input_checks_name_the_problem():
    x0 = torch.randn(2, 3)
    step = lambda x, k: x  # noqa: E731
    with pytest.raises(ValueError, match="Unknown recurrence method"):
        solve_recurrence(step, x0, 4, method="gauss_seidel")
    with pytest.raises(ValueError, match="n_steps"):
        solve_recurrence(step, x0, 0)
    with pytest.raises(ValueError, match="inputs must have shape"):
        solve_recurrence(step, x0, 4, inputs=torch.zeros(2, 3, 3))
    with pytest.raises(ValueError, match="init must have shape"):
        solve_recurrence(step, x0, 4, init=torch.zeros(2, 4, 2))
    with pytest.raises(ValueError, match="unexpected options"):
        solve_recurrence(step, x0, 4, method="picard", m=3)


# The compact window (window-sized buffers, optionally CUDA-graphed rounds) and per-step tolerances.

def _smooth_step(n=4, seed=6):
    """A near-identity step with a state-dependent coefficient: ``x + h (tanh(x W) - x)``."""
    W = 0.5 * torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))

    def step(x, k, u=None):
        out = x + 0.05 * (torch.tanh(x @ W.T + 0.02 * k[:, None].to(x.dtype)) - x)
        return out if u is None else out + 0.01 * u

    return step


@pytest.mark.parametrize("linear", [None, 0.95])
@pytest.mark.parametrize("fill", [True, False])
@pytest.mark.parametrize("with_inputs", [False, True])
def test_compact_window_equals_the_shared_loop_window(linear, fill, with_inputs):
    step, K, B = _smooth_step(), 40, 3
    g = torch.Generator().manual_seed(7)
    x0 = torch.randn(B, 4, dtype=torch.float64, generator=g)
    u = torch.randn(B, K, 4, dtype=torch.float64, generator=g) if with_inputs else None
    opts = dict(method="window", window=6, tol=1e-7, fill=fill, linear=linear, inputs=u, backward=None)
    loop = solve_recurrence(step, x0, K, **opts)
    compact = solve_recurrence(step, x0, K, compact=True, **opts)
    graph_on_cpu = solve_recurrence(step, x0, K, compact=True, graph=True, **opts)  # falls back to eager
    assert compact.converged.all() and (compact.status == Status.CONVERGED).all()
    torch.testing.assert_close(compact.z, loop.z, atol=1e-13, rtol=0)  # same rounds, to rounding
    assert torch.equal(graph_on_cpu.z, compact.z)
    # the shared loop spends one more round verifying the finished trajectory
    assert torch.equal(compact.n_iter, loop.n_iter - 1)
    assert torch.equal(compact.stats["step_evaluations"], 6 * compact.n_iter)
    torch.testing.assert_close(compact.z, rollout(step, x0, K, inputs=u), atol=1e-5, rtol=0)


def test_compact_window_anchored_form_and_status():
    step, K = _smooth_step(), 30
    x0 = torch.randn(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(8))

    def step_with_a(x, k):  # returns (x_next, a): the anchored form of linear="step"
        return step(x, k), torch.full_like(x, 0.95)

    loop = solve_recurrence(step_with_a, x0, K, method="window", window=8, tol=1e-9, linear="step", backward=None)
    compact = solve_recurrence(step_with_a, x0, K, method="window", window=8, tol=1e-9, linear="step",
                               compact=True, backward=None)
    torch.testing.assert_close(compact.z, loop.z, atol=1e-13, rtol=0)
    torch.testing.assert_close(compact.z, rollout(step, x0, K), atol=1e-7, rtol=0)
    short = solve_recurrence(step, x0, K, method="window", window=4, tol=1e-12, compact=True, max_iter=3)
    assert (short.status == Status.MAX_ITER).all() and (short.n_iter == 3).all()

    def bad(x, k):
        return torch.where(k[:, None] == 3, float("nan"), x * 0.5)

    assert (solve_recurrence(bad, x0, 8, method="window", compact=True).status == Status.NONFINITE).all()


def test_compact_window_gradients_match_the_loop_window():
    theta = (0.3 * torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(9)))
    theta.requires_grad_()
    x0 = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    grads = []
    for compact in (False, True):
        r = solve_recurrence(tanh_step(theta), x0, 12, method="window", window=5, tol=1e-12, compact=compact,
                             backward_options={"tol": 1e-13})
        grads.append(torch.autograd.grad(r.z[:, -1].sum(), (theta, x0)))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


@pytest.mark.parametrize("compact", [False, True])
def test_per_step_tolerance_scales_each_state(compact):
    step, K = _smooth_step(), 60
    x0 = torch.randn(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    exact = rollout(step, x0, K)
    opts = dict(method="window", window=8, stop_mode="abs", linear=0.95, compact=compact, backward=None)
    plain = solve_recurrence(step, x0, K, tol=1e-6, **opts)
    ones = solve_recurrence(step, x0, K, tol=1e-6, tol_scale=torch.ones(K), **opts)
    assert torch.equal(ones.z, plain.z) and torch.equal(ones.n_iter, plain.n_iter)
    # loose early, tight late: the window slides faster, and the end of the chain stays accurate
    scale = torch.logspace(4, 0, K, dtype=torch.float64)
    scaled = solve_recurrence(step, x0, K, tol=1e-6, tol_scale=scale, **opts)
    assert scaled.converged.all()
    assert (scaled.n_iter < plain.n_iter).all()
    assert (scaled.z - exact).abs().max() > 10 * (plain.z - exact).abs().max()  # the looser states are used
    tight = solve_recurrence(step, x0, K, tol=1e-10, tol_scale=scale, **opts)
    assert (tight.z - exact).abs().max() < 1e-6
    per_sample = solve_recurrence(step, x0, K, tol=1e-6, tol_scale=torch.stack([scale, torch.ones(K)]), **opts)
    assert torch.equal(per_sample.z[0], scaled.z[0]) and torch.equal(per_sample.z[1], plain.z[1])


def test_window_options_are_checked():
    x0 = torch.randn(2, 3)
    step = lambda x, k: x  # noqa: E731
    with pytest.raises(ValueError, match='method="window" only'):
        solve_recurrence(step, x0, 4, method="picard", tol_scale=torch.ones(4))
    with pytest.raises(ValueError, match='method="window" only'):
        solve_recurrence(step, x0, 4, method="anderson", compact=True)
    with pytest.raises(ValueError, match="tol_scale must have shape"):
        solve_recurrence(step, x0, 4, method="window", tol_scale=torch.ones(5))
    with pytest.raises(ValueError, match="non-negative"):
        solve_recurrence(step, x0, 4, method="window", tol_scale=-torch.ones(4))
    with pytest.raises(ValueError, match="trace"):
        solve_recurrence(step, x0, 4, method="window", compact=True, trace=True)
