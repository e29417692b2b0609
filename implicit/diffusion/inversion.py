"""Inversion: find the ``x_T`` whose DDIM sample reconstructs a given image.

Three ways, all reporting reconstruction MSE against wall-clock time:

- ``"deq"`` (DEQ-DDIM, arXiv 2210.12867): optimise ``x_T`` with gradients through the
  fixed point. Each forward solve is warm-started from the previous trajectory, so it
  needs few rounds. Gradients: ``"jfb"``, the one-step gradient of DEQ-DDIM's anchored
  form ``x_0 = c x_T + sum_k b_k out(x_k, t_k)`` (``x_T``'s direct terms only),
  ``"phantom"``, or ``"ift"``, exact implicit differentiation (an adjoint fixed point).
- ``"backprop"``: the baseline, backprop through the sequential chain with
  gradient checkpointing (memory of one step per state instead of the whole graph).
- ``"ddim"``: deterministic DDIM inversion (the reverse ODE), no optimisation; also the
  default initial guess of the other two.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .sampling import EpsFn, _stepper, ddim, deq_ddim
from .schedule import DDIMSchedule

__all__ = ["InversionResult", "ddim_invert", "invert", "INVERSION_METHODS"]

INVERSION_METHODS = ("deq", "backprop", "ddim")


@dataclass
class InversionResult:
    """Recovered ``x_T`` (B, C, H, W), its exact sequential reconstruction, per-sample MSE, and
    ``history``: ``(seconds, mean MSE)`` pairs of the optimiser's current iterate, the time excluding
    the untimed evaluations. ``x_T`` is, per sample, the evaluated iterate with the lowest MSE: Adam on
    ``x_T`` can overshoot after its best point, and a user wants the best inversion, not the last."""

    x_T: Tensor
    reconstruction: Tensor
    mse: Tensor
    method: str
    history: list = field(default_factory=list)
    stats: dict = field(default_factory=dict)


def ddim_invert(eps: EpsFn, x_0: Tensor, schedule: DDIMSchedule, n_steps: int) -> Tensor:
    """Deterministic DDIM inversion: run the eta=0 update backwards, from ``x_0`` to ``x_T``.

    Uses the model output at the current (less noisy) state for the step up, the usual
    approximation (Song et al., 2021; Dhariwal & Nichol, 2021).
    """
    step = _stepper(eps, schedule, n_steps, 0.0, x_0)
    c = step.c
    x = x_0
    with torch.no_grad():
        for k in reversed(range(n_steps)):
            kk = torch.full((x.shape[0],), k, device=x.device, dtype=torch.long)
            _, e = step.predict(x, kk, clip=False)
            x0 = (x - (1 - c["a_prev"][k]) ** 0.5 * e) / c["sqrt_a_prev"][k]
            x = c["sqrt_a"][k] * x0 + c["sqrt_1ma"][k] * e
    return x


def _check_target(target: Tensor, sample_shape) -> None:
    if not torch.is_tensor(target) or target.dim() != 4:
        got = tuple(target.shape) if torch.is_tensor(target) else type(target).__name__
        raise ValueError(f"target must be a batch of images (B, C, H, W), got {got}")
    if sample_shape is not None and tuple(target.shape[1:]) != tuple(sample_shape):
        raise ValueError(f"target images have shape {tuple(target.shape[1:])} but the model takes "
                         f"{tuple(sample_shape)} (C, H, W)")
    if not torch.isfinite(target).all():
        raise ValueError("target contains NaN or inf values")


def invert(
    eps: EpsFn,
    target: Tensor,
    schedule: DDIMSchedule,
    n_steps: int,
    *,
    method: str = "deq",
    x_T: Tensor | None = None,
    iters: int = 50,
    lr: float = 0.05,
    backward: str = "jfb",
    solver: str = "anderson",
    tol: float = 1e-3,
    max_iter: int | None = None,
    chunk: int | None = None,
    use_checkpoint: bool = True,
    sample_shape: tuple | None = None,
    eval_every: int = 1,
    target_mse: float | None = None,
    max_seconds: float | None = None,
    graph: bool = False,
    solver_options: dict | None = None,
    callback: Callable[[int, float], None] | None = None,
    progress: bool = False,
) -> InversionResult:
    """Find ``x_T`` whose eta=0 DDIM sample is close to ``target`` (B, C, H, W) in [-1, 1].

    Args:
        method: ``"deq"``, ``"backprop"`` or ``"ddim"`` (see the module docstring).
        x_T: initial guess; default the deterministic DDIM inversion of ``target``.
        iters, lr: Adam iterations and learning rate on ``x_T``.
        backward: ``"jfb"`` or ``"ift"`` for ``method="deq"``.
        solver, tol, max_iter, chunk: the forward recurrence solve of ``method="deq"``;
            ``solver_options``: more of :func:`deq_ddim`'s options for it (e.g. ``window``, ``compact``).
        use_checkpoint: recompute each step in the backward pass of ``method="backprop"``.
        sample_shape: (C, H, W) the model takes; checked against ``target``.
        eval_every: every this many iterations, record the exact (sequential) reconstruction
            MSE in ``history``, outside the timed region.
        target_mse: stop once the recorded MSE is at or below this.
        max_seconds: stop once the timed optimisation has taken this long.
        graph: on CUDA, replay the exact evaluations (and the DEQ solve's rounds, where the
            solver supports it) from CUDA graphs; ``eps`` must be capturable.

    Raises:
        ValueError: on a target of the wrong shape, with NaN/inf, or an unknown method.
    """
    _check_target(target, sample_shape)
    if method not in INVERSION_METHODS:
        raise ValueError(f'Unknown inversion method "{method}". Must be one of {list(INVERSION_METHODS)}.')
    if method == "deq" and backward not in ("jfb", "phantom", "ift"):
        raise ValueError(f'backward must be "jfb", "phantom" or "ift" for DEQ inversion, got "{backward}"')
    target = target.detach()

    def exact(x):
        with torch.no_grad():
            rec = ddim(eps, x, schedule, n_steps, graph=graph)
        return rec, ((rec - target) ** 2).flatten(1).mean(1)

    start = time.perf_counter()
    x = ddim_invert(eps, target, schedule, n_steps) if x_T is None else x_T.detach().clone()
    elapsed = time.perf_counter() - start
    rec, mse = exact(x)
    history = [(elapsed, float(mse.mean()))]
    stats = {"rounds": []}
    if method == "ddim":
        return InversionResult(x, rec, mse, method, history, stats)
    best = [x.clone(), rec, mse]  # per sample: the evaluated x_T with the lowest MSE so far

    def keep_best(x_now, rec_now, mse_now):
        better = mse_now < best[2]
        view = (-1,) + (1,) * (x_now.dim() - 1)
        best[0] = torch.where(better.view(view), x_now, best[0])
        best[1] = torch.where(better.view(view), rec_now, best[1])
        best[2] = torch.where(better, mse_now, best[2])

    x = x.requires_grad_()
    opt = torch.optim.Adam([x], lr=lr)
    step = _stepper(eps, schedule, n_steps, 0.0, target)
    traj = None
    bar = range(iters)
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(bar, desc=f"invert ({method})", leave=False)
    for i in bar:
        t0 = time.perf_counter()
        if method == "deq":
            loss, traj, rounds = _deq_loss(eps, x, target, schedule, n_steps, traj, backward, solver, tol,
                                           max_iter, chunk, graph, solver_options or {})
            stats["rounds"].append(rounds)
        else:
            loss = _backprop_loss(step, x, target, n_steps, use_checkpoint)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        elapsed += time.perf_counter() - t0
        out_of_time = max_seconds is not None and elapsed >= max_seconds
        if (i + 1) % eval_every == 0 or i == iters - 1 or out_of_time:
            rec, mse = exact(x.detach())
            keep_best(x.detach(), rec, mse)
            history.append((elapsed, float(mse.mean())))
            if callback is not None:
                callback(i, history[-1][1])
            if target_mse is not None and history[-1][1] <= target_mse:
                break
        if out_of_time:
            break
    # every way out of the loop (last iteration, target reached, out of time) evaluated the last iterate
    return InversionResult(best[0], best[1], best[2], method, history, stats)


def _deq_loss(eps, x, target, schedule, n_steps, traj, backward, solver, tol, max_iter, chunk, graph, options):
    x0_hat, res = deq_ddim(eps, x, schedule, n_steps, method=solver, tol=tol, max_iter=max_iter, chunk=chunk,
                           init=traj, backward=backward, graph=graph, **options)
    return ((x0_hat - target) ** 2).mean(), res.z.detach(), int(res.n_iter.max())


def _backprop_loss(step, x, target, n_steps, use_checkpoint):
    h = x
    for k in range(n_steps):
        kk = torch.full((x.shape[0],), k, device=x.device, dtype=torch.long)
        h = checkpoint(step, h, kk, use_reentrant=False) if use_checkpoint else step(h, kk)
    return ((h - target) ** 2).mean()
