"""The DEQ layer: implicit gradients, failure reporting, warm starts, regularisation, torchdeq interop."""

import warnings
import weakref

import pytest
import torch
from problems import TanhLayer

from implicit.analysis import plot_residual_traces, spectral_radius
from implicit.deq import DEQ, jacobian_frobenius
from implicit.solvers import NonConvergenceWarning, NonFiniteError, anderson


def unrolled_reference(layer, x, steps=400):
    z = torch.zeros_like(x)
    for _ in range(steps):
        z = layer(z, x)
    return z


@pytest.fixture
def layer_and_x():
    layer = TanhLayer(n=6)
    x = torch.randn(3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(5), requires_grad=True)
    return layer, x


def exact_deq(layer, solver="anderson"):
    return DEQ(layer, solver=solver, tol=1e-12, max_iter=300,
               backward_options={"tol": 1e-12, "max_iter": 300, "solver": solver})


@pytest.mark.parametrize("solver", ["anderson", "broyden", "picard"])
def test_ift_gradient_passes_gradcheck(layer_and_x, solver):
    layer, x = layer_and_x
    deq = exact_deq(layer, solver)
    assert torch.autograd.gradcheck(lambda x, W: deq(x)[0], (x, layer.W), eps=1e-6, atol=1e-7)


def test_ift_gradient_equals_unrolled_autograd(layer_and_x):
    layer, x = layer_and_x
    z, _ = exact_deq(layer)(x)
    grads = torch.autograd.grad(z.sin().sum(), (x, layer.W, layer.U, layer.c))
    ref = torch.autograd.grad(unrolled_reference(layer, x).sin().sum(), (x, layer.W, layer.U, layer.c))
    for g, r in zip(grads, ref):
        assert torch.allclose(g, r, atol=1e-6, rtol=0)


class RecordingLayer(torch.nn.Module):
    """The layer, keeping a weak reference to every output it returns."""

    def __init__(self, layer):
        super().__init__()
        self.layer, self.outputs = layer, []

    def forward(self, z, x):
        out = self.layer(z, x)
        self.outputs.append(weakref.ref(out))
        return out


def test_ift_backward_frees_its_graph_at_once(layer_and_x):
    """After a training step nothing holds the tensors of the implicit backward (the graph of ``f`` and
    the adjoint solve's state), so reference counting frees them at once. A reference cycle (a hook on
    a tensor that refers to that tensor; a solver loop holding its own bound method) kept them until
    Python's cyclic collector ran, or for good, and FNO-DEQ training ran out of GPU memory that way."""
    import gc

    layer, x = layer_and_x
    recording = RecordingLayer(layer)
    deq = exact_deq(recording)
    gc.disable()  # only reference counting frees anything below
    try:
        for _ in range(3):  # a few training steps
            z, result = deq(x)
            z.sin().sum().backward()
        del z, result
        alive = [ref for ref in recording.outputs if ref() is not None]
    finally:
        gc.enable()
    assert len(recording.outputs) > 30 and alive == []
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("backward", ["phantom", "jfb", "unrolled"])
def test_inexact_gradients_point_the_right_way(layer_and_x, backward):
    layer, x = layer_and_x
    z, _ = DEQ(layer, tol=1e-12, max_iter=300, backward=backward)(x)
    (g,) = torch.autograd.grad(z.sin().sum(), layer.W)
    (ref,) = torch.autograd.grad(unrolled_reference(layer, x).sin().sum(), layer.W)
    assert torch.nn.functional.cosine_similarity(g.flatten(), ref.flatten(), dim=0) > 0.5


def test_unrolled_many_steps_equals_exact(layer_and_x):
    layer, x = layer_and_x
    z, _ = DEQ(layer, tol=1e-12, max_iter=300, backward="unrolled", backward_options={"steps": 200})(x)
    (g,) = torch.autograd.grad(z.sin().sum(), layer.W)
    (ref,) = torch.autograd.grad(unrolled_reference(layer, x).sin().sum(), layer.W)
    assert torch.allclose(g, ref, atol=1e-10)


def test_bptt_trains_through_k_iterations_from_z0_and_solves_in_eval(layer_and_x):
    """backward="bptt": in training, exactly K plain iterations from z0 with autograd through all of
    them (not the fixed point: K is small); in eval, the solver's fixed point."""
    layer, x = layer_and_x
    deq = DEQ(layer, tol=1e-12, max_iter=300, backward="bptt")
    z, result = deq(x, max_iter=3)
    ref = unrolled_reference(layer, x, steps=3)
    assert torch.equal(z, ref) and result.n_iter.eq(3).all()
    grads = torch.autograd.grad(z.sin().sum(), (x, layer.W))
    for g, r in zip(grads, torch.autograd.grad(ref.sin().sum(), (x, layer.W))):
        assert torch.allclose(g, r, atol=1e-14, rtol=0)
    z_star = unrolled_reference(layer, x)
    assert (z - z_star).abs().max() > 1e-3  # three iterations are not the equilibrium
    deq.eval()
    z_eval, result = deq(x)
    assert result.converged.all() and torch.allclose(z_eval, z_star, atol=1e-10)
    x_nan = x.detach().clone()
    x_nan[2, 0] = float("nan")
    deq.train()
    with pytest.raises(NonFiniteError, match=r"sample\(s\) \[2\].*bptt"):
        deq(x_nan, max_iter=3)


