"""Known dynamical systems the package generates data from (nothing is downloaded)."""

from __future__ import annotations

import torch
from torch import Tensor


def damped_pendulum(t: Tensor, y: Tensor, gravity: float = 9.81, length: float = 1.0, damping: float = 0.3) -> Tensor:
    """``theta'' = -(g / L) sin(theta) - c theta'`` as a first-order system on ``(theta, omega)``."""
    theta, omega = y[..., 0], y[..., 1]
    return torch.stack([omega, -(gravity / length) * torch.sin(theta) - damping * omega], dim=-1)


def lotka_volterra(t: Tensor, y: Tensor, a: float = 1.5, b: float = 1.0, c: float = 3.0, d: float = 1.0) -> Tensor:
    """Predator-prey: ``x' = a x - b x y``, ``y' = -c y + d x y``."""
    x, p = y[..., 0], y[..., 1]
    return torch.stack([a * x - b * x * p, -c * p + d * x * p], dim=-1)


SYSTEMS = {"pendulum": damped_pendulum, "lotka_volterra": lotka_volterra}
INITIAL = {  # (low, high) of the uniform initial conditions
    "pendulum": ((-2.0, -1.0), (2.0, 1.0)),
    "lotka_volterra": ((0.5, 0.5), (2.0, 2.0)),
}


def ode_dataset(system: str, n: int, t_end: float, steps: int, seed: int = 0,
                dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """``n`` trajectories of ``system`` on a uniform grid of ``steps + 1`` times, solved with
    dopri5 at tight tolerances. Returns ``(t (T,), ys (T, n, 2))``."""
    from torchdiffeq import odeint

    if system not in SYSTEMS:
        raise ValueError(f'Unknown system "{system}". Must be one of {sorted(SYSTEMS)}.')
    if n < 1 or steps < 1 or not t_end > 0:
        raise ValueError(f"need n >= 1, steps >= 1 and t_end > 0, got {n}, {steps}, {t_end}")
    g = torch.Generator().manual_seed(seed)
    low, high = (torch.tensor(v, dtype=torch.float64) for v in INITIAL[system])
    y0 = low + (high - low) * torch.rand(n, 2, generator=g, dtype=torch.float64)
    t = torch.linspace(0, t_end, steps + 1, dtype=torch.float64)
    ys = odeint(SYSTEMS[system], y0, t, method="dopri5", rtol=1e-9, atol=1e-9)
    return t.to(dtype), ys.to(dtype)


def ornstein_uhlenbeck(n: int, t_end: float, steps: int, theta: float = 2.0, mu: float = 1.0,
                       sigma: float = 0.5, seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """``n`` exact OU paths ``dy = theta (mu - y) dt + sigma dW`` from ``y0 = 0``: ``(t, ys (T, n, 1))``."""
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, t_end, steps + 1, dtype=torch.float64)
    dt = t_end / steps
    decay = torch.exp(torch.tensor(-theta * dt, dtype=torch.float64))
    noise_sd = sigma * torch.sqrt((1 - decay**2) / (2 * theta))
    y = torch.zeros(n, 1, dtype=torch.float64)
    ys = [y]
    for _ in range(steps):  # the exact transition of the OU process
        y = mu + (y - mu) * decay + noise_sd * torch.randn(n, 1, generator=g, dtype=torch.float64)
        ys.append(y)
    return t.to(dtype), torch.stack(ys).to(dtype)
