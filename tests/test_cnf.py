"""FFJORD-style CNF: exact change of variables, Hutchinson unbiasedness, parallel == sequential, training."""

import math

import pytest
import torch
from torchdiffeq import odeint

from implicit.ode.cnf import CNF, toy_data, toy_log_density
from implicit.ode.models import MLPField


class LinearField(torch.nn.Module):
    def __init__(self, A):
        super().__init__()
        self.A = torch.nn.Parameter(A)

    def forward(self, t, z):
        return z @ self.A.T


def small_cnf(seed=0, **kw):
    torch.manual_seed(seed)
    return CNF(2, field=MLPField(2, 16, 2, time=True).double(), **kw)


def test_linear_field_log_density_is_analytic():
    """dz/dt = A z: x = e^A z0, so log p(x) = log N(e^{-A} x) - tr(A)."""
    A = torch.tensor([[-0.3, 0.8], [-0.5, 0.4]], dtype=torch.float64)
    cnf = CNF(2, field=LinearField(A), steps=32, trace="exact")
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    z0 = x @ torch.linalg.matrix_exp(-A).T
    ref = -0.5 * (z0**2).sum(1) - math.log(2 * math.pi) - torch.trace(A)
    with torch.no_grad():
        for mode in ("sequential", "parallel"):
            assert torch.allclose(cnf.log_prob(x, mode=mode), ref, atol=1e-7, rtol=0)


def test_exact_trace_equals_log_det_of_the_discrete_flow_map():
    """For an MLP field: the integrated trace equals log|det| of the rk4 flow map's autograd Jacobian."""
    cnf = small_cnf(steps=40, trace="exact")
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t = torch.linspace(1, 0, 41, dtype=torch.float64)

    def to_base(v):  # data -> base with the same grid and method, state only
        return odeint(cnf.field, v[None], t, method="rk4")[-1, 0]

    ref = []
    for xi in x:
        J = torch.autograd.functional.jacobian(to_base, xi)
        z0 = to_base(xi)
        ref.append(-0.5 * (z0**2).sum() - math.log(2 * math.pi) + torch.linalg.slogdet(J)[1])
    with torch.no_grad():
        lp = cnf.log_prob(x)
    assert torch.allclose(lp, torch.stack(ref), atol=1e-6, rtol=0)
    assert (lp - toy_log_density("8gaussians", x)).abs().max() > 0.1  # not trivially anything


def test_hutchinson_is_unbiased_for_the_exact_log_density():
    cnf = small_cnf(steps=8)
    x = torch.tensor([[0.3, -0.7]], dtype=torch.float64).expand(4000, 2)
    with torch.no_grad():
        exact = cnf.log_prob(x[:1], trace="exact")
        est = cnf.log_prob(x, generator=torch.Generator().manual_seed(0))
    assert est.std() > 1e-3  # a real estimator, not the exact trace
    assert (est.mean() - exact).abs() < 4 * est.std() / math.sqrt(est.numel())


@pytest.mark.parametrize("trace", ["hutchinson", "exact"])
def test_parallel_cnf_trajectory_equals_sequential(trace):
    cnf = small_cnf(steps=16, trace=trace, tol=1e-12, solver_options={"check_every": 1})
    x = toy_data("moons", 32, dtype=torch.float64)
    eps = cnf.probe(x, torch.Generator().manual_seed(3))
    with torch.no_grad():
        seq = cnf.integrate(x, reverse=True, eps=eps)
        par = cnf.integrate(x, reverse=True, mode="parallel", eps=eps)
        samples, _ = cnf.sample(8, mode="parallel", dtype=torch.float64, generator=torch.Generator().manual_seed(4))
        ref, _ = cnf.sample(8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    assert cnf.last_result.converged.all()
    assert seq.shape == par.shape == (17, 32, 5 if trace == "hutchinson" else 3)
    assert torch.allclose(par, seq, atol=1e-10, rtol=0)
    assert torch.allclose(samples, ref, atol=1e-10, rtol=0)


def test_parallel_nll_gradient_equals_sequential_autograd():
    cnf = small_cnf(steps=8, tol=1e-12)
    x = toy_data("8gaussians", 16, dtype=torch.float64)
    eps = cnf.probe(x, torch.Generator().manual_seed(0))
    params = list(cnf.parameters())
    g_par = torch.autograd.grad(-cnf.log_prob(x, mode="parallel", eps=eps).mean(), params)
    g_seq = torch.autograd.grad(-cnf.log_prob(x, eps=eps).mean(), params)
    for a, b in zip(g_par, g_seq):
        assert torch.allclose(a, b, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("mode", ["sequential", "parallel"])
def test_a_few_training_steps_lower_the_nll(mode):
    torch.manual_seed(0)
    cnf = CNF(2, 32, 2, steps=4, tol=1e-6)
    x = toy_data("8gaussians", 128, seed=1)
    opt = torch.optim.Adam(cnf.parameters(), lr=2e-2)

    def nll():
        with torch.no_grad():
            return -cnf.log_prob(x, trace="exact").mean()

    before = nll()
    for _ in range(6):
        loss = -cnf.log_prob(x, mode=mode).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert nll() < before - 0.1


def test_toy_data():
    for name in ("moons", "8gaussians", "checkerboard"):
        x = toy_data(name, 500, seed=2)
        assert x.shape == (500, 2) and torch.isfinite(x).all() and x.abs().max() < 4
        assert torch.equal(x, toy_data(name, 500, seed=2))
    # the closed-form densities are finite on their own samples and integrate to one on a grid
    for name in ("8gaussians", "checkerboard"):
        assert torch.isfinite(toy_log_density(name, toy_data(name, 500, dtype=torch.float64))).all()
        g = torch.linspace(-3.995, 3.995, 800, dtype=torch.float64)
        grid = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
        mass = toy_log_density(name, grid).exp().sum() * 0.01**2
        assert abs(float(mass) - 1) < 1e-2
    assert toy_log_density("moons", torch.zeros(1, 2)) is None
    with pytest.raises(ValueError, match="Unknown toy dataset"):
        toy_data("rings", 4)


def test_parallel_solves_reuse_one_dynamics_object_per_trace(monkeypatch):
    """The parallel solve is handed the same augmented field on every call (per trace), so its CUDA graphs,
    cached on that object with ``graph=True``, are reused; the cache adds no parameters to the model."""
    from implicit.ode import cnf as cnf_module

    seen = []
    real = cnf_module.odeint_parallel

    def recording(dyn, *args, **kwargs):
        seen.append(dyn)
        return real(dyn, *args, **kwargs)

    monkeypatch.setattr(cnf_module, "odeint_parallel", recording)
    cnf = small_cnf(steps=8, trace="exact")
    keys = set(cnf.state_dict())
    x = toy_data("moons", 4, dtype=torch.float64)
    with torch.no_grad():
        for trace in ("exact", "exact", "hutchinson", "exact"):
            cnf.integrate(x, reverse=True, mode="parallel", trace=trace)
    assert seen[0] is seen[1] is seen[3] and seen[2] is not seen[0] and seen[2].trace == "hutchinson"
    assert set(cnf.state_dict()) == keys
    cnf.field = MLPField(2, 16, 2, time=True).double()  # a new field gets a new dynamics object
    assert cnf.dynamics().field is cnf.field
