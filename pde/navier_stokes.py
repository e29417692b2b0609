"""Steady incompressible Navier-Stokes on the periodic unit square, solved as a root by Newton-Krylov.

Vorticity-streamfunction form (``nu`` viscosity, optional linear ``drag``):

    u . grad(w) = nu Lap(w) - drag w + f,    u = (d psi/dy, -d psi/dx),    -Lap(psi) = w,

pseudo-spectral on an ``n x n`` grid ``x_i = i / n`` (index ``[b, i, j]`` is
``(x_i, y_j)``), the advection product dealiased with the 2/3 rule (as jax-cfd and
FNO's ``ns_2d.py`` do: the product is computed on the grid and truncated to
``|k_x|, |k_y| < n/3``).

The steady state is a root of the *preconditioned* residual

    G(w) = w - L^{-1} (f - N(w)),   L = -nu Lap + drag,   N(w) = P_{2/3}(u . grad w),

whose Jacobian ``I + L^{-1} N'(w)`` is a compact perturbation of the identity, so
GMRES inside :func:`implicit.solvers.newton_krylov` needs few iterations at
moderate Reynolds numbers. ``R = L G`` is the steady residual itself; a sample is
accepted when ``||R(w)|| / ||f|| <= tol`` (1e-6 by default). Newton starts from the
Stokes flow; samples it does not converge are retried by pseudo-transient
continuation (backward-Euler pseudo-time steps of growing size, each a short
Newton-Krylov solve of the same preconditioned form) and then Newton again.

Forcing (the FNO-DEQ paper's data, Marwah et al. arXiv 2312.00234; their released
loader reads the two-component forcing field ``f_curl`` of jax-cfd runs named
``forcing_kolmogorov ... peak_wave_num_1``): a velocity forcing ``(f_x, f_y)``
made of a Kolmogorov shear ``A sin(2 pi k_f y)`` plus a random divergence-free
field whose energy spectrum ``k^4 exp(-2 (k/k_p)^2)`` peaks at ``k_p = 1``
(after jax-cfd's ``filtered_velocity_field``), scaled to a maximum speed. The
vorticity equation is forced by its curl ``f = d f_y/dx - d f_x/dy``.

:func:`integrate_to_steady` is the plain time-stepping baseline (Crank-Nicolson
for the linear terms, Heun for advection, as FNO's ``ns_2d.py``) used by the
benchmark; its fixed points are exactly the discrete steady states above.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from implicit.solvers import newton_krylov

__all__ = [
    "SpectralGrid", "advection", "steady_residual", "relative_residual", "sample_forcing", "curl",
    "NSSolution", "solve_steady", "integrate_to_steady", "DEFAULTS",
]


class SpectralGrid:
    """Wavenumbers, Laplacian symbol and 2/3 mask of an ``n x n`` periodic grid (rfft2 layout)."""

    def __init__(self, n: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float64):
        if int(n) != n or n < 4:
            raise ValueError(f"resolution must be an integer >= 4, got {n}")
        self.n, self.dtype = n, dtype
        kx = torch.fft.fftfreq(n, 1.0 / n, device=device, dtype=dtype)[:, None]
        ky = torch.fft.rfftfreq(n, 1.0 / n, device=device, dtype=dtype)[None, :]
        nyq_x, nyq_y = kx.abs() == n / 2, ky.abs() == n / 2
        # first derivatives drop the Nyquist mode (its sine part is not representable)
        self.dx = 2j * math.pi * torch.where(nyq_x, 0.0, kx)
        self.dy = 2j * math.pi * torch.where(nyq_y, 0.0, ky)
        self.k2 = (2 * math.pi) ** 2 * (kx**2 + ky**2)  # symbol of -Lap
        self.inv_k2 = torch.where(self.k2 > 0, 1.0 / torch.where(self.k2 > 0, self.k2, 1.0), 0.0)
        self.mask = ((kx.abs() < n / 3) & (ky.abs() < n / 3)).to(dtype)

    def coordinates(self) -> Tensor:
        """Grid points ``i / n`` on [0, 1)."""
        return torch.arange(self.n, dtype=torch.float64) / self.n


def _fft(w: Tensor) -> Tensor:
    return torch.fft.rfft2(w)


def _ifft(w_hat: Tensor, n: int) -> Tensor:
    return torch.fft.irfft2(w_hat, s=(n, n))


def _velocity_and_gradient(w_hat: Tensor, grid: SpectralGrid) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(u, v, w_x, w_y)`` on the grid from the rfft2 of the vorticity."""
    n = grid.n
    psi_hat = w_hat * grid.inv_k2
    return (_ifft(grid.dy * psi_hat, n), _ifft(-grid.dx * psi_hat, n),
            _ifft(grid.dx * w_hat, n), _ifft(grid.dy * w_hat, n))


