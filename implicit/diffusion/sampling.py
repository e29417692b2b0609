"""DDIM samplers: sequential, sequential replayed from a CUDA graph, and DEQ-DDIM (parallel in time).

All take any callable ``eps(x, t) -> model output`` (noise, v or x0 prediction, as the
schedule says) with ``x`` of shape (N, C, H, W) and integer timesteps ``t`` of shape (N,).
The DDIM update is one batched pure function of ``(x, k)`` (:class:`DDIMStep`), so the
parallel sampler hands it to :func:`implicit.solvers.solve_recurrence`, which applies it
to all ``K`` states at once: DEQ-DDIM (Pokle et al., arXiv 2210.12867), with
ParaDiGMS's sliding window (arXiv 2305.16317) as ``method="window"`` and its
per-step tolerance as ``noise_tol=True`` (:func:`noise_tol_scale`).
"""

from __future__ import annotations

import weakref
from typing import Any, Callable

import torch
from torch import Tensor

from .._weak import weak_callable
from ..solvers import SolverResult, solve_recurrence
from .schedule import DDIMSchedule

__all__ = ["DDIMStep", "ddim", "deq_ddim", "disable_tf32", "make_noise", "noise_tol_scale", "SAMPLERS"]

EpsFn = Callable[[Tensor, Tensor], Tensor]


class DDIMStep:
    """``step(x, k[, noise])``: the DDIM update of states ``x`` (N, ...) at step indices ``k`` (N,).

    Step ``k`` goes from timestep ``t_k`` to the next DDIM timestep, as diffusers'
    ``DDIMScheduler.step`` does (``use_clipped_model_output=False``); ``noise`` rows are
    added with scale ``sigma_k`` when ``eta > 0``.

    ``clip_slope`` (with ``with_linear``) sets the linear coefficient where ``clip_sample``
    clips ``x0``: there ``x0`` is a constant, so the update moves with ``x`` only through the
    noise estimate, and the coefficient with the model output held fixed is ``dir`` times the
    noise estimate's own dependence on ``x`` (0 for epsilon prediction). ``clip_slope = c``
    moves it a fraction ``c`` of the way to ``dir / sqrt(1 - alpha_bar)``, the slope if the model's
    denoised estimate stood still while ``x`` moved (the noise estimate then moves as
    ``x / sqrt(1 - alpha_bar)``). The solution is the same for any ``c``; only the rounds of a
    parallel solve change (see :func:`deq_ddim`).
    """

    def __init__(self, eps: EpsFn, schedule: DDIMSchedule, n_steps: int, eta: float = 0.0,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", with_linear: bool = False,
                 clip_slope: float = 0.0):
        self.eps, self.schedule, self.n_steps, self.eta = eps, schedule, int(n_steps), float(eta)
        self.with_linear, self.clip_slope = with_linear, float(clip_slope)
        self.c = schedule.coefficients(n_steps, eta, dtype, torch.device(device))

    def predict(self, x: Tensor, k: Tensor, clip: bool = True) -> tuple[Tensor, Tensor]:
        """Predicted clean sample and noise ``(x0, eps)`` at states ``x`` and step indices ``k``.

        ``x0`` is clipped when the schedule says so and ``clip`` is true.
        """
        view = (-1,) + (1,) * (x.dim() - 1)
        out = self.eps(x, self.c["t"][k])
        sa, s1 = self.c["sqrt_a"][k].view(view), self.c["sqrt_1ma"][k].view(view)
        kind = self.schedule.prediction_type
        if kind == "epsilon":
            x0, e = (x - s1 * out) / sa, out
        elif kind == "v_prediction":
            x0, e = sa * x - s1 * out, sa * out + s1 * x
        else:
            x0, e = out, (x - sa * out) / s1
        if clip and self.schedule.clip_sample:
            r = self.schedule.clip_sample_range
            x0 = x0.clamp(-r, r)
        return x0, e

    def linear_form(self) -> tuple[Tensor, Tensor]:
        """``(alpha, beta)``, each (K,), with ``x_{k+1} = alpha_k x_k + beta_k out_k (+ sigma_k noise_k)``.

        ``out_k`` is the raw model output; exact without ``clip_sample`` (clipping bends it).
        This is the form DEQ-DDIM writes its fixed point in, each state anchored to ``x_T``.
        """
        c, kind = self.c, self.schedule.prediction_type
        sa, s1, sap, d = c["sqrt_a"], c["sqrt_1ma"], c["sqrt_a_prev"], c["dir"]
        if kind == "epsilon":
            return sap / sa, d - sap * s1 / sa
        if kind == "v_prediction":
            return sap * sa + d * s1, d * sa - sap * s1
        return d / s1, sap - d * sa / s1

    def __call__(self, x: Tensor, k: Tensor, noise: Tensor | None = None):
        """The next states; with ``with_linear``, ``(next, a)`` where ``a`` (like ``x``) is the
        coefficient of ``x`` in the update with the model output held fixed (zero where clipped)."""
        view = (-1,) + (1,) * (x.dim() - 1)
        x0, e = self.predict(x, k)
        sap, d = self.c["sqrt_a_prev"][k].view(view), self.c["dir"][k].view(view)
        out = sap * x0 + d * e
        if noise is not None and self.eta > 0:
            out = out + self.c["sigma"][k].view(view) * noise
        if not self.with_linear:
            return out
        sa, s1 = self.c["sqrt_a"][k].view(view), self.c["sqrt_1ma"][k].view(view)
        cx0, ce = {"epsilon": (1 / sa, 0.0), "v_prediction": (sa, s1), "sample": (0.0, 1 / s1)}[
            self.schedule.prediction_type]
        a = sap * cx0 + d * ce
        if self.schedule.clip_sample:
            clipped = x0.abs() >= self.schedule.clip_sample_range
            a_clip = d * ce  # x0 is constant where clipped
            if self.clip_slope != 0.0:
                a_clip = (1 - self.clip_slope) * a_clip + self.clip_slope * d / s1
            a = torch.where(clipped, a_clip, a)
        return out, a.expand_as(x).detach()


