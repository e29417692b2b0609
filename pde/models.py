"""Neural operators for steady-state PDEs: FNO, FNO++, IFNO and FNO-DEQ.

All four are assembled from neuraloperator's layers (``SpectralConv``, ``ChannelMLP``,
``GridEmbeddingND``; neuraloperator's ``FNO`` itself for the plain baseline), following the FNO-DEQ
paper (Marwah et al., 2023, arXiv 2312.00234) and its released code (risteskilab/deq-neural-operators):

- ``fno``: neuraloperator's ``FNO`` with ``3 * depth + 1`` Fourier layers (depth 1, 2, 4, 8
  give about 2.6M, 4.5M, 8.3M, 16M parameters at width 32 and 12 modes; the paper's 2.4M,
  4.2M, 7.7M, 14.8M).
- ``fno++``: ``depth`` untied blocks of three Fourier layers, each layer with the lifted input
  injected, then one output Fourier layer (the paper's ``FNO2dDeep``).
- ``ifno``: one such block with tied weights applied ``iterations`` times from zero, trained by
  backprop through every application (the paper's FNO-WT).
- ``fno-deq``: the tied block as ``f(z, inj)``; its fixed point ``z* = f(z*, inj)`` is found by
  the package's solvers through :class:`implicit.deq.DEQ` and differentiated implicitly
  (``ift``), or by phantom gradients / JFB. The first ``pretrain_steps`` training steps run
  ``pretrain_iter`` plain unrolled iterations instead (the paper's warm-up).

The injected block is the paper's ``BasicBlock``: ``z <- gelu(mlp(K z) + W z + inj)`` per layer, with
instance norms at the paper's places when ``norm="instance_norm"`` (the paper: on for Navier-Stokes,
off for Darcy), and spectral weights initialised at the FNO reference scale
(``spectral_init="fno"``). Without a norm this block starts as a contraction; neuraloperator's
``FNOBlocks`` (identity-gated skip around the channel MLP, larger spectral init) did not.

Norms and the fixed point. FNO-DEQ defaults to ``norm=None`` on both problems; the paper's instance norm on
Navier-Stokes is a deviation we do not follow (the baselines keep it). Instance norm rescales every channel
of ``K z``, ``mlp(K z)`` and ``W z`` to unit variance per sample, whatever the weights: it undoes the small
spectral init and the weight decay and makes the block's output sensitive to ``z`` at ``1 / std`` of each
channel. The normalised block is expansive at initialisation (Jacobian norm at its Anderson iterate about 4
at width 16 and 11 at width 32 on steady Navier-Stokes inputs, against 0.08 without a norm), Anderson stalls
at a relative residual of about 0.6 and more iterations do not help (0.62 after 100). Trained with phantom
gradients, such a model learns to fit "24 Anderson steps + 3 damped steps" rather than a fixed point: on
the H100 (experiments/results/fno_deq_ns_instance_norm.json, the run before the norm was dropped) it
reached train rel L2 0.073 but test 0.165 at test residual 0.38. The gap is the two forwards differing,
not overfitting: on the CPU the same model evaluated in eval mode on its training samples erred as on
the test set (width 16: 0.28 vs 0.27). Without the norm the same training converges to relative
residual ~1e-7 in ~8 iterations and generalises (CPU, 32x32 NS, width 32, 2 seeds: test rel L2 0.044
and 0.040 against 0.230 and 0.510; see ``experiments/configs/ns-fno-deq.toml``). ``group_norm`` (one group: statistics over all channels, so
channel ratios survive) is contractive at init too (Jacobian norm 0.6 to 1.1), but with little margin: in
the same CPU run it needed up to 24 iterations early in training. :class:`FNODEQ` warns when built with
``instance_norm``.

Grid coordinates. Every model appends the grid's coordinates to its input as two channels. ``grid="periodic"``
(the constructors' default, and what checkpoints from before the option used) places point ``i`` of ``s`` at
``i / s``, neuraloperator's ``GridEmbeddingND``: right for the periodic Navier-Stokes grid. ``grid="closed"``
places it at ``i / (s - 1)``, both ends included: right for Darcy's grid, which holds both walls, and what
the paper's code uses on every problem. On another resolution (zero-shot transfer) a physical point then
keeps its coordinate; with ``periodic`` on Darcy the far wall sits at ``(s - 1) / s``, which moves with ``s``.
Training picks the data's kind (:mod:`pde.train`).

``modes`` follows the FNO papers' convention (modes kept per direction and sign, 12 in the
paper); neuraloperator's ``n_modes`` is ``2 * modes``. Models are built with keyword
arguments only and remember them, so :func:`load_model` rebuilds one from its checkpoint
alone (``torch.load(weights_only=True)``). Inputs and outputs are ``(B, C, s, s)``, already
normalised; the normalisers live in the :class:`Operator` wrapper beside the network.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from implicit.solvers import NonConvergenceWarning, unroll

__all__ = [
    "MODELS", "NeuralOperator", "FNO", "FNOPlusPlus", "IFNO", "FNODEQ", "Operator",
    "build_model", "available_models", "count_parameters", "cast_model", "load_model", "read_checkpoint",
]

MODELS: dict[str, type["NeuralOperator"]] = {}
NORMS = ("instance_norm", "group_norm", None)
GRIDS = ("periodic", "closed")
SPECTRAL_INITS = ("fno", "neuralop")


def _identity(x: Tensor) -> Tensor:
    return x


def _null():
    import contextlib

    return contextlib.nullcontext()


class NeuralOperator(nn.Module):
    """Base class: a registry by name and the constructor kwargs kept for checkpoints."""

    def __init_subclass__(cls, name: str | None = None, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        if name is not None:
            cls.model_name = name
            MODELS[name] = cls

    def __new__(cls, *args: Any, **kwargs: Any):
        if args:
            raise TypeError(f"{cls.__name__} takes keyword arguments only (they are stored in checkpoints)")
        obj = super().__new__(cls)
        obj.init_kwargs = dict(kwargs)
        return obj

    #: statistics of the last forward solve (None for explicit models)
    last_stats: dict | None = None

    def config(self) -> dict:
        """``{"model": name, **constructor kwargs}``: enough to rebuild the model."""
        return {"model": self.model_name, **self.init_kwargs}


def _check_common(in_channels: int, out_channels: int, width: int, modes: int, padding: float) -> None:
    for k, v in (("in_channels", in_channels), ("out_channels", out_channels), ("width", width), ("modes", modes)):
        if int(v) != v or v < 1:
            raise ValueError(f"{k} must be a positive integer, got {v!r}")
    if not 0 <= padding < 1:
        raise ValueError(f"padding is a fraction of the grid size in [0, 1), got {padding!r}")


class ClosedGridCoordinates(nn.Module):
    """Appends the coordinates ``(i / (h - 1), j / (w - 1))`` of a grid whose points include both ends (walls),
    as two channels: the ``grid="closed"`` counterpart of neuraloperator's periodic ``GridEmbeddingND``."""

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        gx, gy = torch.meshgrid(torch.linspace(0, 1, h, device=x.device, dtype=x.dtype),
                                torch.linspace(0, 1, w, device=x.device, dtype=x.dtype), indexing="ij")
        return torch.cat([x, gx.expand(b, 1, h, w), gy.expand(b, 1, h, w)], dim=1)


