"""Steady Navier-Stokes: exact steady states recovered, stored samples satisfy the equations, baseline agrees."""

import math

import h5py
import pytest
import torch
import xarray as xr

from pde.datasets import generate_split
from pde.navier_stokes import (SpectralGrid, advection, curl, generate_chunk, integrate_to_steady,
                               linearized_advection, relative_residual, sample_forcing, solve_steady,
                               steady_residual)

pi = math.pi


def _manufactured(n: int, nu: float, b: float = 0.5):
    """w = cos(2 pi x) + b sin(4 pi y); u.grad w = 1.5 b sin(2 pi x) cos(4 pi y) by hand; f = u.grad w - nu Lap w."""
    x = torch.arange(n, dtype=torch.float64) / n
    X, Y = torch.meshgrid(x, x, indexing="ij")
    w = torch.cos(2 * pi * X) + b * torch.sin(4 * pi * Y)
    f = 1.5 * b * torch.sin(2 * pi * X) * torch.cos(4 * pi * Y) + nu * (
        4 * pi**2 * torch.cos(2 * pi * X) + 16 * pi**2 * b * torch.sin(4 * pi * Y))
    return w[None], f[None]


def test_residual_of_exact_steady_state_vanishes():
    nu = 0.02
    w, f = _manufactured(24, nu)
    grid = SpectralGrid(24)
    assert steady_residual(w, f, nu, grid).abs().max().item() < 1e-12
    assert relative_residual(w + 1e-3, f, nu, grid).item() < 1e-12  # the mean mode is not part of the equation
    assert relative_residual(1.01 * w, f, nu, grid).item() > 1e-3


def test_manufactured_steady_state_recovered():
    nu = 0.02
    w, f = _manufactured(24, nu)
    sol = solve_steady(f.repeat(2, 1, 1), nu)
    assert bool(sol.converged.all())
    assert (sol.w - w).abs().max().item() < 1e-8
    assert sol.rel_residual.max().item() <= 1e-6
    assert int(sol.newton_iterations.max()) <= 10


def test_exact_linearization_matches_forward_mode_jvp():
    """Newton-Krylov uses the hand-written N'(w) d; it must be the derivative of the advection term."""
    grid = SpectralGrid(16)
    g = torch.Generator().manual_seed(3)
    w, d = torch.randn(2, 16, 16, generator=g, dtype=torch.float64), torch.randn(2, 16, 16, generator=g, dtype=torch.float64)
    w[1], d[1] = w[1] * 3, d[1] * 0.1
    ad = torch.func.jvp(lambda z: torch.view_as_real(advection(z, grid)), (w,), (d,))[1]
    assert torch.allclose(torch.view_as_real(linearized_advection(w, grid)(d)), ad, atol=1e-10)


def test_random_forcing_solved_to_tolerance_with_adaptive_forcing():
    """Eisenstat-Walker linear tolerances and the stop on ||R|| / ||f||: same state as time stepping."""
    grid = SpectralGrid(16)
    _, _, f = sample_forcing(3, grid, kolmogorov_amplitude=0.05, perturbation_amplitude=0.05,
                             generator=torch.Generator().manual_seed(4))
    ew = solve_steady(f, 0.01, newton_tol=1e-9)
    const = solve_steady(f, 0.01, newton_tol=1e-9, forcing_mode="constant")
    assert bool(ew.converged.all()) and bool(const.converged.all())
    assert ew.rel_residual.max().item() <= 1e-9 and const.rel_residual.max().item() <= 1e-9
    assert torch.allclose(ew.w, const.w, atol=1e-8)
    assert int(ew.krylov_iterations.sum()) < int(const.krylov_iterations.sum())
    wt, rel, _ = integrate_to_steady(f, 0.01, dt=0.02, tol=1e-9, check_every=50)
    assert rel.max().item() <= 1e-9 and (wt - ew.w).abs().max().item() < 1e-6


def test_time_stepping_reaches_the_same_steady_state():
    nu = 0.1
    w, f = _manufactured(16, nu)
    wt, rel, steps = integrate_to_steady(f, nu, dt=0.02, tol=1e-7, check_every=25)
    assert rel.item() <= 1e-7 and steps < 1000
    assert (wt - w).abs().max().item() < 1e-6


