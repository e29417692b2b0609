"""The deep equilibrium layer: ``z* = f(z*, x)`` solved by the backend, differentiated implicitly."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .backward import get_backward
from .solvers import NonConvergenceWarning, NonFiniteError, SolverResult, Status, get_solver, unroll
from .solvers._tree import Flattener

__all__ = ["DEQ", "jacobian_frobenius"]


class DEQ(nn.Module):
    """Deep equilibrium layer around any ``f(z, x)`` (Bai, Kolter & Koltun, 2019).

    The forward pass solves ``z = f(z, x)`` without building a graph; the chosen
    backward strategy then attaches gradients (``"ift"`` exact implicit,
    ``"phantom"``, ``"jfb"``, ``"unrolled"``), so training memory does not grow
    with solver iterations. ``backward="bptt"`` is the exception, for comparison with
    weight-tied recurrent nets: in training the layer runs ``max_iter`` plain iterations
    from ``z0`` with autograd through all of them (:func:`implicit.solvers.unroll`; memory
    grows with the iterations and the solver is not used); in eval it solves as usual, with
    ``"ift"`` gradients if autograd is on.

    Args:
        f: module called as ``f(z, x)``; ``z`` is a tensor or tuple of tensors with batch first.
            If it has ``init_state(x)``, that gives the default initial ``z``; otherwise zeros like ``x``.
        solver: name in :data:`implicit.solvers.SOLVERS` or a solver function.
        tol, max_iter, stop_mode: forward solve tolerance, iteration limit and criterion.
        eval_max_iter: iteration limit in eval mode (default: ``max_iter``).
        eval_solver: solver in eval mode (default: ``solver``), e.g. ``"picard"`` to evaluate
            a model trained with Anderson by plain iteration; ``solver_options`` go to both.
        solver_options: extra options for the solver (``m``, ``beta``, ``check_every``, ``graph``...).
        backward: gradient strategy name, or ``"bptt"`` (see above); backward_options: its options
            (``ift``: ``solver``, ``tol``, ``max_iter``; ``phantom``: ``steps``, ``damping``...).
        strict: raise instead of warning when a solve stops above tolerance.
        norm: ``"weight_norm"`` or ``"spectral_norm"`` on ``f``'s weights (torchdeq's), reset each training step.
        jac_reg_samples: if > 0, in training, ``result.stats["jac_loss"]`` holds a Hutchinson
            estimate of ``||df/dz||_F^2 / n`` at ``z*`` (Bai et al., 2021) to add to the loss.
        name: how errors and warnings name this layer.

    Returns from ``forward``: ``(z, result)``, the equilibrium (with gradients) and the forward
    :class:`SolverResult`.
    """

    def __init__(
        self,
        f: nn.Module,
        *,
        solver: str = "anderson",
        tol: float = 1e-4,
        max_iter: int = 30,
        stop_mode: str = "rel",
        eval_max_iter: int | None = None,
        eval_solver: str | Callable | None = None,
        solver_options: dict | None = None,
        backward: str = "ift",
        backward_options: dict | None = None,
        strict: bool = False,
        norm: str | None = None,
        jac_reg_samples: int = 0,
        name: str | None = None,
    ):
        super().__init__()
        self.f = f
        self.solver = get_solver(solver)
        self.solver_name = _solver_name(solver)
        self.eval_solver = self.solver if eval_solver is None else get_solver(eval_solver)
        self.eval_solver_name = self.solver_name if eval_solver is None else _solver_name(eval_solver)
        self.tol, self.max_iter, self.stop_mode = tol, max_iter, stop_mode
        self.eval_max_iter = eval_max_iter or max_iter
        self.solver_options = dict(solver_options or {})
        self.bptt = backward == "bptt"
        # a bptt layer in eval mode still solves; gradients there (if any) are the exact implicit ones
        self.backward_fn = get_backward("ift" if self.bptt else backward)
        self.backward_options = dict(backward_options or {})
        self.strict = strict
        self.jac_reg_samples = jac_reg_samples
        self.name = name or type(f).__name__
        self.norm = norm
        if norm is not None:
            from torchdeq.norm import apply_norm

            if norm not in ("weight_norm", "spectral_norm"):
                raise ValueError(f'norm must be "weight_norm", "spectral_norm" or None, got "{norm}"')
            apply_norm(self.f, norm_type=norm)
        if self.solver_options.get("graph") and norm is not None:
            raise ValueError("graph=True replays captured kernels that read the weights in place, but "
                             "norm recomputes them every step; use one or the other")
        self._warned = False
        # per input shape: a static copy of x that captured CUDA graphs read, and the f that reads it
        self._graph_inputs: dict[tuple, tuple[Tensor, Callable]] = {}

    def __getstate__(self) -> dict:
        # a copy (deepcopy for an EMA, pickling) starts without the static inputs: their functions call
        # this module's f, and the solver's cached CUDA graphs read this module's weights
        state = self.__dict__.copy()
        state["_graph_inputs"] = {}
        return state

    def release_graphs(self) -> None:
        """Forget the static inputs of ``graph=True`` solves, and with them the solver's captured CUDA
        graphs and the memory they hold (to retry with smaller batches after running out of memory)."""
        self._graph_inputs.clear()

    def forward(self, x: Any, z0: Any = None, *, max_iter: int | None = None) -> tuple[Any, SolverResult]:
        if z0 is None:
            z0 = self.f.init_state(x) if hasattr(self.f, "init_state") else torch.zeros_like(x)
        if self.norm is not None and self.training:
            from torchdeq.norm import reset_norm

            reset_norm(self.f)
        flat = Flattener(z0)
        limit = max_iter or (self.max_iter if self.training else self.eval_max_iter)
        if self.bptt and self.training and torch.is_grad_enabled():
            return self._bptt(x, flat, z0, limit)
        with torch.no_grad():
            result = self.active_solver(
                self._solver_f(x), z0, tol=self.tol, max_iter=limit, stop_mode=self.stop_mode,
                **self.solver_options,
            )
        self._check(result)

        def f_flat(v: Tensor) -> Tensor:
            return flat.flatten(self.f(flat.unflatten(v), x))

        z_star = flat.flatten(result.z)
        if torch.is_grad_enabled():
            z = self.backward_fn(f_flat, z_star, **self.backward_options)
            if self.training and self.jac_reg_samples > 0:
                stats = dict(result.stats, jac_loss=jacobian_frobenius(f_flat, z_star, self.jac_reg_samples))
                result = dataclasses.replace(result, stats=stats)
        else:
            z = z_star
        return flat.unflatten(z), result

    def _bptt(self, x: Any, flat: Flattener, z0: Any, limit: int) -> tuple[Any, SolverResult]:
        """Training forward of ``backward="bptt"``: ``limit`` iterations from ``z0``, all differentiable."""
        result = unroll(lambda v: flat.flatten(self.f(flat.unflatten(v), x)), flat.flatten(z0), max_iter=limit,
                        tol=self.tol)
        self._raise_if_nonfinite(result, "bptt")  # a fixed budget: not converging is no cause to warn
        return flat.unflatten(result.z), result

    @property
    def active_solver(self) -> Callable[..., SolverResult]:
        """The solver of the current mode: ``solver`` in training, ``eval_solver`` in eval."""
        return self.solver if self.training else self.eval_solver

    @property
    def active_solver_name(self) -> str:
        """The name of :attr:`active_solver`, for messages."""
        return self.solver_name if self.training else self.eval_solver_name

    def _solver_f(self, x: Any):
        """``z -> f(z, x)``; with ``graph=True`` a persistent function per input shape reading a static
        copy of ``x``, so the solver's cached CUDA graphs stay valid across calls (and across batches of
        different sizes, e.g. an epoch's last one, without capturing again)."""
        if not (self.solver_options.get("graph") and torch.is_tensor(x) and x.is_cuda):
            return lambda z: self.f(z, x)
        key = (tuple(x.shape), x.dtype, x.device)
        entry = self._graph_inputs.get(key)
        if entry is None:
            static, f = x.detach().clone(), self.f  # f, not self: no cycle through self._graph_inputs
            entry = self._graph_inputs[key] = (static, lambda z: f(z, static))
        else:
            entry[0].copy_(x)
        return entry[1]

    def _raise_if_nonfinite(self, result: SolverResult, solver_name: str) -> None:
        bad = (result.status == Status.NONFINITE).nonzero().flatten()
        if len(bad):
            steps = result.n_iter[bad]
            raise NonFiniteError(
                f"{self.name}: NaN or inf in the fixed-point iterate of sample(s) {bad.tolist()[:10]} "
                f"at solver iteration(s) {steps.tolist()[:10]} ({solver_name}); check the input "
                "and the layer's weights"
            )

    def _check(self, result: SolverResult) -> None:
        status = result.status
        solver_name = self.active_solver_name
        self._raise_if_nonfinite(result, solver_name)
        if not result.all_converged:
            message = (
                f"{self.name}: {solver_name} stopped above tol={self.tol:g} ({self.stop_mode}) for "
                f"{int((~result.converged).sum())}/{len(status)} samples: {result.summary()}"
            )
            if self.strict:
                raise RuntimeError(message)
            if not self._warned:
                self._warned = True
                warnings.warn(message, NonConvergenceWarning, stacklevel=3)


def _solver_name(solver: Any) -> str:
    return solver if isinstance(solver, str) else getattr(solver, "__name__", "solver")


def jacobian_frobenius(f: Any, z: Tensor, samples: int = 1) -> Tensor:
    """Hutchinson estimate of ``||df/dz||_F^2 / n`` at ``z`` (flat ``(B, n)``), differentiable.

    Averages ``||v^T J||^2 / n`` over ``samples`` Gaussian probes ``v``; adding it to the loss
    keeps the layer well-conditioned (Bai, Koltun & Kolter, 2021).
    """
    z_in = z.detach().requires_grad_()
    out = f(z_in)
    total = out.new_zeros(())
    for _ in range(samples):
        v = torch.randn_like(out)
        (vjp,) = torch.autograd.grad(out, z_in, v, create_graph=True)
        total = total + vjp.pow(2).sum() / vjp.numel()
    return total / samples