def _grid_embedding(in_channels: int, grid: str) -> nn.Module:
    if grid not in GRIDS:
        raise ValueError(f"grid must be one of {GRIDS}, got {grid!r}")
    if grid == "closed":
        return ClosedGridCoordinates()
    from neuralop.layers.embeddings import GridEmbeddingND

    return GridEmbeddingND(in_channels, dim=2, grid_boundaries=[[0, 1], [0, 1]])


class _Stem(nn.Module):
    """Grid embedding + lifting to ``width`` channels + one-sided zero padding (non-periodic data)."""

    def __init__(self, in_channels: int, width: int, padding: float, grid: str = "periodic"):
        super().__init__()
        from neuralop.layers.channel_mlp import ChannelMLP

        self.grid = _grid_embedding(in_channels, grid)
        self.lift = ChannelMLP(in_channels + 2, width, hidden_channels=width, n_layers=1)
        self.padding = padding

    def pad_size(self, x: Tensor) -> int:
        return math.ceil(self.padding * x.shape[-1]) if self.padding > 0 else 0

    def forward(self, x: Tensor) -> Tensor:
        v = self.lift(self.grid(x))
        p = self.pad_size(x)
        return F.pad(v, [0, p, 0, p]) if p else v

    @staticmethod
    def unpad(v: Tensor, p: int) -> Tensor:
        return v[..., : v.shape[-2] - p, : v.shape[-1] - p] if p else v


