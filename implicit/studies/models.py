"""Equilibrium models with input injection, and the baselines they are compared with.

One architecture for both tasks (2-D convolutions for mazes, 1-D for prefix sums): an encoder
``e = E(x)``, a weight-tied cell ``z -> f(z, e)`` and a per-site head ``H(z) -> logits``.

- ``kind="deq"``: ``z* = f(z*, e)`` solved by the backend through :class:`implicit.deq.DEQ`;
  more test-time iterations mean a larger solver budget.
- ``kind="recurrent"``: the same cell applied a fixed number of times from ``z0`` and trained
  by backpropagation through the unroll (a DT-net-style weight-tied recurrent baseline).
- ``kind="feedforward"``: ``depth`` cells with their own weights, applied once each; it has no
  notion of more iterations.

Without input injection the cell ignores ``e`` and the input reaches the state only through
``z0 = e``; that only trains by backpropagating through the unroll, so it is a ``recurrent``
option (an implicit gradient cannot reach the encoder through ``z0``).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from implicit.deq import DEQ
from implicit.solvers import SolverResult, unroll

KINDS = ("deq", "recurrent", "feedforward")
INITS = ("zero", "random")


def _conv(dim: int) -> type[nn.Module]:
    if dim not in (1, 2):
        raise ValueError(f"dim must be 1 (prefix sums) or 2 (mazes), got {dim}")
    return nn.Conv1d if dim == 1 else nn.Conv2d


class ChannelNorm(nn.Module):
    """Layer norm over the channels of each site: unlike group or batch norm it uses no statistics
    over space, so a model trained on small inputs sees the same normalisation on large ones."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)

    def forward(self, h: Tensor) -> Tensor:
        return self.norm(h.movedim(1, -1)).movedim(-1, 1)


class ResidualBlock(nn.Module):
    """``h -> relu(h + C2 relu(C1 h))`` with two 3x3 convolutions (DT-net's recurrent block,
    Bansal et al., 2022, uses two of these per iteration)."""

    def __init__(self, dim: int, width: int):
        super().__init__()
        conv = _conv(dim)
        self.c1 = conv(width, width, 3, padding=1)
        self.c2 = conv(width, width, 3, padding=1)

    def forward(self, h: Tensor) -> Tensor:
        return torch.relu(h + self.c2(torch.relu(self.c1(h))))


class Cell(nn.Module):
    """``f(z, e) = tanh(B R(relu(N(A z + e))))`` (``+ e`` only with input injection; ``N`` a per-site
    channel norm when ``norm``; ``R`` = ``depth`` :class:`ResidualBlock` s, none by default);
    bounded, so long solves stay finite. With ``skip`` the state is carried over,
    ``tanh(z + B R(...))``: without input injection the input lives only in ``z0``, and the plain
    cell, a contraction at initialisation, forgets it within a few steps, so such a net never
    trains. ``depth = 2`` gives 6 convolutions per iteration, close to
    DT-net's recurrent block (projection of state and input, then 2 residual blocks)."""

    def __init__(self, dim: int, width: int, injection: bool = True, norm: bool = False, depth: int = 0,
                 skip: bool = False):
        super().__init__()
        if depth < 0:
            raise ValueError(f"block_depth must be >= 0, got {depth}")
        conv = _conv(dim)
        self.a = conv(width, width, 3, padding=1)
        self.b = conv(width, width, 3, padding=1)
        self.norm = ChannelNorm(width) if norm else nn.Identity()
        self.blocks = nn.Sequential(*(ResidualBlock(dim, width) for _ in range(depth)))
        self.injection, self.skip = injection, skip

    def forward(self, z: Tensor, e: Tensor) -> Tensor:
        h = self.a(z)
        if self.injection:
            h = h + e
        h = self.b(self.blocks(torch.relu(self.norm(h))))
        return torch.tanh(z + h if self.skip else h)