def noise_tol_scale(schedule: DDIMSchedule, n_steps: int, numel: int, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu") -> Tensor:
    """ParaDiGMS's per-step tolerance scale (K,): ``sqrt(numel) * sigma_{k+1}`` for the state after step ``k``.

    ParaDiGMS (Shih et al., arXiv 2305.16317, Algorithm 1) accepts a state when its mean squared
    change in a round is at most ``tol^2`` times the noise variance of the step that leaves it,
    the DDPM posterior variance ``sigma^2`` (eta = 1), whatever eta the sampler uses. As an
    absolute L2 bound that is ``tol * sqrt(numel) * sigma``: pass this as ``tol_scale`` to
    :func:`implicit.solvers.solve_recurrence` with ``stop_mode="abs"``. The final state ``x_0``
    has no step after it and gets 0 (its change never counts as converged; it is final once
    its inputs are).
    """
    sigma = schedule.coefficients(n_steps, 1.0, dtype, torch.device(device))["sigma"]
    return torch.cat([sigma[1:], sigma.new_zeros(1)]) * float(numel) ** 0.5


def disable_tf32() -> None:
    """Run float32 convolutions and matmuls in IEEE precision from now on (process-wide).

    PyTorch runs float32 cuDNN convolutions in TF32 by default on Ampere and newer GPUs; a
    1000-step chain amplifies that round-off to 1e-2-1e-1 (see :func:`deq_ddim`). Each UNet
    step then costs more (2.3x on an H100 for a CIFAR-size UNet at batch 1).
    """
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def make_noise(x_T: Tensor, n_steps: int, generator: torch.Generator | None = None) -> Tensor:
    """Per-step noise ``(B, K, ...)`` for ``eta > 0``, drawn on the CPU so it is device-independent."""
    shape = (x_T.shape[0], int(n_steps), *x_T.shape[1:])
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(x_T.device, x_T.dtype)


def _check(x_T: Tensor, eta: float, noise: Tensor | None, n_steps: int) -> None:
    if not torch.is_tensor(x_T) or x_T.dim() < 2 or not x_T.is_floating_point():
        raise ValueError("x_T must be a floating-point tensor of shape (B, C, H, W)")
    if noise is not None and tuple(noise.shape) != (x_T.shape[0], n_steps, *x_T.shape[1:]):
        raise ValueError(f"noise must have shape (B, n_steps, ...) = {(x_T.shape[0], n_steps, *x_T.shape[1:])}, "
                         f"got {tuple(noise.shape)}")


# Steppers (and CUDA-graph samplers) kept per eps, so repeated calls reuse captured graphs.
_CACHE: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def _cached(eps, key, make):
    """``make(eps)``, kept per ``eps`` and ``key``; a kept object gets ``eps`` through a weak reference,
    or it would keep its own key, the model, alive for good."""
    try:
        cache = _CACHE.setdefault(eps, {})
    except TypeError:  # eps cannot be weakly referenced: nothing is kept
        return make(eps)
    if key not in cache:
        cache[key] = make(weak_callable(eps))
    return cache[key]


def _stepper(eps, schedule, n_steps, eta, x, with_linear: bool = False, clip_slope: float = 0.0) -> DDIMStep:
    key = ("step", id(schedule), n_steps, eta, x.dtype, x.device, with_linear, float(clip_slope))
    return _cached(eps, key, lambda fn: DDIMStep(fn, schedule, n_steps, eta, x.dtype, x.device, with_linear,
                                                 clip_slope))


def ddim(
    eps: EpsFn,
    x_T: Tensor,
    schedule: DDIMSchedule,
    n_steps: int,
    *,
    eta: float = 0.0,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    graph: bool = False,
    callback: Callable[[int, Tensor], None] | None = None,
    progress: bool = False,
) -> Tensor:
    """Sequential DDIM (Song et al., 2021): ``n_steps`` model calls from ``x_T`` (B, C, H, W) to ``x_0``.

    Args:
        eta: 0 is deterministic DDIM; ``eta > 0`` adds ``noise`` (B, K, ...) (or noise drawn from
            ``generator``) scaled by ``eta`` times the DDPM posterior std.
        graph: on CUDA, capture one step as a CUDA graph and replay it ``n_steps`` times (the
            fast sequential sampler; launch-bound small models run several times faster). The
            graph is cached on ``eps``; ``eps`` must be capturable (no host syncs).
        callback: ``callback(k, x)`` after each step (ignored with ``graph=True``).
        progress: show a progress bar.
    """
    _check(x_T, eta, noise, n_steps)
    if eta > 0 and noise is None:
        noise = make_noise(x_T, n_steps, generator)
    step = _stepper(eps, schedule, n_steps, eta, x_T)
    if graph and x_T.is_cuda:
        from ..solvers.sequential import graphed_rollout

        return graphed_rollout(step, x_T, n_steps, inputs=noise if eta > 0 else None, trajectory=False)
    x = x_T
    steps = range(n_steps)
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps, desc="DDIM", leave=False)
    for k in steps:
        kk = torch.full((x.shape[0],), k, device=x.device, dtype=torch.long)
        x = step(x, kk, None if noise is None else noise[:, k])
        if callback is not None:
            callback(k, x)
    return x