def _spectral_conv_fp32(bias: bool = True):
    """neuraloperator's ``SpectralConv`` that runs in float32 under autocast (FFTs in bf16/fp16 are
    unsupported or need power-of-two sizes), so mixed precision speeds up only the pointwise layers.
    ``bias``: its default for the ``bias`` argument (neuraloperator's FNO passes none of its own)."""
    from neuralop.layers.spectral_convolution import SpectralConv

    class SpectralConvFP32(SpectralConv):
        def __init__(self, *args: Any, **kwargs: Any):
            kwargs.setdefault("bias", bias)
            super().__init__(*args, **kwargs)

        def forward(self, x: Tensor, output_shape: Any = None) -> Tensor:
            if torch.is_autocast_enabled(x.device.type):
                with torch.autocast(x.device.type, enabled=False):
                    return super().forward(x.float(), output_shape=output_shape)
            return super().forward(x, output_shape=output_shape)

    return SpectralConvFP32


def _paper_spectral_init(conv: nn.Module) -> None:
    """The FNO reference code's (and the FNO-DEQ paper's) spectral weights: real and imaginary parts
    ``U(0, 1) / (in_channels * out_channels)``, about 300x smaller than neuraloperator's default
    (std ``sqrt(2 / (in + out))``). With it the injected block starts close to a contraction (its
    spectral part nearly off); with neuraloperator's scale the un-normalised block expands."""
    w = conv.weight.tensor if hasattr(conv.weight, "tensor") else conv.weight
    scale = 1.0 / (conv.in_channels * conv.out_channels)
    with torch.no_grad():
        w.copy_(torch.complex(torch.rand(w.shape), torch.rand(w.shape)).to(w) * scale)


class InjectedBlock(nn.Module):
    """The FNO-DEQ paper's block (its ``BasicBlock``), built from neuraloperator's layers: per layer

        z <- gelu(mlp_i(K_i z) + W_i z + inj)

    with ``K_i`` a spectral convolution, ``mlp_i`` a channel MLP (width -> width -> width, GELU),
    ``W_i`` a pointwise linear map. ``norm="instance_norm"`` puts instance norms where the paper's
    ``normalize=True`` does (on the incoming state, after ``K_i``, after ``mlp_i``, after ``W_i``); the
    paper turns it on for Navier-Stokes and leaves it off on Darcy (IFNO and FNO++ here follow it; FNO-DEQ
    does not: instance norm makes the block expansive, see the module docstring). ``spectral_bias=False``
    leaves out neuraloperator's per-channel bias of ``K_i`` (the papers' spectral convolution has none; it
    is redundant with ``mlp_i``'s first bias but starts random). The map ``f(z, inj)`` whose fixed point
    FNO-DEQ finds."""

    def __init__(self, width: int, modes: int, layers: int = 3, norm: str | None = None,
                 spectral_init: str = "fno", spectral_bias: bool = True):
        super().__init__()
        from neuralop.layers.channel_mlp import ChannelMLP

        if spectral_init not in SPECTRAL_INITS:
            raise ValueError(f"spectral_init must be one of {SPECTRAL_INITS}, got {spectral_init!r}")
        conv = _spectral_conv_fp32()
        self.layers = layers
        self.convs = nn.ModuleList([conv(width, width, (2 * modes, 2 * modes), bias=spectral_bias)
                                    for _ in range(layers)])
        self.mlps = nn.ModuleList([ChannelMLP(width, width, hidden_channels=width, n_layers=2)
                                   for _ in range(layers)])
        self.skips = nn.ModuleList([nn.Conv2d(width, width, 1) for _ in range(layers)])
        if spectral_init == "fno":
            for c in self.convs:
                _paper_spectral_init(c)
        if norm == "instance_norm":
            self.norm: nn.Module | None = nn.InstanceNorm2d(width)
        elif norm == "group_norm":
            self.norm = nn.GroupNorm(1, width)
        else:
            self.norm = None

    #: ``(device_type, dtype)`` to compute in under autocast while the solver itself runs without it
    autocast: tuple[str, torch.dtype] | None = None

    def _n(self, v: Tensor) -> Tensor:
        return self.norm(v) if self.norm is not None else v

    def forward(self, z: Tensor, inj: Tensor) -> Tensor:
        dtype = z.dtype
        with torch.autocast(self.autocast[0], dtype=self.autocast[1], enabled=self.autocast is not None) \
                if self.autocast is not None else _null():
            z = self._n(z)
            for i in range(self.layers):
                x1 = self._n(self.mlps[i](self._n(self.convs[i](z))))
                x2 = self._n(self.skips[i](z))
                z = F.gelu(x1 + x2 + inj)
        return z.to(dtype)  # under autocast the solver's state stays in its own precision


