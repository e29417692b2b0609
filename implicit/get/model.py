"""Generative Equilibrium Transformer (GET) and a ViT baseline of the same family.

Both map a noise image ``x_T`` to an image in one call, with no time embedding
(Geng, Pokle & Kolter, arXiv 2401.08639). They share the patch embedding,
transformer block and decoder; they differ in the middle:

- :class:`ViT`: ``depth`` distinct blocks applied once.
- :class:`GET`: an injection transformer encodes the noise tokens once into
  ``u``; a weight-tied equilibrium transformer ``f(z, u)`` is solved for
  ``z* = f(z*, u)`` by the package's DEQ layer (Anderson/Broyden to a tolerance,
  or ``solver="fixed"``: plain iteration for a fixed count, the paper's 6), and
  ``z*`` is decoded. Gradients come from the DEQ's backward (phantom or exact IFT).

The equilibrium map normalises its state before use, ``f(z, u) = T(LN(z) + u)``,
so its first iterate from ``z = 0`` is a plain transformer on ``u`` and the map
is a contraction at initialisation (LayerNorm shrinks a state whose per-token
spread exceeds one), which makes the fixed point well posed for the solvers.
With ``injection="every"`` (the paper's design, the default) each equilibrium
block also gets its own linear projection of ``u`` added to its query/key/value,
so the noise reaches every layer of every iteration instead of only the entry.

Training follows the paper by default (``train_unroll=6``): the map is iterated
6 times from ``z = 0`` with autograd through every step and the loss is put on the
decoded output of every iterate, weighted ``gamma**(K-1-k)`` (fixed-point
correction; :meth:`GET.iterate_weights`). The earlier default, a no-grad solve and
a one-step phantom gradient, trained a 1.8M-parameter GET far worse than a ViT of
the same size (experiments/results/get_distill_phantom_recipe.json); ``train_unroll=0`` keeps it.
``solver="fixed"`` runs exactly ``max_iter`` plain iterations and returns the last
one, ``f^K(z0)``, the same map training saw; the backend's solvers return each
sample's lowest-residual *input* iterate, which for a fixed count is at most
``f^(K-1)(z0)`` and so not what unrolled training optimised.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..deq import DEQ
from ..solvers import NonConvergenceWarning, SolverResult, unroll

__all__ = ["GETConfig", "ViTConfig", "GET", "ViT", "build_model", "count_params"]


@dataclass
class _Common:
    image_size: int = 32
    channels: int = 1
    patch: int = 4
    dim: int = 128
    heads: int = 4
    mlp_ratio: float = 4.0
    num_classes: int = 0  # > 0: class-conditional (a label embedding is added to every token)

    def check(self) -> None:
        if self.image_size % self.patch:
            raise ValueError(f"image_size {self.image_size} must be divisible by patch {self.patch}")
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} must be divisible by heads {self.heads}")


@dataclass
class ViTConfig(_Common):
    """A plain ViT generator: ``depth`` blocks applied once."""

    depth: int = 6


@dataclass
class GETConfig(_Common):
    """GET: ``inj_depth`` injection blocks, ``eq_depth`` weight-tied equilibrium blocks.

    ``solver`` is ``"fixed"`` (plain iteration, ``max_iter`` steps, never warns) or a backend
    solver name (``"anderson"``, ``"broyden"``, ``"picard"``) run to ``tol``; ``backward`` is
    ``"phantom"`` (``phantom_steps`` damped steps) or ``"ift"`` (exact implicit gradient).

    ``eq_mlp_ratio`` widens the equilibrium blocks' MLPs alone (the paper's GETs use 6-16 there).
    ``injection``: ``"every"`` adds a per-block projection of the injection to each equilibrium
    block's query/key/value (the paper's design), ``"input"`` only adds it to the state at the
    map's entry. ``train_unroll`` > 0: in training, iterate the map that many times from ``z0``
    with autograd through every step, the loss on every decoded iterate weighted
    ``iterate_gamma ** (K - 1 - k)`` (``iterate_gamma=0``: the last only); the solver and
    ``backward`` then serve evaluation only. ``train_unroll=0``: train through the solve and
    ``backward``.
    """

    inj_depth: int = 2
    eq_depth: int = 2
    eq_mlp_ratio: float | None = None  # the equilibrium blocks' MLP width (default: mlp_ratio)
    solver: str = "fixed"
    max_iter: int = 6
    eval_max_iter: int | None = None
    tol: float = 1e-3
    backward: str = "phantom"
    phantom_steps: int = 1
    phantom_damping: float = 0.8
    ift_tol: float = 1e-6
    ift_max_iter: int = 60
    solver_options: dict = dataclasses.field(default_factory=dict)
    injection: str = "every"
    train_unroll: int = 6
    iterate_gamma: float = 0.8

    def check(self) -> None:
        super().check()
        if self.injection not in ("every", "input"):
            raise ValueError(f'injection must be "every" or "input", got "{self.injection}"')
        if self.train_unroll < 0 or not 0 <= self.iterate_gamma <= 1:
            raise ValueError(f"need train_unroll >= 0 and iterate_gamma in [0, 1], got "
                             f"{self.train_unroll}, {self.iterate_gamma}")
        if self.solver == "fixed" and self.max_iter < 1:
            raise ValueError(f"solver fixed needs max_iter >= 1, got {self.max_iter}")


class Block(nn.Module):
    """Pre-LayerNorm transformer block (self-attention + MLP), optional additive conditioning."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))

    def forward(self, h: Tensor, qkv_inject: Tensor | None = None) -> Tensor:
        B, N, D = h.shape
        qkv = self.qkv(self.norm1(h))
        if qkv_inject is not None:
            qkv = qkv + qkv_inject
        q, k, v = qkv.view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, D)
        h = h + self.proj(a)
        return h + self.mlp(self.norm2(h))