def advection(w: Tensor, grid: SpectralGrid) -> Tensor:
    """Dealiased ``u . grad(w)`` in Fourier space (rfft2 layout) for vorticity ``w`` ``(B, n, n)``."""
    u, v, wx, wy = _velocity_and_gradient(_fft(w), grid)
    return grid.mask * _fft(u * wx + v * wy)


def linearized_advection(w: Tensor, grid: SpectralGrid):
    """``d -> N'(w) d`` in Fourier space, with ``N(w) = P_{2/3}(u . grad w)`` bilinear:
    ``N'(w) d = P_{2/3}(u_w . grad d + u_d . grad w)``. The fields of ``w`` are computed once."""
    u, v, wx, wy = _velocity_and_gradient(_fft(w), grid)

    def apply(d: Tensor) -> Tensor:
        ud, vd, dx, dy = _velocity_and_gradient(_fft(d), grid)
        return grid.mask * _fft(u * dx + v * dy + ud * wx + vd * wy)

    return apply


def steady_residual(w: Tensor, f: Tensor, nu: float, grid: SpectralGrid, drag: float = 0.0) -> Tensor:
    """``R(w) = u . grad(w) - nu Lap(w) + drag w - f`` on the grid, ``(B, n, n)``."""
    lin = nu * grid.k2 + drag
    return _ifft(advection(w, grid) + lin * _fft(w) - _fft(f), grid.n)


def relative_residual(w: Tensor, f: Tensor, nu: float, grid: SpectralGrid, drag: float = 0.0) -> Tensor:
    """Per-sample ``||R(w)|| / ||f||``: the number stored with each sample."""
    r = steady_residual(w, f, nu, grid, drag).flatten(1)
    return torch.linalg.vector_norm(r, dim=1) / torch.linalg.vector_norm(f.flatten(1), dim=1)


def _preconditioned(f: Tensor, nu: float, grid: SpectralGrid, drag: float,
                    dt: Tensor | None = None, w_prev: Tensor | None = None):
    """``G(w) = w - L^{-1}(f - N(w))``, the mean mode pinned to 0.

    With a per-sample pseudo-time step ``dt`` ``(B,)`` and previous iterate ``w_prev`` it is
    the backward-Euler step ``G(w) = w - (1/dt + L)^{-1}(w_prev / dt + f - N(w))``.
    """
    lin = nu * grid.k2 + drag
    f_hat = _fft(f)
    if dt is not None:
        lin = lin + 1.0 / dt[:, None, None]
        f_hat = f_hat + _fft(w_prev) / dt[:, None, None]
    inv = torch.where(grid.k2 > 0, 1.0 / torch.where(grid.k2 > 0, lin, 1.0), 0.0)

    def G(w: Tensor) -> Tensor:
        return w - _ifft(inv * (f_hat - advection(w, grid)), grid.n)

    def linearize(w: Tensor):
        """``d -> G'(w) d = d + L^{-1} N'(w) d``: the exact JVP, cheaper than forward-mode AD."""
        dN = linearized_advection(w, grid)
        return lambda d: d + _ifft(inv * dN(d), grid.n)

    return G, linearize


def curl(fx: Tensor, fy: Tensor, grid: SpectralGrid) -> Tensor:
    """``d f_y / dx - d f_x / dy`` of a periodic vector field."""
    return _ifft(grid.dx * _fft(fy) - grid.dy * _fft(fx), grid.n)


