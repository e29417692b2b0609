"""Neural ODE/SDE trajectories solved in parallel equal the sequential torchdiffeq/torchsde ones."""

import pytest
import torch
import torchsde
from torchdiffeq import odeint

from implicit.ode import (
    NeuralODE,
    NeuralSDE,
    brownian_increments,
    odeint_parallel,
    odeint_sequential,
    sdeint_parallel,
    sdeint_sequential,
)
from implicit.ode.models import MLPField
from implicit.solvers import NonFiniteError


def mlp_field(dtype, seed=0):
    torch.manual_seed(seed)
    return MLPField(4, 32, time=True).to(dtype)


def stiffish_linear(dtype):
    """dy/dt = A y with eigenvalues from -20 to -0.5 (stiff-ish for rk4 with dt = 0.02)."""
    Q, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(0), dtype=dtype))
    A = Q @ torch.diag(torch.tensor([-20.0, -5.0, -1.0, -0.5], dtype=dtype)) @ Q.T
    return lambda t, y: y @ A.T


@pytest.mark.parametrize("method", ["rk4", "euler"])
@pytest.mark.parametrize("solver", ["newton", "picard", "window"])
@pytest.mark.parametrize("dtype,tol,atol", [(torch.float32, 1e-7, 1e-5), (torch.float64, 1e-13, 1e-10)])
@pytest.mark.parametrize("problem", ["mlp", "linear"])
def test_parallel_equals_torchdiffeq(method, solver, dtype, tol, atol, problem):
    func = mlp_field(dtype) if problem == "mlp" else stiffish_linear(dtype)
    y0 = torch.randn(3, 4, generator=torch.Generator().manual_seed(1)).to(dtype)
    t = torch.linspace(0, 1, 51, dtype=dtype)
    with torch.no_grad():
        ref = odeint(func, y0, t, method=method)
        ys, result = odeint_parallel(func, y0, t, method=method, solver=solver, tol=tol, check_every=1)
    assert result.converged.all()
    assert torch.allclose(ys, ref, atol=atol, rtol=0)
    if solver == "newton":
        assert result.n_iter.max() <= 10  # a handful of rounds, not one per step


def test_anderson_solver_also_matches():
    func = mlp_field(torch.float64)
    y0 = torch.randn(2, 4, dtype=torch.float64)
    t = torch.linspace(0, 1, 21, dtype=torch.float64)
    with torch.no_grad():
        ys, result = odeint_parallel(func, y0, t, solver="anderson", tol=1e-13, max_iter=200)
    assert torch.allclose(ys, odeint(func, y0, t, method="rk4"), atol=1e-10)


@pytest.mark.parametrize("backward", ["ift"])
def test_trajectory_gradients_equal_sequential_autograd(backward):
    func = mlp_field(torch.float64)
    y0 = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    t = torch.linspace(0, 1, 31, dtype=torch.float64)
    ys, _ = odeint_parallel(func, y0, t, tol=1e-13, check_every=1, backward=backward,
                            backward_options={"tol": 1e-13})
    params = (y0, *func.parameters())
    grads = torch.autograd.grad(ys[1:].sin().sum(), params)
    ref = torch.autograd.grad(odeint(func, y0, t, method="rk4")[1:].sin().sum(), params)
    for g, r in zip(grads, ref):
        assert torch.allclose(g, r, atol=1e-9, rtol=1e-7)


def test_jfb_gradient_is_a_descent_direction():
    func = mlp_field(torch.float64)
    y0 = torch.randn(2, 4, dtype=torch.float64)
    t = torch.linspace(0, 1, 31, dtype=torch.float64)
    ys, _ = odeint_parallel(func, y0, t, tol=1e-13, backward="jfb")
    g = torch.autograd.grad(ys[-1].sum(), func.net[0].weight)[0]
    ref = torch.autograd.grad(odeint(func, y0, t, method="rk4")[-1].sum(), func.net[0].weight)[0]
    assert torch.nn.functional.cosine_similarity(g.flatten(), ref.flatten(), dim=0) > 0


def test_sde_parallel_equals_torchsde_euler_maruyama():
    torch.manual_seed(0)
    drift = MLPField(3, 16).double()
    diffusion = lambda t, y: 0.3 * torch.sigmoid(y)  # noqa: E731
    y0 = torch.randn(4, 3, dtype=torch.float64)
    t = torch.linspace(0, 1, 41, dtype=torch.float64)
    bm = torchsde.BrownianInterval(t0=0.0, t1=1.0, size=(4, 3), dtype=torch.float64, entropy=7)
    with torch.no_grad():
        ref = sdeint_sequential(drift, diffusion, y0, t, bm)
        ys, result = sdeint_parallel(drift, diffusion, y0, t, brownian_increments(bm, t), tol=1e-13, check_every=1)
    assert result.converged.all()
    assert torch.allclose(ys, ref, atol=1e-10)