class OutputLayer(InjectedBlock):
    """The paper's output Fourier layer: ``mlp(K z) + W z``, no injection, no activation."""

    def __init__(self, width: int, modes: int, norm: str | None = None, spectral_init: str = "fno",
                 spectral_bias: bool = True):
        super().__init__(width, modes, 1, norm, spectral_init, spectral_bias)

    def forward(self, z: Tensor) -> Tensor:  # type: ignore[override]
        return self._n(self.mlps[0](self._n(self.convs[0](z)))) + self._n(self.skips[0](z))


class _InjectedOperator(NeuralOperator):
    """Shared stem, output layer and projection of FNO++, IFNO and FNO-DEQ."""

    def _build(self, in_channels: int, out_channels: int, width: int, modes: int, padding: float,
               layers_per_block: int, norm: str | None, spectral_init: str = "fno",
               spectral_bias: bool = True, grid: str = "periodic") -> None:
        _check_common(in_channels, out_channels, width, modes, padding)
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        from neuralop.layers.channel_mlp import ChannelMLP

        self.in_channels, self.out_channels, self.width = in_channels, out_channels, width
        self.stem = _Stem(in_channels, width, padding, grid)
        self.head = OutputLayer(width, modes, norm, spectral_init, spectral_bias)
        self.project = ChannelMLP(width, out_channels, hidden_channels=4 * width, n_layers=2)
        self.layers_per_block = layers_per_block

    def equilibrium(self, inj: Tensor, z0: Tensor | None) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor, z0: Tensor | None = None) -> Tensor:
        """``(B, C_in, s, s)`` -> ``(B, C_out, s, s)``; ``z0`` warm-starts the latent state (padded grid)."""
        inj = self.stem(x)
        z = self.equilibrium(inj, z0)
        self.last_state = z.detach()
        out = self.head(z)
        out = _Stem.unpad(out, self.stem.pad_size(x))
        return self.project(out)


class FNOPlusPlus(_InjectedOperator, name="fno++"):
    """FNO with the input injected into every layer: ``depth`` untied three-layer blocks."""

    def __init__(self, *, in_channels: int = 1, out_channels: int = 1, width: int = 32, modes: int = 12,
                 depth: int = 1, padding: float = 0.1, layers_per_block: int = 3,
                 norm: str | None = "instance_norm", spectral_init: str = "fno", spectral_bias: bool = True,
                 grid: str = "periodic"):
        super().__init__()
        if int(depth) != depth or depth < 1:
            raise ValueError(f"depth must be a positive integer, got {depth!r}")
        self._build(in_channels, out_channels, width, modes, padding, layers_per_block, norm, spectral_init,
                    spectral_bias, grid)
        self.blocks = nn.ModuleList([InjectedBlock(width, modes, layers_per_block, norm, spectral_init, spectral_bias)
                                     for _ in range(depth)])

    def equilibrium(self, inj: Tensor, z0: Tensor | None) -> Tensor:
        z = torch.zeros_like(inj) if z0 is None else z0
        for block in self.blocks:
            z = block(z, inj)
        return z


