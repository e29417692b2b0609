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
from ..solvers import NonConvergenceWarning, SolverResult

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
    """

    inj_depth: int = 2
    eq_depth: int = 2
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

    def forward(self, h: Tensor) -> Tensor:
        B, N, D = h.shape
        q, k, v = self.qkv(self.norm1(h)).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
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
    """The weight-tied map ``f(z, u) = T(LN(z) + u)`` the DEQ layer solves."""

    def __init__(self, cfg: GETConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.eq_depth))

    def init_state(self, u: Tensor) -> Tensor:
        return torch.zeros_like(u)

    def forward(self, z: Tensor, u: Tensor) -> Tensor:
        h = self.norm(z) + u
        for blk in self.blocks:
            h = blk(h)
        return h


class GET(nn.Module):
    """Generative Equilibrium Transformer: noise -> injection -> equilibrium -> image.

    ``forward(x, y=None)`` returns the image; ``solve(x, y)`` also returns the
    equilibrium solve's :class:`SolverResult` (per-sample residuals and iterations).
    """

    def __init__(self, cfg: GETConfig):
        super().__init__()
        if cfg.backward not in ("phantom", "ift", "jfb", "unrolled"):
            raise ValueError(f'backward must be "phantom", "ift", "jfb" or "unrolled", got "{cfg.backward}"')
        self.cfg = cfg
        self.tokens = _Tokens(cfg)
        self.injection = nn.ModuleList(Block(cfg.dim, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.inj_depth))
        self.inj_norm = nn.LayerNorm(cfg.dim)
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
        """The injection ``u``: the noise tokens through the injection transformer, computed once."""
        h = self.tokens.encode(x, y)
        for blk in self.injection:
            h = blk(h)
        return self.inj_norm(h)

    def solve(self, x: Tensor, y: Tensor | None = None, *, max_iter: int | None = None) -> tuple[Tensor, SolverResult]:
        u = self.inject(x, y)
        if self.cfg.solver == "fixed":
            with warnings.catch_warnings():  # a fixed iteration count stops above tolerance by design
                warnings.simplefilter("ignore", NonConvergenceWarning)
                z, result = self.deq(u, max_iter=max_iter)
        else:
            z, result = self.deq(u, max_iter=max_iter)
        return self.tokens.decode(z), result

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        return self.solve(x, y)[0]


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