def test_modules_switch_between_sequential_and_parallel():
    torch.manual_seed(0)
    ode = NeuralODE(MLPField(4, 16).double(), tol=1e-12)
    y0 = torch.randn(2, 4, dtype=torch.float64)
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(ode(y0, t, mode="parallel"), ode(y0, t, mode="sequential"), atol=1e-10)
        assert torch.allclose(ode(y0, t, mode="graph"), ode(y0, t, mode="sequential"))  # CPU: plain loop
    sde = NeuralSDE(MLPField(4, 16).double(), lambda t, y: 0.1 * torch.ones_like(y), tol=1e-12)
    bm = torchsde.BrownianInterval(t0=0.0, t1=1.0, size=(2, 4), dtype=torch.float64, entropy=3)
    with torch.no_grad():
        assert torch.allclose(sde(y0, t, bm, mode="parallel"), sde(y0, t, bm, mode="sequential"), atol=1e-10)
    with pytest.raises(ValueError, match="mode"):
        ode(y0, t, mode="fast")


@pytest.mark.parametrize("parallel", [True, False])
def test_blow_up_names_the_step(parallel):
    func = lambda t, y: y**2  # noqa: E731  (finite-time blow-up at t = 1 / y0 = 0.5)
    y0 = torch.full((1, 1), 2.0, dtype=torch.float64)
    t = torch.linspace(0, 2, 101, dtype=torch.float64)
    with pytest.raises(NonFiniteError, match=r"step \d+ \(t="):
        if parallel:
            odeint_parallel(func, y0, t, solver="picard", tol=1e-10)
        else:
            odeint_sequential(func, y0, t)


def test_bad_grid_is_rejected():
    with pytest.raises(ValueError, match="monotonic"):
        odeint_parallel(lambda t, y: y, torch.zeros(1, 2), torch.tensor([0.0, 1.0, 0.5]))
    with pytest.raises(ValueError, match="fixed-grid method"):
        odeint_parallel(lambda t, y: y, torch.zeros(1, 2), torch.linspace(0, 1, 3), method="dopri5")


def test_ode_fit_cli_lowers_loss_and_resumes(tmp_path):
    from implicit.cli import main
    from implicit.ode.fit import FitConfig, fit

    cfg = FitConfig(system="lotka_volterra", n_train=8, n_test=4, t_end=1.0, steps=10, width=16, epochs=4, batch=8)
    full = fit(cfg, tmp_path / "full")
    assert full["history"][-1]["train"] < full["history"][0]["train"]
    assert (tmp_path / "full" / "fit.png").exists()
    # resume: two epochs, then the rest, equals four in one go
    fit(FitConfig(**{**cfg.__dict__, "epochs": 2}), tmp_path / "half")
    resumed = fit(cfg, tmp_path / "half")
    assert resumed["history"] == full["history"]
    main(["ode", "fit", "--system", "ornstein_uhlenbeck", "--epochs", "1", "--steps", "8", "--out", str(tmp_path / "sde")])
    assert (tmp_path / "sde" / "checkpoint.pt").exists()
    with pytest.raises(ValueError, match="unknown config keys"):
        FitConfig.load(None, wrong=1)
    with pytest.raises(ValueError, match="sde_method"):
        FitConfig.load(None, sde_method="rk4")
    assert FitConfig.load("experiments/configs/ode_ou.toml").sde_method == "milstein"


class DiagonalMLP(torch.nn.Module):
    """A diffusion whose component i depends on y_i only (diagonal, commutative noise)."""

    def __init__(self, dim, width=8):
        super().__init__()
        self.w1 = torch.nn.Parameter(torch.randn(dim, width) / 2)
        self.b1 = torch.nn.Parameter(torch.randn(dim, width) / 2)
        self.w2 = torch.nn.Parameter(torch.randn(dim, width) / width**0.5)

    def forward(self, t, y):
        return 0.1 + 0.3 * torch.sigmoid((torch.tanh(y[..., None] * self.w1 + self.b1) * self.w2).sum(-1))


def gbm(mu=0.5, sigma=0.8):
    return (lambda t, y: mu * y), (lambda t, y: sigma * y)