class IFNO(_InjectedOperator, name="ifno"):
    """Weight-tied (implicit-style) FNO: one block applied ``iterations`` times, unrolled backprop.
    ``checkpoint_unrolled`` recomputes each application in the backward (same gradient, memory of one state
    per iteration instead of the block's activations)."""

    def __init__(self, *, in_channels: int = 1, out_channels: int = 1, width: int = 32, modes: int = 12,
                 iterations: int = 8, padding: float = 0.1, layers_per_block: int = 3,
                 norm: str | None = "instance_norm", spectral_init: str = "fno", spectral_bias: bool = True,
                 checkpoint_unrolled: bool = False, grid: str = "periodic"):
        super().__init__()
        if int(iterations) != iterations or iterations < 1:
            raise ValueError(f"iterations must be a positive integer, got {iterations!r}")
        self._build(in_channels, out_channels, width, modes, padding, layers_per_block, norm, spectral_init,
                    spectral_bias, grid)
        self.iterations, self.checkpoint_unrolled = iterations, checkpoint_unrolled
        self.block = InjectedBlock(width, modes, layers_per_block, norm, spectral_init, spectral_bias)

    def equilibrium(self, inj: Tensor, z0: Tensor | None) -> Tensor:
        z0 = torch.zeros_like(inj) if z0 is None else z0
        result = unroll(lambda z: self.block(z, inj), z0, max_iter=self.iterations,
                        checkpoint=self.checkpoint_unrolled)
        # the last step's size ||z_K - z_{K-1}|| is the block's residual at z_{K-1}: whether the unrolled
        # iterates reached a fixed point, reported as FNO-DEQ's solve is (z detached: no graph kept). The
        # residuals stay tensors in last_result: no device sync on every training step
        self.last_result = dataclasses.replace(result, z=result.z.detach())
        self.last_stats = {"mode": "unrolled", "n_iter": float(self.iterations)}
        return result.z