def sample_forcing(
    batch: int,
    grid: SpectralGrid,
    *,
    kolmogorov_amplitude: float = 0.05,
    kolmogorov_wavenumber: int = 1,
    perturbation_amplitude: float = 0.05,
    peak_wavenumber: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Random two-component forcing ``(f_x, f_y)`` and its curl, each ``(batch, n, n)``.

    ``f = (A sin(2 pi k_f y), 0) + c u_p`` with ``u_p`` a random divergence-free field of
    energy spectrum ``k^4 exp(-2 (k / k_p)^2)`` and ``c`` setting ``max |c u_p|`` to
    ``perturbation_amplitude`` per sample.
    """
    n, dtype = grid.n, grid.dtype
    device = grid.k2.device
    noise = torch.randn(batch, n, n, generator=generator, device=device, dtype=dtype)
    k = (grid.k2 ** 0.5) / (2 * math.pi)
    # |psi_hat|^2 ~ E(k) / (k * k^2) for a shell of ~k modes whose velocity is k psi
    amp = torch.where(k > 0, (k * torch.exp(-2 * (k / peak_wavenumber) ** 2)).sqrt(), 0.0)
    psi_hat = _fft(noise) * amp
    up, vp = _ifft(grid.dy * psi_hat, n), _ifft(-grid.dx * psi_hat, n)
    speed = (up**2 + vp**2).sqrt().amax(dim=(1, 2)).clamp_min(torch.finfo(dtype).tiny)
    c = (perturbation_amplitude / speed)[:, None, None]
    y = grid.coordinates().to(device=device, dtype=dtype)
    fx = kolmogorov_amplitude * torch.sin(2 * math.pi * kolmogorov_wavenumber * y)[None, None, :] + c * up
    fy = c * vp
    return fx, fy, curl(fx, fy, grid)


@dataclass
class NSSolution:
    """Steady vorticity ``(B, n, n)`` and per-sample diagnostics; ``rel_residual`` is ``||R|| / ||f||``."""

    w: Tensor
    rel_residual: Tensor
    newton_iterations: Tensor
    krylov_iterations: Tensor
    continuation: Tensor  # True where the sample needed viscosity continuation
    converged: Tensor


def _steady_measure(f: Tensor, nu: float, grid: SpectralGrid, drag: float):
    """``(w, G(w)) -> ||R(w)|| / ||f||`` from ``R = L G`` (two FFTs; the mean mode is not in ``R``)."""
    lin = torch.where(grid.k2 > 0, nu * grid.k2 + drag, 0.0)
    f_norm = torch.linalg.vector_norm(f.flatten(1), dim=1).clamp_min(torch.finfo(f.dtype).tiny)

    def measure(w: Tensor, Gw: Tensor) -> Tensor:
        return torch.linalg.vector_norm(_ifft(lin * _fft(Gw), grid.n).flatten(1), dim=1) / f_norm

    return measure


def _newton(problem, w0, tol, opts, measure=None):
    G, linearize = problem
    res = newton_krylov(G, w0, tol=tol, stop_mode="rel" if measure is None else "abs", linearize=linearize,
                        measure=measure, **opts)
    return res.z, res.n_iter, res.stats["krylov_iters"]


def _pseudo_time(f, nu, w, grid, drag, opts, steps, dt0):
    """Pseudo-transient continuation (Kelley & Keyes, 1998): backward-Euler steps whose size grows
    as the residual falls (switched evolution relaxation), each solved by a short Newton-Krylov."""
    B = f.shape[0]
    dt = torch.full((B,), dt0, dtype=f.dtype, device=f.device)
    n_newton = torch.zeros(B, dtype=torch.long, device=f.device)
    n_krylov = torch.zeros_like(n_newton)
    r = relative_residual(w, f, nu, grid, drag)
    short = {**opts, "max_iter": 3}
    for _ in range(steps):
        w, a, b = _newton(_preconditioned(f, nu, grid, drag, dt, w), w, 1e-3, short)
        n_newton, n_krylov = n_newton + a, n_krylov + b
        r_new = relative_residual(w, f, nu, grid, drag)
        dt = dt * (r / r_new.clamp_min(1e-300)).clamp(0.5, 10.0)
        r = r_new
    return w, n_newton, n_krylov


def solve_steady(
    f: Tensor,
    nu: float,
    *,
    drag: float = 0.0,
    tol: float = 1e-6,
    newton_tol: float = 1e-7,
    max_iter: int = 30,
    krylov_dim: int = 20,
    krylov_max_iter: int | None = 60,
    inexact_forcing: float = 1e-3,
    forcing_mode: str = "eisenstat-walker",
    continuation_steps: int = 20,
    pseudo_dt: float = 1.0,
    w0: Tensor | None = None,
) -> NSSolution:
    """Steady vorticity for a batch of vorticity forcings ``f`` ``(B, n, n)`` (float64 recommended).

    Newton-Krylov on ``G`` from the Stokes flow (or ``w0``) until ``||R|| / ||f|| <= newton_tol``,
    with the exact Jacobian-vector product of ``G`` and Eisenstat-Walker linear tolerances
    (``forcing_mode``; ``inexact_forcing`` is the tightest); a sample is converged when
    ``||R|| / ||f|| <= tol``. Samples that fail are
    retried from the Stokes flow by ``continuation_steps`` pseudo-time steps (first
    step ``pseudo_dt``) followed by Newton; ``continuation_steps=0`` skips that.
    """
    if f.dim() != 3 or f.shape[1] != f.shape[2]:
        raise ValueError(f"forcing must have shape (B, n, n), got {tuple(f.shape)}")
    if not nu > 0:
        raise ValueError(f"viscosity must be positive, got {nu}")
    grid = SpectralGrid(f.shape[1], f.device, f.dtype)
    opts = dict(max_iter=max_iter, krylov_dim=krylov_dim, krylov_max_iter=krylov_max_iter,
                forcing=inexact_forcing, forcing_mode=forcing_mode)
    lin = nu * grid.k2 + drag
    stokes = _ifft(torch.where(grid.k2 > 0, _fft(f) / torch.where(grid.k2 > 0, lin, 1.0), 0.0), grid.n)
    w, n_newton, n_krylov = _newton(_preconditioned(f, nu, grid, drag), stokes if w0 is None else w0,
                                    newton_tol, opts, _steady_measure(f, nu, grid, drag))
    rel = relative_residual(w, f, nu, grid, drag)
    cont = torch.zeros_like(rel, dtype=torch.bool)
    bad = torch.nonzero(~(rel <= tol)).flatten()
    if continuation_steps > 0 and bad.numel() > 0:
        fb = f[bad]
        wb, nb, kb = _pseudo_time(fb, nu, stokes[bad], grid, drag, opts, continuation_steps, pseudo_dt)
        wb, a, b = _newton(_preconditioned(fb, nu, grid, drag), wb, newton_tol, opts,
                           _steady_measure(fb, nu, grid, drag))
        rb = relative_residual(wb, fb, nu, grid, drag)
        better = rb < rel[bad]
        w[bad] = torch.where(better[:, None, None], wb, w[bad])
        rel[bad] = torch.where(better, rb, rel[bad])
        n_newton[bad] += nb + a
        n_krylov[bad] += kb + b
        cont[bad] = True
    return NSSolution(w=w, rel_residual=rel, newton_iterations=n_newton, krylov_iterations=n_krylov,
                      continuation=cont, converged=rel <= tol)


@torch.no_grad()
def integrate_to_steady(
    f: Tensor,
    nu: float,
    dt: float,
    *,
    drag: float = 0.0,
    tol: float = 1e-6,
    max_steps: int = 100_000,
    check_every: int = 50,
    max_seconds: float | None = None,
    w0: Tensor | None = None,
) -> tuple[Tensor, Tensor, int]:
    """Time-step ``dw/dt = -R(w)`` from ``w0`` (zero) until every ``||R|| / ||f|| <= tol``: the baseline.

    Crank-Nicolson for ``-nu Lap + drag``, Heun for advection and forcing. Returns
    ``(w, rel_residual, steps)``; checks the residual on the host every ``check_every`` steps,
    and stops early past ``max_seconds`` of wall-clock time (the residual then says how far it got).
    """
    import time

    t0 = time.perf_counter()
    grid = SpectralGrid(f.shape[1], f.device, f.dtype)
    n = grid.n
    lin = nu * grid.k2 + drag
    lhs = 1.0 / (1.0 + 0.5 * dt * lin)
    rhs = 1.0 - 0.5 * dt * lin
    f_hat = _fft(f)
    w_hat = _fft(w0) if w0 is not None else torch.zeros_like(f_hat)
    steps = 0
    while steps < max_steps:
        for _ in range(check_every):
            e0 = f_hat - advection(_ifft(w_hat, n), grid)
            w_pred = lhs * (rhs * w_hat + dt * e0)
            e1 = f_hat - advection(_ifft(w_pred, n), grid)
            w_hat = lhs * (rhs * w_hat + 0.5 * dt * (e0 + e1))
            w_hat[..., 0, 0] = 0.0
        steps += check_every
        rel = relative_residual(_ifft(w_hat, n), f, nu, grid, drag)
        if bool((rel <= tol).all()) or not bool(torch.isfinite(rel).all()):
            break
        if max_seconds is not None and time.perf_counter() - t0 > max_seconds:
            break
    w = _ifft(w_hat, n)
    return w, relative_residual(w, f, nu, grid, drag), steps


# ---------------------------------------------------------------------------------------------
# Data generation: one recipe section ``[navier_stokes]`` -> one chunk of samples.

DEFAULTS: dict = {
    "resolution": 128,
    "viscosity": 0.01,
    "drag": 0.0,
    "kolmogorov_amplitude": 0.05,
    "kolmogorov_wavenumber": 1,
    "perturbation_amplitude": 0.05,
    "peak_wavenumber": 1.0,
    "tol": 1e-6,
    "newton_tol": 1e-7,  # Newton stops at ||R|| / ||f|| <= newton_tol (below tol, for a margin)
    "max_iter": 30,
    "krylov_dim": 20,
    "krylov_max_iter": 60,
    "inexact_forcing": 1e-3,
    "forcing_mode": "eisenstat-walker",
    "continuation_steps": 20,  # pseudo-time steps for samples Newton alone does not converge
    "pseudo_dt": 1.0,
    "dtype": "float64",
}
FIELDS = ("forcing", "forcing_x", "forcing_y", "vorticity")
STATS = {"residual": "f8", "newton_iterations": "i8", "krylov_iterations": "i8", "continuation": "i8"}


def check_params(p: dict) -> dict:
    """Validate a ``[navier_stokes]`` section (defaults already merged)."""
    for key in ("resolution", "max_iter", "krylov_dim", "krylov_max_iter", "kolmogorov_wavenumber"):
        if not isinstance(p[key], int) or p[key] < 1:
            raise ValueError(f"navier_stokes.{key} must be a positive integer, got {p[key]!r}")
    if p["resolution"] < 4:
        raise ValueError(f"navier_stokes.resolution must be at least 4, got {p['resolution']}")
    if not isinstance(p["continuation_steps"], int) or p["continuation_steps"] < 0:
        raise ValueError(f"navier_stokes.continuation_steps must be a non-negative integer, got {p['continuation_steps']!r}")
    for key in ("viscosity", "tol", "newton_tol", "inexact_forcing", "peak_wavenumber", "pseudo_dt"):
        if not (isinstance(p[key], (int, float)) and p[key] > 0):
            raise ValueError(f"navier_stokes.{key} must be positive, got {p[key]!r}")
    for key in ("drag", "kolmogorov_amplitude", "perturbation_amplitude"):
        if not (isinstance(p[key], (int, float)) and p[key] >= 0):
            raise ValueError(f"navier_stokes.{key} must be non-negative, got {p[key]!r}")
    if p["forcing_mode"] not in ("constant", "eisenstat-walker"):
        raise ValueError(f'navier_stokes.forcing_mode must be "constant" or "eisenstat-walker", got {p["forcing_mode"]!r}')
    if p["dtype"] not in ("float32", "float64"):
        raise ValueError(f'navier_stokes.dtype must be "float32" or "float64", got "{p["dtype"]}"')
    return p


def resolution(p: dict) -> int:
    """Stored grid size for a ``[navier_stokes]`` section."""
    return p["resolution"]


def coordinates(p: dict) -> Tensor:
    """Periodic grid points ``i / n`` on [0, 1)."""
    return torch.arange(p["resolution"], dtype=torch.float64) / p["resolution"]


def generate_chunk(p: dict, batch: int, generator: torch.Generator, device: torch.device | str) -> dict:
    """``batch`` samples: random forcing -> steady vorticity by Newton-Krylov (+ continuation)."""
    grid = SpectralGrid(p["resolution"], device, getattr(torch, p["dtype"]))
    fx, fy, f = sample_forcing(
        batch, grid, kolmogorov_amplitude=p["kolmogorov_amplitude"], kolmogorov_wavenumber=p["kolmogorov_wavenumber"],
        perturbation_amplitude=p["perturbation_amplitude"], peak_wavenumber=p["peak_wavenumber"], generator=generator)
    sol = solve_steady(
        f, p["viscosity"], drag=p["drag"], tol=p["tol"], newton_tol=p["newton_tol"], max_iter=p["max_iter"],
        krylov_dim=p["krylov_dim"], krylov_max_iter=p["krylov_max_iter"], inexact_forcing=p["inexact_forcing"],
        forcing_mode=p["forcing_mode"], continuation_steps=p["continuation_steps"], pseudo_dt=p["pseudo_dt"])
    return {
        "fields": {"forcing": f, "forcing_x": fx, "forcing_y": fy, "vorticity": sol.w},
        "stats": {"residual": sol.rel_residual, "newton_iterations": sol.newton_iterations,
                  "krylov_iterations": sol.krylov_iterations, "continuation": sol.continuation.to(torch.int64)},
        "accepted": sol.converged,
    }
