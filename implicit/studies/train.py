"""Training with the paper's interventions as switches of a model spec.

Interventions that promote path independence (Anil et al., 2022, Sec. 5):
- ``init = "random"``: start every training solve from Gaussian noise instead of zeros, so the
  model cannot rely on where it starts;
- ``injection = true``: feed the input to every iteration (a model switch, see :mod:`.models`);
- ``budget = [lo, hi]``: draw the solver budget (DEQ) or unroll depth (recurrent) uniformly per
  batch, so no single iteration count is special.

Training length can be set in wall-clock seconds (``train_seconds``): the learning-rate schedule
then runs on the fraction of that budget used (or of the steps, whichever is further along), so
a model stopped by the clock has still been annealed. ``augment = true`` trains mazes on random
rotations and reflections (the 8 symmetries of the square, channels permuted to match).

``progressive = alpha > 0`` adds DT-net's progressive loss ("incremental progress training",
Bansal et al., 2022, Sec. 3): per batch, draw ``n`` in ``[0, N - 1]`` and ``k`` in ``[1, N - n]``
(``N`` the batch's budget), run ``n`` iterations from the training initial state without a graph,
then ``k`` plain iterations of the cell *with* backpropagation through them, and take the loss at
the result; the batch loss is ``(1 - alpha) * main + alpha * progressive``. The model is thus
trained to improve from its own partial solutions, not only from the initial state, which is what
lets DT-nets keep improving with more iterations on larger mazes. For a DEQ the ``n`` iterations
are the model's own solver with budget ``n`` (its test-time dynamics) and the ``k`` iterations are
unrolled (the implicit gradient has no notion of "k steps"); ``progressive_k`` caps ``k`` (memory
of the unroll).

Interventions that penalise it:
- a small fixed ``budget`` with backpropagation through the unroll (``kind = "recurrent"``), so the
  model is fit at one transient instead of at a fixed point;
- ``memorise_init = w > 0``: an extra loss, weight ``w``, that solves each input again from another
  input's final state and asks for *that other* input's labels, rewarding states that remember
  where they started. (Our construction of a path-dependence-promoting objective.)
"""

from __future__ import annotations

import math
import os
import time
import warnings
from typing import Any, Callable

import torch
from torch import Tensor, nn

from implicit.results import global_rng_state, save_torch_atomic, set_global_rng_state
from implicit.solvers import NonConvergenceWarning, unroll

from .data import TaskSet
from .models import IterativeNet


def exact_correct(logits: Tensor, y: Tensor, mask: Tensor) -> Tensor:
    """Per-sample bool: every counted site predicted right (the paper's whole-instance accuracy)."""
    right = (logits.argmax(1) == y) | ~mask
    return right.flatten(1).all(1)


def sample_budget(budget: Any, generator: torch.Generator) -> int:
    """An iteration count: ``budget`` itself, or a uniform draw from ``[lo, hi]``."""
    if isinstance(budget, (list, tuple)):
        if len(budget) != 2 or not 1 <= budget[0] <= budget[1]:
            raise ValueError(f"budget must be an int or [lo, hi] with 1 <= lo <= hi, got {budget}")
        return int(torch.randint(int(budget[0]), int(budget[1]) + 1, (1,), generator=generator))
    if int(budget) < 1:
        raise ValueError(f"budget must be positive, got {budget}")
    return int(budget)


# passage channels (east, south, west, north) under the square's symmetries, see augment_maze
_TRANSPOSE = (1, 0, 3, 2)
_FLIP_J = (2, 1, 0, 3)  # mirror left-right: east <-> west
_FLIP_I = (0, 3, 2, 1)  # mirror top-bottom: south <-> north