class FNODEQ(_InjectedOperator, name="fno-deq"):
    """FNO-DEQ (Marwah et al., 2023): the output layer applied to the fixed point of a tied block.

    Args:
        solver, tol, max_iter, eval_max_iter, solver_options: the forward solve (paper: Anderson,
            memory 5, from zero, 32 iterations on Darcy, 16-24 on Navier-Stokes).
        backward: ``"ift"`` (exact implicit gradient, default), ``"phantom"``, ``"jfb"`` or
            ``"unrolled"``; ``backward_options`` e.g. ``{"steps": 1, "damping": 0.5}`` for phantom.
        pretrain_steps, pretrain_iter: the first ``pretrain_steps`` training forwards run
            ``pretrain_iter`` unrolled iterations with plain backprop (paper: 300 and 8).
        checkpoint_unrolled: recompute the warm-up's iterations in the backward instead of keeping their
            activations (same gradient; the warm-up otherwise needs about twice the memory of the implicit
            training, 13.5 GB against about 7 GB per run at the paper's NS size).
        jac_reg_samples: if > 0, each training solve also estimates ``||df/dz||_F^2 / n`` at the fixed
            point with that many probes (``last_result.stats["jac_loss"]``, differentiable), for the
            Jacobian regularisation of Bai et al. (2021) that keeps the tied block a contraction.
        norm: ``None`` (default, on Darcy as the paper and on Navier-Stokes unlike it) keeps the block a
            contraction at init; ``"instance_norm"`` (the paper's Navier-Stokes setting) makes it
            expansive, so the solve does not converge and a warning says so; see the module docstring.
    """

    def __init__(self, *, in_channels: int = 1, out_channels: int = 1, width: int = 32, modes: int = 12,
                 padding: float = 0.1, layers_per_block: int = 3, norm: str | None = None,
                 spectral_init: str = "fno", spectral_bias: bool = True, solver: str = "anderson",
                 tol: float = 1e-6, max_iter: int = 32, eval_max_iter: int | None = None,
                 solver_options: dict | None = None, backward: str = "ift",
                 backward_options: dict | None = None, pretrain_steps: int = 0, pretrain_iter: int = 8,
                 jac_reg_samples: int = 0, checkpoint_unrolled: bool = False, grid: str = "periodic"):
        super().__init__()
        from implicit.deq import DEQ

        self._build(in_channels, out_channels, width, modes, padding, layers_per_block, norm, spectral_init,
                    spectral_bias, grid)
        if norm == "instance_norm":
            warnings.warn("FNO-DEQ with norm='instance_norm': per-channel normalisation inside the tied block "
                          "makes it expansive, so the fixed-point solve does not converge (relative residual "
                          "~0.6 on Navier-Stokes) and test-time outputs differ from training's; use norm=None "
                          "(the default) or 'group_norm'", UserWarning, stacklevel=2)
        if pretrain_steps < 0 or pretrain_iter < 1:
            raise ValueError(f"pretrain_steps must be >= 0 and pretrain_iter >= 1, got {pretrain_steps}, {pretrain_iter}")
        self.block = InjectedBlock(width, modes, layers_per_block, norm, spectral_init, spectral_bias)
        opts = {"m": 5} if solver == "anderson" else {}
        opts.update(solver_options or {})
        bopts = dict(backward_options or {})
        if backward == "ift":
            bopts.setdefault("max_iter", max_iter)
            bopts.setdefault("tol", tol)
            bopts["on_result"] = self._record_adjoint  # non-convergence of the adjoint becomes data too
        self.deq = DEQ(self.block, solver=solver, tol=tol, max_iter=max_iter, eval_max_iter=eval_max_iter,
                       solver_options=opts, backward=backward, backward_options=bopts,
                       stop_mode="rel", jac_reg_samples=jac_reg_samples, name="FNO-DEQ")
        self.last_adjoint: dict | None = None
        self.pretrain_steps, self.pretrain_iter = pretrain_steps, pretrain_iter
        self.checkpoint_unrolled = checkpoint_unrolled
        self.register_buffer("train_steps", torch.zeros((), dtype=torch.long))

    def _record_adjoint(self, result: Any) -> None:
        """The last ``ift`` backward's adjoint solve (training records it per epoch, in place of a warning)."""
        self.last_adjoint = {"n_iter": float(result.n_iter.float().mean()),
                             "residual": float(result.residual.float().mean()),
                             "rel_residual": float(result.rel_residual.float().mean()),
                             "converged": float(result.converged.float().mean())}

    def equilibrium(self, inj: Tensor, z0: Tensor | None) -> Tensor:
        training = self.training and torch.is_grad_enabled()
        if training:
            self.train_steps += 1
        if training and int(self.train_steps) <= self.pretrain_steps:
            z0 = torch.zeros_like(inj) if z0 is None else z0
            z = unroll(lambda z: self.block(z, inj), z0, max_iter=self.pretrain_iter,
                       checkpoint=self.checkpoint_unrolled).z
            self.last_stats = {"mode": "pretrain", "n_iter": float(self.pretrain_iter)}
            return z
        dev = inj.device.type
        amp = torch.is_autocast_enabled(dev)
        # mixed precision: the block computes under autocast, the solver keeps a float32 state
        self.block.autocast = (dev, torch.get_autocast_dtype(dev)) if amp else None
        if amp:
            inj = inj.float()
        try:
            with warnings.catch_warnings(), torch.autocast(dev, enabled=False) if amp else _null():
                # a fixed iteration budget is the protocol; non-convergence is reported in last_stats
                warnings.simplefilter("ignore", NonConvergenceWarning)
                z, result = self.deq(inj, z0)
        finally:
            self.block.autocast = None
        self.last_result = result
        self.last_stats = {
            "mode": "deq",
            "n_iter": float(result.n_iter.float().mean()),
            "residual": float(result.residual.float().mean()),  # absolute ||f(z) - z||, grows with the grid
            "rel_residual": float(result.rel_residual.float().mean()),  # ||f(z) - z|| / ||f(z)||
            "converged": float(result.converged.float().mean()),
        }
        return z


class FNO(NeuralOperator, name="fno"):
    """neuraloperator's FNO with ``3 * depth + 1`` Fourier layers (the paper's FNO at depth ``depth``).
    ``spectral_bias=False`` drops the bias neuraloperator adds to each spectral convolution (the paper's has
    none)."""

    def __init__(self, *, in_channels: int = 1, out_channels: int = 1, width: int = 32, modes: int = 12,
                 depth: int = 1, padding: float = 0.1, layers_per_block: int = 3,
                 norm: str | None = "instance_norm", spectral_init: str = "fno", spectral_bias: bool = True,
                 grid: str = "periodic"):
        super().__init__()
        _check_common(in_channels, out_channels, width, modes, padding)
        if spectral_init not in SPECTRAL_INITS:
            raise ValueError(f"spectral_init must be one of {SPECTRAL_INITS}, got {spectral_init!r}")
        if int(depth) != depth or depth < 1:
            raise ValueError(f"depth must be a positive integer, got {depth!r}")
        from neuralop.models import FNO as _FNO

        self.in_channels, self.out_channels = in_channels, out_channels
        self.net = _FNO(n_modes=(2 * modes, 2 * modes), in_channels=in_channels, out_channels=out_channels,
                        hidden_channels=width, n_layers=layers_per_block * depth + 1, norm=norm,
                        use_channel_mlp=True, positional_embedding="grid",
                        conv_module=_spectral_conv_fp32(spectral_bias),
                        domain_padding=padding if padding > 0 else None)
        self.net.positional_embedding = _grid_embedding(in_channels, grid)  # applied before the lifting
        if spectral_init == "fno":
            for conv in self.net.fno_blocks.convs:
                _paper_spectral_init(conv)

    def forward(self, x: Tensor, z0: Tensor | None = None) -> Tensor:
        return self.net(x)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict:
        # neuraloperator's BaseModel adds a non-tensor "_metadata" entry at the top level of the
        # destination; our checkpoints keep the kwargs themselves and load with weights_only=True
        sd = super().state_dict(*args, **kwargs)
        sd.pop("_metadata", None)
        return sd