def test_forward_is_a_fixed_point(layer_and_x):
    layer, x = layer_and_x
    z, result = exact_deq(layer)(x)
    assert result.converged.all()
    assert torch.allclose(layer(z, x), z, atol=1e-11)


def test_nan_input_raises_clear_error(layer_and_x):
    layer, x = layer_and_x
    x = x.detach().clone()
    x[1, 2] = float("nan")
    with pytest.raises(NonFiniteError, match=r"TanhLayer.*sample\(s\) \[1\].*iteration\(s\) \[1\]"):
        DEQ(layer)(x)


def test_non_convergence_warns_once_and_strict_raises(layer_and_x):
    layer, x = layer_and_x
    deq = DEQ(layer, tol=1e-14, max_iter=2)
    with pytest.warns(NonConvergenceWarning, match="stopped above tol"):
        deq(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        deq(x)  # second time: silent
    with pytest.raises(RuntimeError, match="stopped above tol"):
        DEQ(layer, tol=1e-14, max_iter=2, strict=True)(x)


def test_warm_start_needs_fewer_iterations(layer_and_x):
    layer, x = layer_and_x
    deq = DEQ(layer, tol=1e-10, max_iter=100)
    with torch.no_grad():
        z, cold = deq(x)
        _, warm = deq(x + 1e-4, z0=z)
    assert (warm.n_iter < cold.n_iter).all()


def test_jacobian_regulariser_matches_dense_frobenius(layer_and_x):
    layer, x = layer_and_x
    x = x.detach()
    z, _ = exact_deq(layer)(x)
    z = z.detach()
    J = torch.func.vmap(torch.func.jacrev(lambda zi, xi: layer(zi[None], xi[None])[0]))(z, x)
    exact = J.pow(2).sum() / z.numel()
    torch.manual_seed(0)
    estimate = jacobian_frobenius(lambda v: layer(v, x), z, samples=2000)
    assert torch.allclose(estimate, exact, rtol=0.1)
    deq = DEQ(layer, tol=1e-10, max_iter=100, jac_reg_samples=1)
    _, result = deq(x)
    assert result.stats["jac_loss"].requires_grad


@pytest.mark.parametrize("norm", ["weight_norm", "spectral_norm"])
def test_torchdeq_norms_apply(norm):
    from torch import nn

    class Cell(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 5)

        def forward(self, z, x):
            return torch.tanh(0.5 * self.lin(z) + x)

    deq = DEQ(Cell(), norm=norm, tol=1e-8, max_iter=100)
    z, result = deq(torch.randn(2, 5))
    assert result.converged.all()
    z.sum().backward()
    assert any(p.grad is not None for p in deq.parameters())
    with pytest.raises(ValueError, match="norm"):
        DEQ(Cell(), norm="batch_norm")


def test_spectral_radius_of_linear_map():
    eigs = torch.tensor([0.9, -0.5, 0.3, 0.1], dtype=torch.float64)
    Q, _ = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    A = Q @ torch.diag(eigs) @ Q.T
    rho = spectral_radius(lambda z: z @ A.T, torch.zeros(3, 4, dtype=torch.float64), n_iter=200)
    assert torch.allclose(rho, torch.full((3,), 0.9, dtype=torch.float64), atol=1e-6)


def test_residual_plot(tmp_path, layer_and_x):
    layer, x = layer_and_x
    result = anderson(lambda z: layer(z, x), torch.zeros_like(x), tol=1e-10, trace=True)
    plot_residual_traces({"anderson": result}, tmp_path / "trace.png")
    assert (tmp_path / "trace.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="trace=True"):
        plot_residual_traces({"x": anderson(lambda z: layer(z, x), torch.zeros_like(x))})


def test_torchdeq_get_deq_runs_with_our_solvers():
    from torchdeq import get_deq

    from implicit.solvers._torchdeq import register_with_torchdeq

    names = register_with_torchdeq()
    layer = TanhLayer(n=6, dtype=torch.float32)
    x = torch.randn(3, 6)
    for name in names:
        deq = get_deq(f_solver=name, b_solver=name, f_max_iter=100, f_tol=1e-6, ift=True)
        z_list, info = deq(lambda z: layer(z, x), torch.zeros(3, 6))
        z = z_list[-1]
        assert (info["abs_lowest"] <= 1e-5).all()
        assert torch.allclose(layer(z, x), z, atol=1e-5)
        layer.zero_grad()
        z.sum().backward()
        assert layer.W.grad is not None and torch.isfinite(layer.W.grad).all()


def test_deq_copy_does_not_share_the_graph_inputs_of_the_original():
    """A deep copy of a DEQ (an EMA model) must not call the original's layer through the static
    inputs ``graph=True`` keeps (they are CUDA-only, so one is planted here by hand)."""
    import copy

    from implicit.deq import DEQ

    layer = torch.nn.Linear(3, 3)
    deq = DEQ(lambda z, x: torch.tanh(layer(z) + x), solver_options={"graph": True})
    static = torch.zeros(2, 3)
    deq._graph_inputs[((2, 3), torch.float32, static.device)] = (static, lambda z: deq.f(z, static))
    clone = copy.deepcopy(deq)
    assert clone._graph_inputs == {} and len(deq._graph_inputs) == 1
    assert clone.solver_options == {"graph": True}
