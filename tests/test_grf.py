"""Gaussian random fields: covariance spectrum (scale and slope), seeding, the Darcy pushforward."""

import math

import numpy as np
import pytest
import scipy.fft
import torch

from pde.grf import darcy_coefficient, default_sigma, grf_eigenvalues, sample_grf


def _empirical_mode_variance(u: torch.Tensor) -> np.ndarray:
    """Per-mode variance of the Neumann cosine coefficients, by scipy's DCT-I (independent of pde.grf)."""
    x = u.numpy()
    n = x.shape[-1]
    X = scipy.fft.dct(scipy.fft.dct(x, type=1, axis=-1), type=1, axis=-2)
    k = np.arange(n)
    c = np.where(k == 0, 1.0, math.sqrt(2.0))  # eigenfunction normalisation
    d = np.where((k == 0) | (k == n - 1), 2.0, 1.0)  # DCT-I counts the end modes twice
    coef = X / ((n - 1) ** 2 * (c * d)[:, None] * (c * d)[None, :])
    return coef.var(axis=0)


def test_spectrum_matches_covariance_scale_and_slope():
    n, alpha, tau = 33, 2.0, 3.0
    sigma = default_sigma(alpha, tau)
    u = sample_grf(2000, n, alpha=alpha, tau=tau, generator=torch.Generator().manual_seed(1))
    var = _empirical_mode_variance(u)
    target = grf_eigenvalues(n, alpha, tau, sigma).numpy()
    k = np.arange(n)
    K = k[:, None] ** 2 + k[None, :] ** 2
    sel = (K > 0) & (k[:, None] < 12) & (k[None, :] < 12)  # interior modes, away from the DCT-I end mode
    ratio = var[sel] / target[sel]
    assert abs(np.mean(ratio) - 1) < 0.02  # scale (average of ~140 modes, each with 3% noise)
    slope = np.polyfit(np.log(math.pi**2 * K[sel] + tau**2), np.log(var[sel]), 1)[0]
    assert slope == pytest.approx(-alpha, abs=0.05)  # power law of (pi^2 |k|^2 + tau^2)
    assert var[0, 0] < 1e-20  # mean zero: constant mode dropped as in FNO's GRF.m


def test_slope_follows_alpha():
    n = 25
    for alpha in (1.5, 3.0):
        u = sample_grf(1500, n, alpha=alpha, tau=2.0, sigma=1.0, generator=torch.Generator().manual_seed(2))
        var = _empirical_mode_variance(u)
        k = np.arange(n)
        K = k[:, None] ** 2 + k[None, :] ** 2
        sel = (K > 0) & (k[:, None] < 8) & (k[None, :] < 8)
        slope = np.polyfit(np.log(math.pi**2 * K[sel] + 4.0), np.log(var[sel]), 1)[0]
        assert slope == pytest.approx(-alpha, abs=0.08)


def test_seed_reproducible_and_distinct():
    a = sample_grf(3, 16, generator=torch.Generator().manual_seed(7))
    b = sample_grf(3, 16, generator=torch.Generator().manual_seed(7))
    c = sample_grf(3, 16, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    f32 = sample_grf(2, 16, generator=torch.Generator().manual_seed(7), dtype=torch.float32)
    assert f32.dtype == torch.float32 and f32.shape == (2, 16, 16)


def test_darcy_coefficient_two_values_balanced():
    g = sample_grf(200, 29, generator=torch.Generator().manual_seed(3))
    a = darcy_coefficient(g)
    assert set(torch.unique(a).tolist()) == {3.0, 12.0}
    assert torch.equal(a == 12.0, g >= 0)
    assert 0.4 < (a == 12.0).double().mean().item() < 0.6  # symmetric field: about half each


def test_bad_arguments():
    with pytest.raises(ValueError, match="alpha"):
        sample_grf(1, 8, alpha=1.0)
    with pytest.raises(ValueError, match="resolution"):
        sample_grf(1, 1)
    with pytest.raises(ValueError, match="batch"):
        sample_grf(-1, 8)
    with pytest.raises(ValueError, match="positive"):
        darcy_coefficient(torch.zeros(1, 2, 2), high=1.0, low=0.0)