def available_models() -> list[str]:
    return sorted(MODELS)


def build_model(name: str, **kwargs: Any) -> NeuralOperator:
    """The model registered as ``name`` built with ``kwargs``; unknown names list the choices."""
    try:
        cls = MODELS[name]
    except KeyError:
        raise ValueError(f'Unknown model "{name}". Must be one of {available_models()}.') from None
    return cls(**kwargs)


def count_parameters(model: nn.Module) -> int:
    """Real parameters (a complex weight counts twice)."""
    return sum(p.numel() * (2 if p.is_complex() else 1) for p in model.parameters())


def cast_model(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast real tensors to ``dtype`` and complex ones to the matching complex dtype.

    ``nn.Module.to(torch.float64)`` would drop the imaginary part of spectral weights.
    """
    cdtype = {torch.float64: torch.complex128, torch.float32: torch.complex64}.get(dtype)
    if cdtype is None:
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    return model._apply(lambda t: t.to(cdtype) if t.is_complex() else t.to(dtype) if t.is_floating_point() else t)


class Operator(nn.Module):
    """A network plus its input/output normalisers: maps raw fields to raw fields.

    ``forward`` takes and returns *normalised* tensors (what training uses); :meth:`predict`
    takes raw inputs and returns raw outputs.
    """

    def __init__(self, net: NeuralOperator, x_normalizer: nn.Module, y_normalizer: nn.Module):
        super().__init__()
        self.net, self.x_normalizer, self.y_normalizer = net, x_normalizer, y_normalizer

    def forward(self, x: Tensor, z0: Tensor | None = None) -> Tensor:
        return self.net(x, z0)

    @torch.no_grad()
    def predict(self, x_raw: Tensor) -> Tensor:
        return self.y_normalizer.decode(self.net(self.x_normalizer.encode(x_raw)))


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """The dict of a checkpoint written by :mod:`pde.train` (``torch.load(weights_only=True)``); a file that is
    not one fails with its name."""
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # an HDF5 data file given in its place, a truncated file, ...
        raise ValueError(f"{path} is not a checkpoint torch.load can read ({type(err).__name__}); "
                         "`implicit evaluate` takes CHECKPOINT then DATA") from None
    return _with_model_entries(ckpt, repr(str(path)))


def _with_model_entries(ckpt: dict, name: str) -> dict:
    for key in ("model_config", "model"):
        if key not in ckpt:
            raise ValueError(f"{name} is not a pde.train checkpoint (no {key!r} entry)")
    return ckpt


def load_model(checkpoint: str | os.PathLike | dict, map_location: str | torch.device = "cpu") -> Operator:
    """Rebuild an :class:`Operator` from a checkpoint written by :mod:`pde.train` (no config needed)."""
    from .datasets import normalizer_like

    ckpt = (_with_model_entries(checkpoint, "the dict") if isinstance(checkpoint, dict)
            else read_checkpoint(checkpoint, map_location))
    cfg = dict(ckpt["model_config"])
    net = build_model(cfg.pop("model"), **cfg)
    state = ckpt["model"]
    op = Operator(net, normalizer_like(state["x_normalizer.mean"]), normalizer_like(state["y_normalizer.mean"]))
    op.load_state_dict(state)
    return op.eval()  # for inference: FNO-DEQ solves with its evaluation iteration limit