def test_forcing_is_reproducible_and_divergence_free():
    grid = SpectralGrid(32)
    fx, fy, f = sample_forcing(3, grid, kolmogorov_amplitude=0.0, perturbation_amplitude=0.2,
                               generator=torch.Generator().manual_seed(5))
    fx2, _, _ = sample_forcing(3, grid, kolmogorov_amplitude=0.0, perturbation_amplitude=0.2,
                               generator=torch.Generator().manual_seed(5))
    assert torch.equal(fx, fx2)
    speed = (fx**2 + fy**2).sqrt().amax(dim=(1, 2))
    assert torch.allclose(speed, torch.full_like(speed, 0.2))
    div = torch.fft.irfft2(grid.dx * torch.fft.rfft2(fx) + grid.dy * torch.fft.rfft2(fy), s=(32, 32))
    assert div.abs().max().item() < 1e-12
    assert f.mean(dim=(1, 2)).abs().max().item() < 1e-14
    fx, fy, f = sample_forcing(1, grid, kolmogorov_amplitude=1.0, perturbation_amplitude=0.0)
    y = torch.arange(32, dtype=torch.float64) / 32
    assert torch.allclose(f[0], (-2 * pi * torch.cos(2 * pi * y)).expand(32, 32), atol=1e-10)


RECIPE = {
    "name": "ns-unit", "generator": "navier_stokes", "seed": 1, "chunk_size": 3,
    "splits": {"train": 3},
    "navier_stokes": {"resolution": 16, "viscosity": 0.01},
}


def test_stored_samples_satisfy_steady_equations(tmp_path):
    out = generate_split(RECIPE, "train", tmp_path, progress=False)
    assert out["n_samples"] == 3
    path = tmp_path / "ns-unit_train.h5"
    with h5py.File(path, "r") as f:
        w, fc = torch.as_tensor(f["vorticity"][...]), torch.as_tensor(f["forcing"][...])
        fx, fy = torch.as_tensor(f["forcing_x"][...]), torch.as_tensor(f["forcing_y"][...])
        stored, nu = torch.as_tensor(f["residual"][...]), float(f.attrs["viscosity"])
        assert f["newton_iterations"][...].min() >= 1
    grid = SpectralGrid(16)
    rel = relative_residual(w, fc, nu, grid)
    assert torch.all(rel <= stored * (1 + 1e-6) + 1e-15)
    assert torch.all(stored <= 1e-6)
    assert torch.allclose(curl(fx, fy, grid), fc, atol=1e-13)
    ds = xr.open_dataset(path, engine="h5netcdf")
    try:
        assert ds["vorticity"].dims == ("sample", "x", "y") and ds.attrs["viscosity"] == 0.01
        assert float(ds.x[0]) == 0.0 and float(ds.x[-1]) < 1.0  # periodic grid i / n
    finally:
        ds.close()


def test_unconverged_samples_are_rejected_not_stored(tmp_path):
    params = {**generate_chunk.__globals__["DEFAULTS"], "resolution": 16, "max_iter": 1, "continuation_steps": 0,
              "tol": 1e-14}
    out = generate_chunk(params, 2, torch.Generator().manual_seed(0), "cpu")
    assert not bool(out["accepted"].any())
    assert torch.all(out["stats"]["residual"] > 1e-14)
    bad = {**RECIPE, "chunk_size": 9, "navier_stokes": {**RECIPE["navier_stokes"], "resolution": 8, "max_iter": 1,
                                                         "continuation_steps": 0, "tol": 1e-14}}
    with pytest.raises(RuntimeError, match="did not converge"):
        generate_split(bad, "train", tmp_path, progress=False)
    assert not (tmp_path / "ns-unit_train.h5").exists()


def test_bad_input():
    with pytest.raises(ValueError, match="viscosity"):
        solve_steady(torch.zeros(1, 8, 8, dtype=torch.float64), 0.0)
    with pytest.raises(ValueError, match="shape"):
        solve_steady(torch.zeros(8, 8, dtype=torch.float64), 0.01)