def deq_ddim(
    eps: EpsFn,
    x_T: Tensor,
    schedule: DDIMSchedule,
    n_steps: int,
    *,
    eta: float = 0.0,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    method: str = "anderson",
    tol: float = 1e-4,
    max_iter: int | None = None,
    stop_mode: str = "rel",
    window: int | None = None,
    noise_tol: bool = False,
    chunk: int | None = None,
    init: Tensor | None = None,
    anchored: bool = True,
    clip_slope: float = 0.0,
    graph: bool = False,
    backward: str | Callable[..., Tensor] | None = "ift",
    backward_options: dict | None = None,
    **solver_options: Any,
) -> tuple[Tensor, SolverResult]:
    """DEQ-DDIM (Pokle et al., 2022): the whole DDIM chain as one fixed point, solved in parallel.

    Same arguments as :func:`ddim`, plus the recurrence solver's (``method`` ``"anderson"``,
    ``"picard"`` or ``"window"``; ``tol``, ``max_iter``, ``window``, ``chunk`` rows per model
    call, ``init`` trajectory guess, ``graph``, ``backward``, and for the window ``compact``
    and ``fill``; see :func:`implicit.solvers.solve_recurrence`). Gradients of the sample with
    respect to ``x_T`` (and the model) flow by the ``backward`` strategy when autograd is on.

    ``noise_tol=True`` (``method="window"``) is ParaDiGMS's tolerance: a state's root-mean-square
    change per round is compared with ``tol`` times the noise scale of its step
    (:func:`noise_tol_scale`; ``stop_mode`` is then ``"abs"``; ParaDiGMS's code uses ``tol=0.1``).

    ``anchored=True`` solves DEQ-DDIM's form of the chain, each state written from ``x_T``
    and the model outputs of earlier states (``x_{k+1} = alpha_k x_k + beta_k out_k`` summed
    up by a parallel scan; ``alpha`` is zero where ``clip_sample`` clips), so rounds track how
    fast the model output settles, not ``K``;
    there ``backward="jfb"`` is DEQ-DDIM's one-step gradient. ``False``: the plain map
    ``x_{k+1} = step(x_k)``, which Picard needs about ``K`` rounds for.

    ``clip_slope`` (anchored only; see :class:`DDIMStep`): the coefficient of ``x_k`` used where
    ``clip_sample`` clips the predicted ``x0``. The default 0 treats those pixels as not
    depending on ``x_k`` (the model output held fixed), so in the high-noise steps, where most
    pixels clip, the anchored solve falls back to plain Picard (about one step a round).
    Their true slope is near ``dir_k / sqrt(1 - alpha_bar_k)`` (0.75-0.95 of it on the diagonal,
    measured on a small trained teacher). Its accepted states sit farther from the answer at
    equal ``tol``, so give it a 10-100x tighter ``tol``. CPU, T=1000, 16x16 digits teachers,
    errors to the float64 sequential sample 2e-4 to 3e-3 for both: the ``tiny`` UNet (3 draws
    of ``x_T``; default at tol 1e-4, 0.5 at 3e-5) went from 278-450 to 171-221 rounds at window
    32 and from 379-482 to 316-357 at window 8; the ``small`` UNet (default at 1e-4, 0.5 at
    1e-6) from 503 to 287 (window 32), 526 to 359 (16) and 581 to 477 (8). Larger values can
    diverge inside a wide window (0.6 at window 32: 765 rounds instead of 171), and the safe
    value is model-dependent.
    The sample is the same fixed point for any value.

    Precision: on Ampere and newer GPUs PyTorch runs float32 convolutions in TF32 unless
    turned off (:func:`disable_tf32`). A long chain amplifies TF32's round-off (at
    T=1000 a float32 sequential sample then sits 0.02-0.16 from the float64 one, ~3e-5 without
    TF32), so any parallel sample differs from the sequential one by as much; turn TF32 off
    when the two must agree to better than ~1e-2.

    Returns:
        ``(x_0, result)``: the sample (B, C, H, W) and the :class:`SolverResult`, whose ``z`` is
        the trajectory (B, K, C, H, W) and whose ``n_iter`` counts parallel rounds per sample.
    """
    _check(x_T, eta, noise, n_steps)
    if eta > 0 and noise is None:
        noise = make_noise(x_T, n_steps, generator)
    if clip_slope != 0.0 and not anchored:
        raise ValueError("clip_slope applies to anchored=True only")
    step = _stepper(eps, schedule, n_steps, eta, x_T, with_linear=anchored, clip_slope=clip_slope)
    if noise_tol:
        if method != "window":
            raise ValueError(f'noise_tol=True applies to method="window" only, got method="{method}"')
        solver_options["tol_scale"] = noise_tol_scale(schedule, n_steps, x_T[0].numel(), x_T.dtype, x_T.device)
        stop_mode = "abs"
    result = solve_recurrence(step, x_T, n_steps, method=method, inputs=noise if eta > 0 else None, init=init,
                              linear="step" if anchored else None,
                              tol=tol, max_iter=max_iter, stop_mode=stop_mode, window=window, chunk=chunk,
                              graph=graph, backward=backward, backward_options=backward_options, **solver_options)
    return result.z[:, -1], result


SAMPLERS = ("sequential", "graph", "deq", "picard", "window")