def augment_maze(x: Tensor, y: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """The batch under one random symmetry of the square (transpose, mirrors), labels moved alike.

    ``x`` is ``(B, 7, n, n)`` with channels as :data:`implicit.studies.mazes.CHANNELS`; a symmetry
    moves the cells and relabels the passage directions, so the labels stay exact shortest paths.
    """
    t, fi, fj = (torch.randint(0, 2, (3,), generator=generator) == 1).tolist()
    x, y = x.clone(), y.clone()

    def permute(x: Tensor, order: tuple[int, ...]) -> Tensor:
        return torch.cat([x[:, list(order)], x[:, 4:]], dim=1)

    if t:
        x, y = permute(x, _TRANSPOSE).transpose(-1, -2), y.transpose(-1, -2)
    if fi:
        x, y = permute(x, _FLIP_I).flip(-2), y.flip(-2)
    if fj:
        x, y = permute(x, _FLIP_J).flip(-1), y.flip(-1)
    return x.contiguous(), y.contiguous()


def progressive_state(model: IterativeNet, e: Tensor, z0: Tensor, iters: int, generator: torch.Generator,
                      max_k: int | None = None) -> tuple[Tensor, int, int]:
    """The state of DT-net's progressive loss and its draws ``(z, n, k)``: ``n`` iterations from
    ``z0`` without a graph (the model's solver for a DEQ), then ``k`` cell applications with one.

    ``n`` is uniform in ``[0, iters - 1]`` and ``k`` in ``[1, min(iters - n, max_k)]``.
    """
    if not model.iterative:
        raise ValueError("the progressive loss needs an iterative model; the feed-forward stack has none")
    n = int(torch.randint(0, iters, (1,), generator=generator))
    hi = iters - n if max_k is None else max(1, min(iters - n, int(max_k)))
    k = int(torch.randint(1, hi + 1, (1,), generator=generator))
    z = z0
    if n > 0:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", NonConvergenceWarning)  # a partial solve by design
            z, _ = model.solve(e, z0, n)
    z = unroll(lambda z: model.cell(z, e), z.detach(), max_iter=k).z
    return z, n, k


def training_loss(model: IterativeNet, x: Tensor, y: Tensor, iters: int, memorise_init: float = 0.0,
                  loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None, *, progressive: float = 0.0,
                  progressive_k: int | None = None,
                  generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """``loss_fn(head output, y)`` (default: cross-entropy per site) plus the memorise-init term,
    mixed with the progressive loss (weight ``progressive``, see :func:`progressive_state`), and
    the head output of the main solve. ``generator`` draws the progressive loss's ``n`` and ``k``."""
    if not 0.0 <= progressive <= 1.0:
        raise ValueError(f"progressive must be in [0, 1], got {progressive}")
    loss_fn = loss_fn or nn.functional.cross_entropy
    e = model.encoder(x)
    z0 = model.initial_state(e, model.init)
    z, _ = model.solve(e, z0, iters)
    logits = model.head(z)
    loss = loss_fn(logits, y)
    if memorise_init > 0 and model.iterative and x.shape[0] > 1:
        z_other, _ = model.solve(e, z.detach().roll(1, 0), iters)
        loss = loss + memorise_init * loss_fn(model.head(z_other), y.roll(1, 0))
    if progressive > 0:
        generator = generator if generator is not None else torch.Generator().manual_seed(0)
        z_prog, _, _ = progressive_state(model, e, z0, iters, generator, progressive_k)
        loss = (1 - progressive) * loss + progressive * loss_fn(model.head(z_prog), y)
    return loss, logits


def train_model(
    model: IterativeNet,
    data: TaskSet,
    spec: dict,
    *,
    device: torch.device | str = "cpu",
    progress: Callable[[int, int, float], None] | None = None,
    deadline: float | None = None,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    resume: str | os.PathLike | None = None,
    save_every_s: float = 60.0,
) -> dict:
    """Train ``model`` on ``data`` following ``spec``; returns the loss history and timing.

    ``spec`` keys (defaults): ``epochs`` (5), ``batch_size`` (64), ``lr`` (1e-3), ``weight_decay``
    (0), ``clip`` (1.0), ``warmup`` (fraction of steps, 0.05), ``budget`` (the model's ``iters``),
    ``memorise_init`` (0), ``seed`` (0), ``train_seconds`` (none: wall-clock budget; training ends at
    the budget or after ``epochs``, whichever comes first, and the cosine schedule follows whichever
    is further along), ``augment`` (false; mazes only, see :func:`augment_maze`), ``progressive``
    (0: DT-net's progressive-loss weight alpha, see :func:`training_loss`) and ``progressive_k``
    (none: cap on its unrolled steps).
    ``deadline`` (a :func:`time.time` value) stops training at once, schedule or not (the study's
    overall budget); the result then says ``"stopped_by": "deadline"``.
    ``progress(step, total, loss)`` is called every step.
    ``resume``: a file for the training state (weights, optimiser, random streams, place in the epoch,
    clock), written atomically every ``save_every_s`` seconds and when the deadline stops training,
    and read at the start when it holds the same ``spec``: a killed or cut-off training continues where
    it stopped, and one counted in epochs ends with the weights of a run that never stopped.
    """
    model.to(device).train()
    epochs, batch_size = int(spec.get("epochs", 5)), int(spec.get("batch_size", 64))
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be positive, got {epochs}, {batch_size}")
    gen = torch.Generator().manual_seed(int(spec.get("seed", 0)))
    budget = spec.get("budget", model.iters)
    optimiser = torch.optim.AdamW(model.parameters(), lr=float(spec.get("lr", 1e-3)),
                                  weight_decay=float(spec.get("weight_decay", 0.0)))
    steps_per_epoch = math.ceil(len(data) / batch_size)
    total = epochs * steps_per_epoch
    seconds = spec.get("train_seconds")
    seconds = float(seconds) if seconds else math.inf
    warmup = float(spec.get("warmup", 0.05))
    augment = bool(spec.get("augment", False))
    if augment and data.x.dim() != 4:
        raise ValueError("augment=true is for mazes (2-D inputs with passage channels)")
    base_lr = float(spec.get("lr", 1e-3))
    clip, memorise = float(spec.get("clip", 1.0)), float(spec.get("memorise_init", 0.0))
    progressive = float(spec.get("progressive", 0.0))
    progressive_k = spec.get("progressive_k")
    if progressive > 0 and not model.iterative:
        raise ValueError("progressive > 0 needs an iterative model (deq or recurrent), not a feed-forward stack")
    x_all, y_all = data.x.to(device), data.y.to(device)
    history, step, stopped_by, elapsed = [], 0, "epochs", 0.0
    epoch0, position0, order0 = 0, 0, None
    state = _load_training_state(resume, spec)
    if state is not None:
        model.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimiser"])
        gen.set_state(state["generator"])
        set_global_rng_state(state["global_rng"])
        history, step, elapsed = state["history"], state["step"], state["elapsed"]
        epoch0, position0, order0 = state["epoch"], state["position"], state["order"]
    start = time.perf_counter() - elapsed
    last_save = time.perf_counter()

    def save_state(epoch: int, position: int, order: Tensor) -> None:
        if resume is not None:
            save_torch_atomic({"spec": spec, "model": model.state_dict(), "optimiser": optimiser.state_dict(),
                               "generator": gen.get_state(), "global_rng": global_rng_state(), "step": step,
                               "history": history, "elapsed": time.perf_counter() - start, "epoch": epoch,
                               "position": position, "order": order.cpu()}, resume)

    def set_lr(frac: float) -> None:
        scale = min(1.0, (frac + 1e-9) / warmup) if warmup > 0 else 1.0
        for group in optimiser.param_groups:
            group["lr"] = base_lr * scale * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))

    def fraction() -> float:
        return max(step / total, (time.perf_counter() - start) / seconds)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonConvergenceWarning)  # training budgets are short by design
        for epoch in range(epoch0, epochs):
            if stopped_by != "epochs":
                break
            resumed = epoch == epoch0 and order0 is not None
            order = (order0 if resumed else torch.randperm(len(data), generator=gen)).to(device)
            batches = order.split(batch_size)
            for position in range(position0 if resumed else 0, len(batches)):
                batch = batches[position]
                frac = fraction()
                if frac >= 1.0:
                    stopped_by = "train_seconds"
                    break
                if deadline is not None and time.time() >= deadline:
                    stopped_by = "deadline"
                    save_state(epoch, position, order)
                    break
                set_lr(frac)
                iters = sample_budget(budget, gen)
                x, y = x_all[batch], y_all[batch]
                if augment:
                    x, y = augment_maze(x, y, gen)
                loss, _ = training_loss(model, x, y, iters, memorise, loss_fn, progressive=progressive,
                                        progressive_k=progressive_k, generator=gen)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"training loss became {loss.item()} at step {step}; lower lr")
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), clip)
                optimiser.step()
                step += 1
                history.append(loss.item())
                if progress is not None:
                    progress(step, total, history[-1])
                if time.perf_counter() - last_save >= save_every_s:
                    save_state(epoch, position + 1, order)
                    last_save = time.perf_counter()
    model.eval()
    return {"loss_history": history, "steps": step, "train_seconds": time.perf_counter() - start,
            "stopped_by": stopped_by}


def _load_training_state(path: str | os.PathLike | None, spec: dict) -> dict | None:
    if path is None or not os.path.exists(path):
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state if state.get("spec") == spec else None