@pytest.mark.parametrize("method", ["milstein", "milstein_grad_free"])
@pytest.mark.parametrize("problem", ["neural", "gbm", "neural_mixing"])
def test_sde_parallel_equals_torchsde_milstein(method, problem):
    torch.manual_seed(0)
    dim = 3
    if problem == "gbm":
        drift, diffusion = gbm()
        y0 = torch.rand(4, dim, dtype=torch.float64) + 0.5
    else:
        drift = MLPField(dim, 16).double()
        # neural_mixing: g_i depends on all of y; torchsde's vjp term is matched all the same
        diffusion = DiagonalMLP(dim).double() if problem == "neural" else (
            lambda t, y: 0.3 * torch.sigmoid(y @ torch.ones(dim, dim, dtype=y.dtype)))
        y0 = torch.randn(4, dim, dtype=torch.float64)
    t = torch.arange(33, dtype=torch.float64) / 32  # dyadic: torchsde's t + dt + ... lands on the grid exactly
    bm = torchsde.BrownianInterval(t0=0.0, t1=1.0, size=(4, dim), dtype=torch.float64, entropy=11)

    class SDE(torch.nn.Module):
        noise_type, sde_type = "diagonal", "ito"
        f, g = staticmethod(drift), staticmethod(diffusion)

    options = {"grad_free": method == "milstein_grad_free"}
    with torch.no_grad():
        ref = torchsde.sdeint(SDE(), y0, t, bm=bm, method="milstein", dt=1 / 32, options=options)
        ys, result = sdeint_parallel(drift, diffusion, y0, t, brownian_increments(bm, t), method=method,
                                     tol=1e-13, check_every=1)
        em = torchsde.sdeint(SDE(), y0, t, bm=bm, method="euler", dt=1 / 32)
        # a grid torchsde's loop does not land on exactly: sdeint_sequential steps interval by interval
        t2 = torch.linspace(0, 1, 41, dtype=torch.float64)
        seq = sdeint_sequential(drift, diffusion, y0, t2, bm, method=method)
        par, _ = sdeint_parallel(drift, diffusion, y0, t2, brownian_increments(bm, t2), method=method, tol=1e-13)
    assert result.converged.all()
    assert torch.allclose(ys, ref, atol=1e-10, rtol=0)
    assert torch.allclose(par, seq, atol=1e-10, rtol=0)
    assert (ys - em).abs().max() > 1e-4  # the Milstein term is not zero: the test can tell it from Euler


def test_milstein_is_closer_than_euler_to_exact_gbm():
    """Strong order 1 vs 1/2: on geometric Brownian motion with its closed-form path."""
    mu, sigma = 0.5, 0.8
    drift, diffusion = gbm(mu, sigma)
    B = 256
    y0 = torch.ones(B, 1, dtype=torch.float64)
    t = torch.linspace(0, 1, 51, dtype=torch.float64)
    bm = torchsde.BrownianInterval(t0=0.0, t1=1.0, size=(B, 1), dtype=torch.float64, entropy=5)
    dW = brownian_increments(bm, t)
    exact = y0 * torch.exp((mu - sigma**2 / 2) * t[-1] + sigma * dW.sum(1))
    with torch.no_grad():
        errs = {m: (sdeint_parallel(drift, diffusion, y0, t, dW, method=m, tol=1e-13)[0][-1] - exact).abs().mean()
                for m in ("euler", "milstein")}
    assert errs["milstein"] < errs["euler"] / 3


def test_milstein_stratonovich_and_module():
    torch.manual_seed(0)
    drift, diffusion = MLPField(2, 16).double(), DiagonalMLP(2).double()
    y0 = torch.randn(3, 2, dtype=torch.float64)
    t = torch.linspace(0, 1, 21, dtype=torch.float64)
    bm = torchsde.BrownianInterval(t0=0.0, t1=1.0, size=(3, 2), dtype=torch.float64, entropy=2)
    sde = NeuralSDE(drift, diffusion, method="milstein", sde_type="stratonovich", tol=1e-13)
    with torch.no_grad():
        assert torch.allclose(sde(y0, t, bm, mode="parallel"), sde(y0, t, bm, mode="sequential"), atol=1e-10)
    # gradients through the parallel Milstein trajectory equal autograd through torchsde's
    y0.requires_grad_(True)
    sde.method, sde.sde_type = "milstein", "ito"
    params = (y0, *drift.parameters(), *diffusion.parameters())
    g = torch.autograd.grad(sde(y0, t, bm, mode="parallel").pow(2).sum(), params)
    r = torch.autograd.grad(sde(y0, t, bm, mode="sequential").pow(2).sum(), params)
    for a, b in zip(g, r):
        assert torch.allclose(a, b, atol=1e-8, rtol=1e-6)
    with pytest.raises(ValueError, match="Ito"):
        sdeint_parallel(drift, diffusion, y0, t, brownian_increments(bm, t), sde_type="stratonovich")