class _Tokens(nn.Module):
    """Patch embedding + learned positions (+ label embedding), and the decoder back to pixels."""

    def __init__(self, cfg: _Common):
        super().__init__()
        cfg.check()
        self.cfg = cfg
        n = (cfg.image_size // cfg.patch) ** 2
        self.embed = nn.Conv2d(cfg.channels, cfg.dim, cfg.patch, stride=cfg.patch)
        self.pos = nn.Parameter(torch.randn(1, n, cfg.dim) * 0.02)
        self.label = nn.Embedding(cfg.num_classes, cfg.dim) if cfg.num_classes > 0 else None
        self.out_norm = nn.LayerNorm(cfg.dim)
        self.out = nn.Linear(cfg.dim, cfg.patch * cfg.patch * cfg.channels)

    def encode(self, x: Tensor, y: Tensor | None) -> Tensor:
        c = self.cfg
        if x.shape[1:] != (c.channels, c.image_size, c.image_size):
            raise ValueError(f"expected noise of shape (B, {c.channels}, {c.image_size}, {c.image_size}), "
                             f"got {tuple(x.shape)}")
        h = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        if self.label is not None:
            if y is None:
                raise ValueError("this model is class-conditional: pass labels y")
            h = h + self.label(y)[:, None]
        elif y is not None:
            raise ValueError("labels given to an unconditional model (num_classes=0)")
        return h

    def decode(self, h: Tensor) -> Tensor:
        c = self.cfg
        g, p = c.image_size // c.patch, c.patch
        out = self.out(self.out_norm(h)).view(h.shape[0], g, g, p, p, c.channels)
        return out.permute(0, 5, 1, 3, 2, 4).reshape(h.shape[0], c.channels, c.image_size, c.image_size)


class ViT(nn.Module):
    """One-step ViT generator, the baseline GET is compared with."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.tokens = _Tokens(cfg)
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        h = self.tokens.encode(x, y)
        for blk in self.blocks:
            h = blk(h)
        return self.tokens.decode(h)


class _Equilibrium(nn.Module):
    """The weight-tied map ``f(z, u) = T(LN(z) + u)`` the DEQ layer solves.

    ``u`` is the injection; with ``injection="every"`` it also carries, after the first ``dim``
    channels, each block's query/key/value injection (see :meth:`GET.inject`), computed once.
    """

    def __init__(self, cfg: GETConfig):
        super().__init__()
        self.dim, self.every = cfg.dim, cfg.injection == "every"
        self.norm = nn.LayerNorm(cfg.dim)
        ratio = cfg.mlp_ratio if cfg.eq_mlp_ratio is None else cfg.eq_mlp_ratio
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.heads, ratio) for _ in range(cfg.eq_depth))

    def init_state(self, u: Tensor) -> Tensor:
        return u.new_zeros(*u.shape[:-1], self.dim)

    def forward(self, z: Tensor, u: Tensor) -> Tensor:
        h = self.norm(z) + u[..., :self.dim]
        inj = u[..., self.dim:].chunk(len(self.blocks), dim=-1) if self.every else [None] * len(self.blocks)
        for blk, q in zip(self.blocks, inj):
            h = blk(h, q)
        return h


class GET(nn.Module):
    """Generative Equilibrium Transformer: noise -> injection -> equilibrium -> image.

    ``forward(x, y=None)`` returns the image; ``solve(x, y)`` also returns the
    equilibrium solve's :class:`SolverResult` (per-sample residuals and iterations).
    """

    def __init__(self, cfg: GETConfig):
        super().__init__()
        cfg.check()
        if cfg.backward not in ("phantom", "ift", "jfb", "unrolled"):
            raise ValueError(f'backward must be "phantom", "ift", "jfb" or "unrolled", got "{cfg.backward}"')
        self.cfg = cfg
        self.tokens = _Tokens(cfg)
        self.injection = nn.ModuleList(Block(cfg.dim, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.inj_depth))
        self.inj_norm = nn.LayerNorm(cfg.dim)
        # per-block q/k/v injections, zero at init so the map starts as the "input" design
        self.qkv_inj = nn.Linear(cfg.dim, 3 * cfg.dim * cfg.eq_depth) if cfg.injection == "every" else None
        if self.qkv_inj is not None:
            nn.init.zeros_(self.qkv_inj.weight)
            nn.init.zeros_(self.qkv_inj.bias)
        self.equilibrium = _Equilibrium(cfg)
        fixed = cfg.solver == "fixed"
        if cfg.backward == "phantom":
            bopts = {"steps": cfg.phantom_steps, "damping": cfg.phantom_damping}
        elif cfg.backward == "ift":
            bopts = {"tol": cfg.ift_tol, "max_iter": cfg.ift_max_iter}
        else:
            bopts = {}
        self.deq = DEQ(
            self.equilibrium,
            solver="picard" if fixed else cfg.solver,
            tol=1e-12 if fixed else cfg.tol,  # fixed: run exactly max_iter steps
            max_iter=cfg.max_iter,
            eval_max_iter=cfg.eval_max_iter,
            solver_options=dict(cfg.solver_options),
            backward=cfg.backward,
            backward_options=bopts,
            name="GET equilibrium transformer",
        )

    def inject(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """The injection ``u``: the noise tokens through the injection transformer, computed once
        (with ``injection="every"``, followed on the last axis by the blocks' q/k/v injections)."""
        h = self.tokens.encode(x, y)
        for blk in self.injection:
            h = blk(h)
        u = self.inj_norm(h)
        return u if self.qkv_inj is None else torch.cat([u, self.qkv_inj(h)], dim=-1)

    def iterate_weights(self) -> Tensor | None:
        """Loss weights of the decoded iterates ``forward(..., iterates=True)`` returns in training
        (summing to one), or ``None`` when training does not supervise iterates."""
        k = self.cfg.train_unroll
        if not self.training or k == 0:
            return None
        g = self.cfg.iterate_gamma
        w = torch.tensor([g ** (k - 1 - i) if g > 0 else float(i == k - 1) for i in range(k)])
        return w / w.sum()

    def _plain(self, u: Tensor, steps: int, keep: bool) -> tuple[list[Tensor], SolverResult]:
        """``steps`` plain iterations from the initial state, through the backend's :func:`unroll`;
        every iterate if ``keep``, else the last."""
        f = self.equilibrium
        result = unroll(lambda z: f(z, u), f.init_state(u), max_iter=steps, tol=self.cfg.tol, iterates=keep)
        return (result.stats.pop("iterates") if keep else [result.z]), result

    def solve(self, x: Tensor, y: Tensor | None = None, *, max_iter: int | None = None,
              iterates: bool = False) -> tuple[Tensor, SolverResult]:
        """The image (or, with ``iterates``, every decoded iterate stacked on a new first axis) and
        the solve's :class:`SolverResult`. In training with ``train_unroll`` > 0, the unrolled
        iterates; with ``solver="fixed"``, exactly ``max_iter`` plain iterations (``eval_max_iter``
        in eval); otherwise the backend's solver and the configured backward."""
        cfg = self.cfg
        u = self.inject(x, y)
        if self.training and cfg.train_unroll > 0:
            zs, result = self._plain(u, max_iter or cfg.train_unroll, keep=iterates)
        elif cfg.solver == "fixed" and not (self.training and torch.is_grad_enabled()):
            steps = max_iter or (cfg.max_iter if self.training else cfg.eval_max_iter or cfg.max_iter)
            zs, result = self._plain(u, steps, keep=iterates)
        elif cfg.solver == "fixed":
            with warnings.catch_warnings():  # a fixed iteration count stops above tolerance by design
                warnings.simplefilter("ignore", NonConvergenceWarning)
                z, result = self.deq(u, max_iter=max_iter)
            zs = [z]
        else:
            z, result = self.deq(u, max_iter=max_iter)
            zs = [z]
        if iterates:
            return torch.stack([self.tokens.decode(z) for z in zs]), result
        return self.tokens.decode(zs[-1]), result

    def forward(self, x: Tensor, y: Tensor | None = None, *, iterates: bool = False) -> Tensor:
        return self.solve(x, y, iterates=iterates)[0]


def build_model(kind: str, **options: Any) -> nn.Module:
    """``"get"`` or ``"vit"`` with its config fields as keyword options."""
    kinds = {"get": (GET, GETConfig), "vit": (ViT, ViTConfig)}
    if kind not in kinds:
        raise ValueError(f'model kind must be one of {sorted(kinds)}, got "{kind}"')
    cls, cfg_cls = kinds[kind]
    fields = {f.name for f in dataclasses.fields(cfg_cls)}
    unknown = set(options) - fields
    if unknown:
        raise ValueError(f"unknown {kind} options {sorted(unknown)}; allowed: {sorted(fields)}")
    return cls(cfg_cls(**options))


def count_params(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

