"""Upward-generalisation curves, per-sample asymptotic alignment and residual traces of a trained model."""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
from torch import Tensor, nn

from implicit.analysis import asymptotic_alignment
from implicit.solvers import NonConvergenceWarning, unroll

from .data import TaskSet
from .models import IterativeNet
from .train import exact_correct


class BatchFitter:
    """Runs an evaluation at the largest batch that fits: out of GPU memory, it frees the model's captured
    graphs, halves the batch and tries again, and keeps the smaller batch for the evaluations after.
    (The AA score pairs each input with its batch neighbour, so a smaller batch changes only which
    pairs are scored.)"""

    def __init__(self, model: nn.Module, batch: int):
        self.model, self.batch = model, batch

    def __call__(self, evaluate: Callable[[int], Any]) -> Any:
        while True:
            try:
                return evaluate(self.batch)
            except torch.OutOfMemoryError:
                if self.batch == 1:
                    raise
                for module in self.model.modules():
                    if hasattr(module, "release_graphs"):
                        module.release_graphs()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                self.batch //= 2
                warnings.warn(f"out of GPU memory in evaluation; trying again with batches of {self.batch}",
                              RuntimeWarning, stacklevel=2)


def _batches(data: TaskSet, batch_size: int, device):
    for i in range(0, len(data), batch_size):
        yield data.x[i:i + batch_size].to(device), data.y[i:i + batch_size].to(device), data.mask[i:i + batch_size].to(device)


@torch.no_grad()
def correct_per_iters(model: IterativeNet, data: TaskSet, iters: list[int], *, batch_size: int = 256,
                      device: torch.device | str = "cpu") -> dict[int, Tensor]:
    """Per-sample exact-match correctness after each test-time iteration budget in ``iters``, from zero init.

    A feed-forward model has one answer, repeated for every budget.
    """
    model.to(device).eval()
    out: dict[int, list[Tensor]] = {k: [] for k in iters}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonConvergenceWarning)  # small budgets stop early by design
        for x, y, mask in _batches(data, batch_size, device):
            for k in iters:
                logits, _ = model(x, iters=k if model.iterative else None, init="zero")
                out[k].append(exact_correct(logits, y, mask).cpu())
    return {k: torch.cat(v) for k, v in out.items()}


def _solver_for(model: IterativeNet):
    if model.kind == "deq":
        return model.deq.active_solver, {"tol": model.deq.tol, "stop_mode": model.deq.stop_mode}
    return unroll, {}


@torch.no_grad()
def alignment_scores(model: IterativeNet, data: TaskSet, iters: int, *, batch_size: int = 256,
                     device: torch.device | str = "cpu") -> Tensor:
    """Per-sample AA score with ``iters`` iterations per solve (Anil et al., 2022, Alg. 1).

    Each input is solved from zero (``e`` without injection) and again from the final state of the
    next input in its batch; the score is the cosine similarity of the two final states.
    """
    if not model.iterative:
        raise ValueError("the AA score needs an iterative model; the feed-forward baseline has none")
    model.to(device).eval()
    solver, options = _solver_for(model)
    scores = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonConvergenceWarning)
        for x, _, _ in _batches(data, batch_size, device):
            if x.shape[0] < 2:
                continue
            f, e = model.fixed_point_map(x)
            result = asymptotic_alignment(f, e, model.initial_state(e, "zero"), solver=solver,
                                          max_iter=iters, **options)
            scores.append(result.score.cpu())
    return torch.cat(scores)


@torch.no_grad()
def residual_trace(model: IterativeNet, data: TaskSet, iters: int, *, count: int = 64,
                   device: torch.device | str = "cpu") -> Tensor:
    """``(iters, count)`` relative residual per iteration of plain fixed-point iteration from zero.

    Picard iteration for every model kind, so DEQs and recurrent nets are compared on the same
    dynamics: a path-independent model's residual keeps falling, a transient-fitted one stalls.
    """
    from implicit.solvers import picard

    model.to(device).eval()
    x = data.x[:count].to(device)
    f, e = model.fixed_point_map(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonConvergenceWarning)
        result = picard(lambda z: f(z, e), model.initial_state(e, "zero"), tol=1e-7, max_iter=iters,
                        trace=True, check_every=max(1, min(iters, 16)))
    return result.trace.cpu()


def spearman(a, b) -> float:
    """Spearman rank correlation of two equal-length sequences (average ranks for ties)."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    if a.shape != b.shape or a.dim() != 1 or len(a) < 2:
        raise ValueError(f"need two 1-D sequences of one length >= 2, got shapes {tuple(a.shape)}, {tuple(b.shape)}")

    def ranks(v: Tensor) -> Tensor:
        order = v.argsort()
        r = torch.empty_like(v)
        r[order] = torch.arange(len(v), dtype=v.dtype)
        for value in v.unique():  # ties share their mean rank
            tie = v == value
            r[tie] = r[tie].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = (ra.norm() * rb.norm()).item()
    return float((ra @ rb).item() / denom) if denom > 0 else float("nan")