class IterativeNet(nn.Module):
    """Encoder, weight-tied cell (equilibrium or recurrent) or untied stack, and per-site head.

    Args:
        dim: 2 for mazes, 1 for prefix sums; in_channels: input channels.
        width: channels of the state ``z``.
        kind: ``"deq"``, ``"recurrent"`` or ``"feedforward"`` (see the module docstring).
        injection: feed ``e`` to the cell at every iteration (``False``: only through ``z0``; recurrent only).
        init: training initial state, ``"zero"`` or ``"random"`` (Gaussian, ``init_scale``); evaluation starts from zero.
        iters: training solver budget (DEQ ``max_iter``) or unroll depth (recurrent) or depth (feed-forward).
        solver, tol, backward, backward_options: the DEQ's forward solver and gradient.
        norm: per-site channel norm inside the cell (:class:`ChannelNorm`).
        out_channels: channels of the head's output (2 logits per site; 1 for a regression such as Darcy).
        block_depth: residual blocks inside the cell (:class:`Cell`), 0 for the plain two-conv cell.
        skip: carry the state over inside the cell (``tanh(z + ...)``); needed without injection.
        eval_solver: the DEQ's solver in eval mode (default: ``solver``), e.g. ``"picard"``: plain
            iteration, the dynamics a DT-net runs at test time, instead of Anderson's extrapolation.
        solver_options: extra options of the DEQ's solvers, e.g. ``{"graph": True}`` to replay the
            solves as CUDA graphs (fewer kernel launches: these small models are launch-bound).
    """

    def __init__(
        self,
        dim: int,
        in_channels: int,
        width: int = 32,
        *,
        kind: str = "deq",
        injection: bool = True,
        init: str = "zero",
        init_scale: float = 1.0,
        iters: int = 30,
        solver: str = "anderson",
        tol: float = 1e-4,
        backward: str = "phantom",
        backward_options: dict | None = None,
        norm: bool = False,
        out_channels: int = 2,
        block_depth: int = 0,
        skip: bool = False,
        eval_solver: str | None = None,
        solver_options: dict | None = None,
    ):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f'kind must be one of {KINDS}, got "{kind}"')
        if init not in INITS:
            raise ValueError(f'init must be one of {INITS}, got "{init}"')
        if not injection and kind != "recurrent":
            raise ValueError('injection=false needs kind="recurrent": without injection the input only sets z0, '
                             "which an implicit gradient cannot train")
        conv = _conv(dim)
        self.dim, self.kind, self.injection, self.init, self.init_scale = dim, kind, injection, init, init_scale
        self.iters, self.width = iters, width
        self.encoder = nn.Sequential(conv(in_channels, width, 3, padding=1), nn.ReLU(), conv(width, width, 3, padding=1))
        self.head = nn.Sequential(conv(width, width, 3, padding=1), nn.ReLU(), conv(width, out_channels, 1))
        if kind == "feedforward":
            self.cells = nn.ModuleList(Cell(dim, width, True, norm, block_depth, skip) for _ in range(iters))
        else:
            self.cell = Cell(dim, width, injection, norm, block_depth, skip)
        if kind == "deq":
            options = {"steps": 5, "damping": 0.8} if backward == "phantom" else {}
            options.update(backward_options or {})
            self.deq = DEQ(self.cell, solver=solver, tol=tol, max_iter=iters, eval_solver=eval_solver,
                           solver_options=solver_options, backward=backward, backward_options=options,
                           name=f"maze/prefix-sum {kind} cell")

    @property
    def iterative(self) -> bool:
        """True when more test-time iterations mean something (not the feed-forward stack)."""
        return self.kind != "feedforward"

    def initial_state(self, e: Tensor, init: str | None = None, generator: torch.Generator | None = None) -> Tensor:
        """``z0`` for encoded inputs ``e``: zeros or Gaussian noise, plus ``e`` itself without injection."""
        init = init or "zero"
        if init not in INITS:
            raise ValueError(f'init must be one of {INITS}, got "{init}"')
        z0 = torch.zeros_like(e)
        if init == "random":
            noise = torch.randn(e.shape, generator=generator, device="cpu" if generator else e.device)
            z0 = self.init_scale * noise.to(e)
        return z0 + e if not self.injection else z0

    def solve(self, e: Tensor, z0: Tensor, iters: int) -> tuple[Tensor, SolverResult | None]:
        """The final state after ``iters`` solver iterations (DEQ) or unroll steps (recurrent)."""
        if self.kind == "deq":
            return self.deq(e, z0, max_iter=iters)
        if self.kind == "recurrent":
            result = unroll(lambda z: self.cell(z, e), z0, max_iter=iters)
            return result.z, result
        z = z0
        for cell in self.cells:
            z = cell(z, e)
        return z, None

    def forward(self, x: Tensor, *, iters: int | None = None, init: str | None = None,
                z0: Tensor | None = None) -> tuple[Tensor, SolverResult | None]:
        """Logits ``(B, 2, *spatial)`` and the solve's result. ``init`` defaults to the
        training init in training mode and ``"zero"`` in eval mode."""
        e = self.encoder(x)
        if z0 is None:
            z0 = self.initial_state(e, init or (self.init if self.training else "zero"))
        z, result = self.solve(e, z0, iters or self.iters)
        return self.head(z), result

    def fixed_point_map(self, x: Tensor) -> tuple[Callable[[Tensor, Tensor], Tensor], Tensor]:
        """``(f, e)`` with ``f(z, e)`` the cell, for the analysis tools (alignment, traces)."""
        if not self.iterative:
            raise ValueError("a feed-forward model has no fixed-point map")
        return self.cell, self.encoder(x)


def build_model(task: str, spec: dict) -> IterativeNet:
    """An :class:`IterativeNet` for ``task`` (``"maze"`` or ``"prefix_sums"``) from a model spec (config table)."""
    shapes = {"maze": (2, 7), "prefix_sums": (1, 1)}
    if task not in shapes:
        raise ValueError(f'task must be one of {sorted(shapes)}, got "{task}"')
    dim, channels = shapes[task]
    budget = spec.get("budget", spec.get("iters", 30))
    iters = max(budget) if isinstance(budget, (list, tuple)) else int(budget)
    return IterativeNet(
        dim, channels, spec.get("width", 32), kind=spec.get("kind", "deq"), injection=spec.get("injection", True),
        init=spec.get("init", "zero"), init_scale=spec.get("init_scale", 1.0), iters=iters,
        solver=spec.get("solver", "anderson"), tol=spec.get("tol", 1e-4), backward=spec.get("backward", "phantom"),
        backward_options=spec.get("backward_options"), norm=spec.get("norm", False),
        block_depth=int(spec.get("block_depth", 0)), skip=bool(spec.get("skip", False)),
        eval_solver=spec.get("eval_solver"), solver_options=spec.get("solver_options"),
    )
