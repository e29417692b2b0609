"""Training and evaluation of steady-state PDE operators, checkpoints, noisy observations, DDP.

One :class:`TrainConfig` (frozen, round-trips through TOML and checkpoints) drives
:func:`train`: relative L2 loss (as in the FNO papers) on decoded outputs, Adam with weight
decay, cosine/step/constant learning rate, optional mixed precision, and the FNO-DEQ paper's
noisy-observation protocol (:func:`add_observation_noise`). Each epoch ends with an atomic
checkpoint holding the weights, the normalisers, the model's constructor kwargs, the optimiser
and scheduler states and the history; re-running on the same folder resumes and ends with the
same weights as an uninterrupted run (the data order of epoch ``e`` depends only on
``(seed, e)``). Under ``torchrun`` the batch is split across ranks with a
``DistributedSampler`` and gradients are averaged by ``DistributedDataParallel``.

:func:`evaluate` reports relative L2 (mean, std, per sample) and solver statistics of a
checkpoint on any data file, at any resolution (zero-shot transfer).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from implicit.distributed import resolve_device, setup_device
from implicit.results import (deterministic_algorithms, global_rng_state, save_figure_atomic, save_torch_atomic,
                              set_global_rng_state)

from .datasets import IO_VARIABLES, NORMALIZERS, REPO_ROOT, PDEDataset, fit_normalizer, generate_split, load_recipe
from .models import GRIDS, Operator, build_model, count_parameters, load_model, read_checkpoint

__all__ = [
    "TrainConfig", "PRESETS", "QUICK_DARCY_RECIPE", "load_config", "relative_l2", "add_observation_noise",
    "noise_levels", "resolve_data", "train", "evaluate", "plot_prediction",
]

# The paper's variance levels; a run with maximum level L uses those <= L, one chunk each. Its Darcy
# loader (data/mat_dataloader_darcy_2d.py) and its Navier-Stokes loader (data/navier_stokes_dataloader.py)
# have different lists: Navier-Stokes adds 2e-3 and 4e-3, so its maximum 4e-3 is itself a level.
PAPER_NOISE_VARIANCES = (0.0, 1e-9, 1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 5e-1, 1.0)
PAPER_NOISE_VARIANCES_NS = (0.0, 1e-9, 1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 2e-3, 4e-3, 1e-2, 1e-1, 5e-1, 1.0)
# Per-channel variance of the raw fields in the paper's Navier-Stokes files (its DATASET_STAT_DICT,
# visc 0.01): the scale its raw noise variances were meant for (see TrainConfig.noise_scale).
PAPER_NS_VARIANCE = {"input": 0.001515210373327136, "target": 0.08820350468158722}

# The default data of `implicit train darcy`: darcy-85's physics at 25x25 (solved at 49x49),
# 256 training and 64 test samples, generated in seconds on a CPU.
QUICK_DARCY_RECIPE = {
    "name": "darcy-quick", "generator": "darcy", "seed": 0, "chunk_size": 64, "store_dtype": "float32",
    "description": "darcy-85 physics, solved at 49x49 and stored at 25x25: the quick-start data of `implicit train darcy`",
    "splits": {"train": 256, "test": 64},
    "darcy": {"fine_resolution": 49, "subsample": 2},
}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on. ``data`` is a training file or a recipe name."""

    data: str = "darcy-quick"
    test_data: str | None = None  # default: the training file with _train -> _test
    ntrain: int | None = None
    ntest: int | None = None
    subsample: int = 1
    model: str = "fno-deq"
    width: int = 32
    modes: int = 12
    depth: int = 1  # fno, fno++: blocks of 3 Fourier layers
    iterations: int = 8  # ifno: applications of the tied block
    padding: float = 0.1
    # the grid coordinates every model appends to its input: periodic (i / s, Navier-Stokes) | closed
    # (i / (s - 1), both walls, Darcy; the paper's code everywhere) | auto: the data's kind (a resumed run: its own)
    grid: str = "auto"
    # none (paper, Darcy; FNO-DEQ on NS too) | instance_norm (paper, NS; FNO-DEQ: no fixed point) | group_norm
    norm: str = "none"
    solver: str = "anderson"
    tol: float = 1e-6
    max_iter: int = 32
    eval_max_iter: int | None = None
    # fno-deq on CUDA: capture the forward solve's iterations as a CUDA graph and replay it (fewer kernel
    # launches; the block must not sync the GPU). Ignored on the CPU.
    solver_graph: bool = False
    backward: str = "phantom"
    backward_steps: int = 1
    backward_damping: float = 0.5
    # ift: the adjoint solve's relative tolerance and iteration cap (default: tol and max_iter)
    backward_tol: float | None = None
    backward_max_iter: int | None = None
    pretrain_steps: int = 300
    pretrain_iter: int = 8
    # ifno, and fno-deq's warm-up: recompute each unrolled iteration in the backward instead of keeping its
    # activations (torch.utils.checkpoint; the same gradient for about one more forward per iteration)
    checkpoint_unrolled: bool = False
    # fno-deq: weight of the Jacobian regulariser ||df/dz||_F^2 / n at the fixed point (Bai et al., 2021), a
    # Hutchinson estimate with jac_reg_samples probes per step, added to the loss as reduced (so with
    # loss_reduction="sum" the same weight counts batch_size times less); 0 (the paper's setting) turns it off
    jac_reg: float = 0.0
    jac_reg_samples: int = 1
    epochs: int = 500
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    # mean | sum over the batch. The paper's code sums; with Adam's coupled weight decay that makes the
    # decay batch_size times weaker relative to the loss gradient (Adam itself ignores the loss scale).
    loss_reduction: str = "mean"
    scheduler: str = "cosine"  # cosine (per step) | step | constant
    step_size: int = 100  # scheduler=step: epochs between decays
    gamma: float = 0.5
    seed: int = 0
    device: str = "auto"
    # bitwise-repeatable runs on the GPU (implicit.results.deterministic_algorithms; slower). Off, two CUDA runs
    # of one seed part in the last bits and training grows the gap (paper-size NS: test errors at epoch 6 up to
    # 0.012 apart)
    deterministic: bool = False
    # none | bf16. fp16 trains nothing here: its loss scaler (torch.amp.GradScaler) cannot unscale the
    # spectral convolutions' complex gradients (pytorch/pytorch#58228); `implicit evaluate --amp fp16` works
    amp: str = "none"
    # channel: one mean/std per channel (resolution-free) | pointwise: per channel and grid point, the FNO
    # papers' UnitGaussianNormalizer (on Darcy it pins the decoded solution to the zero boundary) | scale: mean 0,
    # one std per channel of the clean training data (the FNO-DEQ paper's Navier-Stokes scaling)
    normalizer: str = "channel"
    # a bias in each spectral convolution (neuraloperator's default; the papers' has none)
    spectral_bias: bool = True
    noise_level: float = 0.0  # maximum noise variance (paper: 0.001 Darcy, 0.001/0.004 NS)
    noise_on: str = "input"  # input | target
    # draw the noise anew each epoch (from seed and epoch), as the paper's Navier-Stokes loader does on every
    # access; off: one draw for the whole run, as its Darcy loader (and every run in experiments/results)
    noise_per_epoch: bool = False
    # multiplies every noise variance. 1 is the paper's protocol: noise of the stated variance on the
    # raw field (Darcy: our data has the paper's scale, coefficient 3/12). Where a data set's raw scale
    # differs from the paper's files (our Navier-Stokes recipes scale the forcing with the viscosity),
    # var(field) / var(paper's field) keeps the paper's signal-to-noise ratio.
    noise_scale: float = 1.0
    eval_every: int = 1  # test evaluation every k epochs (and after the last)
    out: str | None = None  # run folder; default runs/<data>-<model>
    plot: bool = True

    def __post_init__(self) -> None:
        from .models import available_models

        if self.model not in available_models():
            raise ValueError(f'model must be one of {available_models()}, got "{self.model}"')
        if self.amp == "fp16":
            raise ValueError("amp='fp16' cannot train these models: torch's GradScaler has no kernel for the "
                             "spectral convolutions' complex gradients (pytorch/pytorch#58228); use amp='bf16', "
                             "which needs no loss scaling")
        checks = {"scheduler": ("cosine", "step", "constant"), "amp": ("none", "bf16"),
                  "noise_on": ("input", "target"), "loss_reduction": ("mean", "sum"), "normalizer": NORMALIZERS,
                  "norm": ("instance_norm", "group_norm", "none"), "backward": ("ift", "phantom", "jfb", "unrolled"),
                  "grid": ("auto", *GRIDS)}
        for key, allowed in checks.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key} must be one of {allowed}, got {getattr(self, key)!r}")
        for key in ("epochs", "batch_size", "width", "modes", "depth", "iterations", "max_iter", "subsample",
                    "eval_every", "jac_reg_samples", "backward_steps"):
            v = getattr(self, key)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{key} must be a positive integer, got {v!r}")
        if self.backward_max_iter is not None and (not isinstance(self.backward_max_iter, int)
                                                   or self.backward_max_iter < 1):
            raise ValueError(f"backward_max_iter must be a positive integer, got {self.backward_max_iter!r}")
        for key in ("ntrain", "ntest"):  # None: the whole file
            v = getattr(self, key)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"{key} must be a positive integer (or unset for the whole file), got {v!r}")
        if self.backward == "phantom" and not 0 < self.backward_damping <= 1:  # else it fails after the warm-up
            raise ValueError(f"backward_damping must be in (0, 1], got {self.backward_damping!r}")
        if self.backward_tol is not None and not self.backward_tol > 0:
            raise ValueError(f"backward_tol must be > 0, got {self.backward_tol!r}")
        if self.jac_reg < 0 or (self.jac_reg > 0 and self.model != "fno-deq"):
            raise ValueError(f"jac_reg must be >= 0 and regularises fno-deq's fixed point only, got {self.jac_reg!r} "
                             f"for {self.model} (--jac-reg 0 turns it off)")
        if self.checkpoint_unrolled and self.model not in ("ifno", "fno-deq"):
            raise ValueError(f"checkpoint_unrolled recomputes ifno's and fno-deq's warm-up iterations; {self.model} "
                             "unrolls nothing")
        if not self.lr > 0 or self.weight_decay < 0 or self.noise_level < 0 or not self.noise_scale > 0:
            raise ValueError(f"need lr > 0, weight_decay >= 0, noise_level >= 0 and noise_scale > 0, got {self.lr}, "
                             f"{self.weight_decay}, {self.noise_level}, {self.noise_scale}")

    def model_kwargs(self, in_channels: int, out_channels: int, data_grid: str = "periodic") -> dict:
        """Constructor kwargs of the chosen model (only those it takes); ``grid="auto"`` takes ``data_grid``."""
        grid = self.grid if self.grid != "auto" else data_grid
        kw: dict[str, Any] = dict(in_channels=in_channels, out_channels=out_channels, width=self.width,
                                  modes=self.modes, padding=self.padding, grid=grid,
                                  norm=None if self.norm == "none" else self.norm, spectral_bias=self.spectral_bias)
        if self.model in ("fno", "fno++"):
            kw["depth"] = self.depth
        elif self.model == "ifno":
            kw["iterations"] = self.iterations
        elif self.model == "fno-deq":
            opts = {} if self.backward in ("ift", "jfb") else {"steps": self.backward_steps}
            if self.backward == "phantom":
                opts["damping"] = self.backward_damping
            if self.backward == "ift":
                opts.update({k: v for k, v in (("tol", self.backward_tol), ("max_iter", self.backward_max_iter))
                             if v is not None})
            kw.update(solver=self.solver, tol=self.tol, max_iter=self.max_iter, eval_max_iter=self.eval_max_iter,
                      backward=self.backward, backward_options=opts, pretrain_steps=self.pretrain_steps,
                      pretrain_iter=self.pretrain_iter)
            if self.solver_graph:
                kw["solver_options"] = {"graph": True}
            if self.jac_reg > 0:
                kw["jac_reg_samples"] = self.jac_reg_samples
        if self.checkpoint_unrolled:  # ifno or fno-deq (__post_init__ refuses the others)
            kw["checkpoint_unrolled"] = True
        return kw


# Embedded defaults per problem (`implicit train darcy|ns`); a TOML config and flags override them.
PRESETS: dict[str, dict] = {
    # Quick start on a CPU (~2-3 minutes on 2 cores): small data, narrow model, few iterations.
    "darcy": dict(data="darcy-quick", model="fno-deq", width=16, modes=6, max_iter=8, eval_max_iter=12,
                  backward="phantom", backward_steps=1, backward_damping=0.5, pretrain_steps=16,
                  pretrain_iter=4, epochs=8, batch_size=16, lr=3e-3, scheduler="cosine"),
    "ns": dict(data="ns-tiny", model="fno-deq", width=16, modes=6, padding=0.0, max_iter=8, eval_max_iter=12,
               backward="phantom", backward_steps=3, backward_damping=0.8, pretrain_steps=8, pretrain_iter=4,
               epochs=10, batch_size=8, lr=3e-3, scheduler="cosine"),
}
PROBLEMS = {"darcy": "darcy", "ns": "navier_stokes"}


def _fields() -> set[str]:
    return {f.name for f in dataclasses.fields(TrainConfig)}


def load_config(problem: str | None = None, path: str | os.PathLike | None = None, **overrides: Any) -> TrainConfig:
    """Preset of ``problem``, then the TOML file (top-level keys or a ``[train]`` table), then ``overrides``."""
    values: dict[str, Any] = {}
    if problem is not None:
        if problem not in PRESETS:
            raise ValueError(f'problem must be one of {sorted(PRESETS)}, got "{problem}"')
        values.update(PRESETS[problem])
    if path is not None:
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib  # type: ignore[no-redef]
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
        raw = raw.get("train", raw)
        bad = set(raw) - _fields()
        if bad:
            raise ValueError(f"{path}: unknown key(s) {sorted(bad)}; allowed: {sorted(_fields())}")
        values.update(raw)
    bad = set(overrides) - _fields()
    if bad:
        raise ValueError(f"unknown setting(s) {sorted(bad)}; allowed: {sorted(_fields())}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(**values)


# ----------------------------------------------------------------------------------- data

def default_data_dir() -> Path:
    """``data/`` of the source checkout when there is one, else ``./data``."""
    return REPO_ROOT / "data" if (REPO_ROOT / "pyproject.toml").is_file() else Path.cwd() / "data"


def resolve_data(data: str, test_data: str | None = None, *, generate: bool = True,
                 log: Callable[[str], None] = print, progress: bool = False) -> tuple[Path, Path]:
    """Training and test files of ``data`` (a ``*_train.h5`` path, or a recipe name whose files are
    generated into ``data/`` when missing, with a progress bar if ``progress``: a paper-size recipe takes
    minutes on a GPU and can take most of an hour on a CPU)."""
    p = Path(data)
    if p.suffix == ".h5":
        train = p
        test = Path(test_data) if test_data else p.with_name(p.name.replace("_train", "_test"))
        if test == train:
            raise ValueError(f"cannot guess the test file of {train} (no _train in its name); pass test_data")
        return train, test
    recipe: Any = QUICK_DARCY_RECIPE if data == QUICK_DARCY_RECIPE["name"] else data
    r = load_recipe(recipe)
    out = default_data_dir()
    paths = {}
    for split in ("train", "test"):
        path = out / f"{r['name']}_{split}.h5"
        if not path.is_file():
            if not generate:
                raise FileNotFoundError(f"no data file {path}; run `implicit data generate {data}`")
            device = resolve_device("auto")  # the PCG solve is ~100x faster on a GPU
            log(f"generating {path}: {r['splits'][split]} samples of recipe {r['name']} on {device}, once "
                f"(`implicit data generate {r['name']}` makes them ahead)")
            generate_split(r, split, out, progress=progress, device=device)
        paths[split] = path
    return paths["train"], Path(test_data) if test_data else paths["test"]


def check_data_file(path: str | os.PathLike, variables: tuple[str, ...]) -> tuple[int, int]:
    """Check that ``variables`` exist as ``(sample, s, s)`` arrays of one shape; return ``(n, s)``."""
    from .datasets import open_file

    with open_file(path) as f:
        shapes = {}
        for v in variables:
            if v not in f:
                raise ValueError(f"{path}: no variable {v!r}; it has {sorted(f.keys())}")
            shapes[v] = f[v].shape
    bad = {v: s for v, s in shapes.items() if len(s) != 3 or s[1] != s[2] or s[1] < 4}
    if bad or len(set(shapes.values())) != 1:
        raise ValueError(f"{path}: expected variables {list(variables)} with dims (sample, x, y) on one square grid, "
                         f"got shapes {shapes}")
    n, s, _ = next(iter(shapes.values()))
    return n, s


def _io_variables(path: Path) -> tuple[tuple[str, ...], tuple[str, ...]]:
    from .datasets import IO_VARIABLES, open_file

    with open_file(path) as f:  # a missing, partial or foreign file fails here, by name
        return IO_VARIABLES[f.attrs["generator"]]


def load_split(path: Path, *, limit: int | None = None, subsample: int = 1) -> PDEDataset:
    """A raw (unnormalised) dataset after checking the file's variables and shapes."""
    inputs, targets = _io_variables(path)
    check_data_file(path, inputs + targets)
    return PDEDataset(path, inputs=inputs, targets=targets, limit=limit, subsample=subsample, normalizers=None)


def noise_levels(max_variance: float, problem: str = "darcy") -> list[float]:
    """The paper's noise variances up to ``max_variance`` (0 included) for ``problem``
    (``"darcy"`` or ``"navier_stokes"``: the paper's two loaders have different lists)."""
    if problem not in ("darcy", "navier_stokes"):
        raise ValueError(f'problem must be "darcy" or "navier_stokes", got {problem!r}')
    table = PAPER_NOISE_VARIANCES_NS if problem == "navier_stokes" else PAPER_NOISE_VARIANCES
    return [v for v in table if v <= max_variance]


def add_observation_noise(x: Tensor, max_variance: float, seed: int, *, problem: str = "darcy",
                          scale: float = 1.0, draw: int = 0) -> Tensor:
    """Noisy observations as in the FNO-DEQ paper (Sec. 5 and its released data loaders).

    The ``N`` samples are split into chunks, one per variance level in
    :func:`noise_levels` (chunk 0 is clean); chunk ``i`` gets Gaussian noise of variance
    ``scale * levels[i]`` added to the raw (unnormalised) field, before the normalisers are
    fitted, as the paper's loaders do. Darcy: chunks of ``N // L`` samples, the ``N mod L`` last
    stay clean; Navier-Stokes: chunks of ``N // L + 1``, the last one shorter (the two loaders
    differ). Deterministic in ``seed`` and ``draw`` (another draw: fresh noise, as each epoch of the paper's
    Navier-Stokes loader).
    """
    levels = noise_levels(max_variance, problem)
    if len(levels) <= 1:
        return x
    per = x.shape[0] // len(levels) + (1 if problem == "navier_stokes" else 0)
    # seeds below 1e6 get a stream per draw (torch's CPU generator keeps 32 bits of its seed)
    g = torch.Generator().manual_seed((10_007 + seed + 1_000_003 * draw) % 2**32)
    out = x.clone()
    for i, var in enumerate(levels):
        if var > 0 and per > 0:
            chunk = out[i * per:(i + 1) * per]
            chunk += math.sqrt(scale * var) * torch.randn(chunk.shape, generator=g, dtype=chunk.dtype)
    return out


def relative_l2(pred: Tensor, target: Tensor) -> Tensor:
    """Per-sample ``||pred - target||_2 / ||target||_2`` over all but the first dim: ``(B,)``."""
    diff = (pred - target).flatten(1).norm(dim=1)
    return diff / target.flatten(1).norm(dim=1).clamp_min(1e-12)


# ----------------------------------------------------------------------------------- helpers

def _amp_context(amp: str, device: torch.device):
    import contextlib

    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def _make_scheduler(cfg: TrainConfig, opt: torch.optim.Optimizer, steps_per_epoch: int):
    if cfg.scheduler == "cosine":  # stepped every batch, as the paper's code
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * steps_per_epoch)
    if cfg.scheduler == "step":  # stepped every epoch
        return torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.step_size, gamma=cfg.gamma)
    return None  # constant


def _run_dir(cfg: TrainConfig) -> Path:
    if cfg.out:
        return Path(cfg.out)
    stem = Path(cfg.data).stem.replace("_train", "") if cfg.data.endswith(".h5") else cfg.data
    return Path("runs") / f"{stem}-{cfg.model}"


# settings that may change between a run and its resumption
_RESUMABLE_CHANGES = {"epochs", "device", "out", "plot", "eval_every", "deterministic"}


def _diverged(loss: float, epoch: int, ckpt_path: Path) -> FloatingPointError:
    kept = f"{ckpt_path} keeps epoch {epoch}" if epoch else "no checkpoint was written"
    return FloatingPointError(f"the training loss became {loss} in epoch {epoch + 1}; {kept}. A lower lr (or, for "
                              "fno-deq, a Jacobian regulariser: jac_reg) may keep it finite")


@torch.no_grad()
def _predict(op: Operator, x_raw: Tensor, device: torch.device, batch_size: int, amp: str = "none",
             max_iter: int | None = None) -> tuple[Tensor, dict]:
    """Raw predictions for raw inputs, in batches, and the solver stats per sample: FNO-DEQ's solve, or
    IFNO's last unrolled step (no tolerance, so never ``converged``)."""
    op.eval()
    net = op.net
    # test-time iterations: FNO-DEQ's evaluation solve limit, or IFNO's number of unrolled applications
    owner, attr = (net.deq, "eval_max_iter") if hasattr(net, "deq") else (net, "iterations")
    if max_iter is not None and not hasattr(owner, attr):
        raise ValueError(f"max_iter applies to fno-deq and ifno models, not {net.model_name}")
    override = max_iter is not None
    saved = getattr(owner, attr) if override else None
    if override:
        setattr(owner, attr, max_iter)
    preds, iters, res, rel, conv = [], [], [], [], []
    try:
        for i in range(0, x_raw.shape[0], batch_size):
            xb = op.x_normalizer.encode(x_raw[i:i + batch_size].to(device))
            with _amp_context(amp, device):
                out = net(xb)
            preds.append(op.y_normalizer.decode(out.float()).cpu())
            r = getattr(net, "last_result", None)  # FNO-DEQ's solve, or IFNO's unrolled iterates
            if r is not None:
                iters.append(r.n_iter.cpu())
                res.append(r.residual.float().cpu())
                rel.append(r.rel_residual.float().cpu())
                conv.append(r.converged.cpu())
    finally:
        if override:
            setattr(owner, attr, saved)
    stats = {}
    if iters:
        stats = {"n_iter": torch.cat(iters), "residual": torch.cat(res), "rel_residual": torch.cat(rel),
                 "converged": torch.cat(conv)}
    return torch.cat(preds), stats


# ----------------------------------------------------------------------------------- training

# How much longer than a warm-up epoch the first epoch of solves may take. Measured on an H200 at the
# paper's NS size (24 Anderson iterations, phantom gradient, Jacobian regulariser, 12 warm-up
# iterations): 1.19x alone, 1.35-1.51x beside other trainings sharing the GPU.
WARMUP_TO_SOLVE_FACTOR = 2.0


def peak_training_memory(history: list[dict], current: int = 0) -> dict[str, int]:
    """``peak_memory_bytes``: the largest epoch peak in ``history`` (or ``current``, this process's since its
    last epoch began); ``peak_memory_bytes_solving``: the largest over the epochs whose every step went through
    the DEQ solve, absent where none did. FNO-DEQ's unrolled warm-up keeps the graph of its iterations and can
    need about twice the memory of the implicit training that the O(1)-memory claim is about."""
    out = {"peak_memory_bytes": max([current, *(h["peak_memory_bytes"] for h in history if "peak_memory_bytes" in h)])}
    solving = [h["peak_memory_bytes"] for h in history if h.get("all_steps_solved") and "peak_memory_bytes" in h]
    if solving:
        out["peak_memory_bytes_solving"] = max(solving)
    return out


def next_epoch_estimate(last_wall: float, epoch: int, steps_per_epoch: int, warmup_steps: int) -> float:
    """The deadline's guess at the wall time of epoch ``epoch`` (0-based): the previous epoch's,
    scaled by :data:`WARMUP_TO_SOLVE_FACTOR` when that one was all unrolled warm-up and this one
    reaches the solves (warm-up steps are 1..``warmup_steps``), which cost more. Without it a
    budgeted command overran its budget by the difference (fno_deq.py at 128x128)."""
    crosses = epoch * steps_per_epoch <= warmup_steps < (epoch + 1) * steps_per_epoch
    return last_wall * (WARMUP_TO_SOLVE_FACTOR if crosses else 1.0)


def _restore(ck: dict, cfg: TrainConfig, op: Operator, opt: torch.optim.Optimizer, sched: Any,
             device: torch.device, ckpt_path: Path) -> tuple[list[dict], int]:
    """Load checkpoint ``ck`` (weights, optimiser, schedule, global RNG) into a run of ``cfg``; return its
    history and the epochs it holds. A checkpoint of another configuration is refused, as is a cosine
    schedule resumed for another number of epochs (the rest of its schedule would change)."""
    old = dict(ck["train_config"])
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}  # keys added since it was written
    diff = {k for k in _fields() if old.get(k, defaults[k]) != getattr(cfg, k)} - _RESUMABLE_CHANGES
    if diff:
        raise ValueError(f"{ckpt_path} is from another configuration (differs in {sorted(diff)}); "
                         "use --overwrite or another --out")
    if old.get("epochs") != cfg.epochs and cfg.scheduler == "cosine":
        raise ValueError(f"{ckpt_path} was trained for {old.get('epochs')} epochs with a cosine schedule; "
                         f"resuming with epochs={cfg.epochs} would change its schedule")
    op.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    if sched is not None and ck.get("scheduler") is not None:
        sched.load_state_dict(ck["scheduler"])
    if ck.get("global_rng") is not None:  # the Jacobian regulariser's probes continue their stream
        set_global_rng_state(ck["global_rng"], device)
    return list(ck["history"]), int(ck["epoch"])


@dataclasses.dataclass
class _EpochTally:
    """What one epoch's training steps report: the summed loss and the per-step solver statistics."""

    loss_sum: float = 0.0
    samples: int = 0
    iters: list[float] = dataclasses.field(default_factory=list)
    residuals: list[float] = dataclasses.field(default_factory=list)  # FNO-DEQ's solves, past its warm-up
    jacs: list[float] = dataclasses.field(default_factory=list)
    adjoints: list[dict] = dataclasses.field(default_factory=list)  # the ift backward's adjoint solves

    def record(self, epoch: int, train_loss: float, seconds: float, lr: float, steps: int) -> dict[str, Any]:
        """The history record of epoch ``epoch`` (0-based) of ``steps`` steps; means of the step statistics."""
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        record: dict[str, Any] = {"epoch": epoch + 1, "train_rel_l2": train_loss, "time_s": seconds, "lr": lr}
        if self.iters:
            record["train_solver_iters"] = mean(self.iters)
        if self.residuals:
            record["train_solver_rel_residual"] = mean(self.residuals)
            record["all_steps_solved"] = len(self.residuals) == steps  # FNO-DEQ past its warm-up all epoch
        if self.jacs:
            record["train_jac_loss"] = mean(self.jacs)
        for key in ("n_iter", "rel_residual", "converged") if self.adjoints else ():  # one not converging shows
            record[f"train_adjoint_{key}"] = mean([a[key] for a in self.adjoints])
        return record


def _train_epoch(model: torch.nn.Module, op: Operator, loader: torch.utils.data.DataLoader,
                 opt: torch.optim.Optimizer, sched: Any, cfg: TrainConfig, device: torch.device, world: int,
                 epoch: int, ckpt_path: Path, bar: Any) -> _EpochTally:
    """One epoch's optimiser steps on ``loader`` (``model`` is ``op.net``, DDP-wrapped under torchrun)."""
    model.train()
    tally = _EpochTally()
    for xb, yb in loader:
        xb, yb = xb.to(device), yb.to(device)
        opt.zero_grad(set_to_none=True)
        with _amp_context(cfg.amp, device):
            out = model(xb)
        per_sample = relative_l2(op.y_normalizer.decode(out.float()), yb)
        loss = per_sample.mean()
        loss_value = float(loss.detach())
        if world == 1 and not math.isfinite(loss_value):  # under DDP every rank stops at the epoch's end
            raise _diverged(loss_value, epoch, ckpt_path)
        # DDP averages gradients over ranks, so a sum is scaled by the ranks to stay the global batch's sum
        objective = loss if cfg.loss_reduction == "mean" else per_sample.sum() * world
        solved = (op.net.last_stats or {}).get("mode") == "deq"  # fno-deq past its unrolled warm-up
        if cfg.jac_reg > 0 and solved:
            jac = op.net.last_result.stats["jac_loss"]
            objective = objective + cfg.jac_reg * jac
            tally.jacs.append(float(jac.detach()))
        objective.backward()
        opt.step()
        if getattr(op.net, "last_adjoint", None) is not None:  # fno-deq's ift backward solved an adjoint
            tally.adjoints.append(op.net.last_adjoint)
            op.net.last_adjoint = None
        if sched is not None and cfg.scheduler == "cosine":
            sched.step()
        tally.loss_sum += loss_value * xb.shape[0]
        tally.samples += xb.shape[0]
        if op.net.last_stats is not None:
            tally.iters.append(op.net.last_stats.get("n_iter", 0.0))
        if solved:  # a block that stops contracting shows here before the loss blows up
            tally.residuals.append(op.net.last_stats["rel_residual"])
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}")
    return tally


def _test_record(op: Operator, test_ds: PDEDataset, device: torch.device, batch_size: int,
                 amp: str) -> dict[str, float]:
    """Test relative L2 and, for a solved model, the mean iterations and residuals of its test solves."""
    pred, stats = _predict(op, test_ds.x, device, batch_size, amp)
    record = {"test_rel_l2": float(relative_l2(pred, test_ds.y).mean())}
    if stats:
        record["test_solver_iters"] = float(stats["n_iter"].float().mean())
        record["test_solver_residual"] = float(stats["residual"].mean())  # absolute
        record["test_solver_rel_residual"] = float(stats["rel_residual"].mean())
    return record


def _epoch_message(record: dict[str, Any], epochs: int) -> str:
    """The line printed after an epoch: its losses, time and solver statistics, from its history record."""
    msg = f"epoch {record['epoch']}/{epochs}  train rel L2 {record['train_rel_l2']:.4f}  "
    if "test_rel_l2" in record:
        msg += f"test rel L2 {record['test_rel_l2']:.4f}  "
    msg += f"{record['time_s']:.1f} s"
    if "train_solver_rel_residual" in record:
        msg += f"  train solve rel residual {record['train_solver_rel_residual']:.1e}"
    if "train_jac_loss" in record:
        msg += f"  jac {record['train_jac_loss']:.2e}"
    if "train_adjoint_n_iter" in record:
        msg += (f"  adjoint {record['train_adjoint_n_iter']:.1f} it, rel residual "
                f"{record['train_adjoint_rel_residual']:.1e}")
        if record["train_adjoint_converged"] < 1:
            msg += f" ({100 * record['train_adjoint_converged']:.0f}% converged)"
    if "test_solver_iters" in record:
        msg += (f"  solver {record['test_solver_iters']:.1f} it, residual {record['test_solver_residual']:.2e} "
                f"(rel {record['test_solver_rel_residual']:.2e})")
    return msg


def train(cfg: TrainConfig, *, resume: bool | None = None, overwrite: bool = False, progress: bool = True,
          log: Callable[[str], None] | None = None, stop_after: int | None = None,
          deadline: float | None = None, on_epoch: Callable[[dict], None] | None = None) -> dict:
    """Train ``cfg.model`` on ``cfg.data``; return a summary (history, paths, parameters, timings).

    ``resume``: ``None`` resumes when the run folder holds a checkpoint of the same config,
    ``True`` requires one, ``False`` refuses to touch an existing one; ``overwrite`` starts afresh.
    ``stop_after``: stop once this many epochs are done (time-boxed chunks; a later call resumes).
    ``deadline``: a ``time.time()`` value; training stops at the epoch boundary before the first
    epoch that would end past it (judged by the previous epoch's duration, test evaluation
    included), so the checkpoint holds whole epochs and a later call resumes. The summary's
    ``stopped_early`` says whether it stopped before ``epochs``.
    ``on_epoch``: called on rank 0 after each epoch's checkpoint with the summary the run would return had it
    stopped there (history, ``epochs_done``, peak memory; no model state), so that a caller can keep its own
    record current and a process killed mid-run still leaves its finished epochs reported.
    ``cfg.deterministic`` holds for the whole call (:func:`implicit.results.deterministic_algorithms`).
    """
    with deterministic_algorithms(cfg.deterministic):
        return _train(cfg, resume=resume, overwrite=overwrite, progress=progress, log=log, stop_after=stop_after,
                      deadline=deadline, on_epoch=on_epoch)


def _train(cfg: TrainConfig, *, resume: bool | None, overwrite: bool, progress: bool,
           log: Callable[[str], None] | None, stop_after: int | None, deadline: float | None,
           on_epoch: Callable[[dict], None] | None) -> dict:
    if resume is True and overwrite:
        raise ValueError("resume continues the run folder's checkpoint and overwrite starts it again (--resume, "
                         "--overwrite): pass one")
    device, rank, world = setup_device(cfg.device)
    main = rank == 0
    say = (log or (lambda s: print(s, file=sys.stderr, flush=True))) if main else (lambda s: None)
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the number of processes {world}")
    run = _run_dir(cfg)
    ckpt_path = run / "checkpoint.pt"

    # data (rank 0 generates missing files first)
    if main:
        train_path, test_path = resolve_data(cfg.data, cfg.test_data, log=say, progress=progress)
    if world > 1:
        torch.distributed.barrier()
    if not main:
        train_path, test_path = resolve_data(cfg.data, cfg.test_data, generate=False)
    train_ds = load_split(train_path, limit=cfg.ntrain, subsample=cfg.subsample)
    test_ds = load_split(test_path, limit=cfg.ntest, subsample=cfg.subsample)
    if train_ds.inputs != test_ds.inputs or train_ds.targets != test_ds.targets:
        raise ValueError(f"{train_path} and {test_path} hold different variables")
    x_clean, y_clean = train_ds.x, train_ds.y
    problem = "navier_stokes" if train_ds.inputs == IO_VARIABLES["navier_stokes"][0] else "darcy"

    def observed(draw: int) -> tuple[Tensor, Tensor]:
        """The raw training fields as observed: noise (draw ``draw``) on the inputs or the targets."""
        if cfg.noise_level == 0:
            return x_clean, y_clean
        noisy = lambda v: add_observation_noise(v, cfg.noise_level, cfg.seed, problem=problem,  # noqa: E731
                                                scale=cfg.noise_scale, draw=draw)
        return (noisy(x_clean), y_clean) if cfg.noise_on == "input" else (x_clean, noisy(y_clean))

    # noise on the raw fields, before the normalisers are fitted (as the paper). They are fitted on the (noisy)
    # training fields as the paper's Darcy normaliser; "scale" is its Navier-Stokes one, fixed statistics of the
    # clean data set
    x_raw, y_raw = observed(0)
    periodic = train_ds.grid == "periodic"
    x_norm = fit_normalizer(cfg.normalizer, x_clean if cfg.normalizer == "scale" else x_raw, periodic)
    y_norm = fit_normalizer(cfg.normalizer, y_clean if cfg.normalizer == "scale" else y_raw, periodic)
    x_train = x_norm.encode(x_raw)

    # a checkpoint to resume is read first: under grid="auto" the model keeps the grid it trained with
    ck = None
    if ckpt_path.exists() and not overwrite:
        if resume is False:
            raise FileExistsError(f"{ckpt_path} exists; pass --resume to continue it or --overwrite to start again")
        ck = torch.load(ckpt_path, map_location=device, weights_only=True)
    elif resume is True:
        raise FileNotFoundError(f"--resume: no checkpoint {ckpt_path}")
    grid = train_ds.grid if ck is None else ck["model_config"].get("grid", "periodic")  # the option's default before it

    # model, optimiser, schedule
    torch.manual_seed(cfg.seed)
    net = build_model(cfg.model, **cfg.model_kwargs(x_raw.shape[1], y_raw.shape[1], grid))
    op = Operator(net, x_norm, y_norm).to(device)
    opt = torch.optim.Adam(op.net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    per_rank = cfg.batch_size // world
    sampler = torch.utils.data.DistributedSampler(
        torch.utils.data.TensorDataset(x_train, y_raw), num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x_train, y_raw), batch_size=per_rank,
                                         sampler=sampler)
    sched = _make_scheduler(cfg, opt, len(loader))
    if len(x_train) % world:
        say(f"warning: {len(x_train)} training samples do not split evenly over {world} processes, so "
            f"DistributedSampler repeats {world - len(x_train) % world} of them each epoch and the run differs from "
            "a one-process run (an ntrain divisible by the process count matches it)")
    history: list[dict] = []
    start_epoch = 0

    if ck is not None:
        history, start_epoch = _restore(ck, cfg, op, opt, sched, device, ckpt_path)
        say(f"resuming {ckpt_path} after epoch {start_epoch}/{cfg.epochs}")
    if main:
        run.mkdir(parents=True, exist_ok=True)

    model: torch.nn.Module = op.net
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            op.net, device_ids=[device.index] if device.type == "cuda" else None)
    n_params = count_parameters(op.net)
    say(f"{cfg.model}: {n_params / 1e6:.2f}M parameters, {len(train_ds)} train / {len(test_ds)} test samples "
        f"at {train_ds.x.shape[-1]}x{train_ds.x.shape[-1]}, {world} process(es) on {device}"
        + (f", noise variance up to {cfg.noise_level:g} on {cfg.noise_on}s" if cfg.noise_level > 0 else ""))

    bar = None
    if progress and main:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.epochs * len(loader), initial=start_epoch * len(loader), unit="step",
                   file=sys.stderr, dynamic_ncols=True, desc=f"train {cfg.model}")
    last_epoch = cfg.epochs if stop_after is None else min(cfg.epochs, stop_after)
    done, epoch_wall = start_epoch, 0.0

    def summary_after(epochs_done: int) -> dict[str, Any]:
        out: dict[str, Any] = {"checkpoint": str(ckpt_path), "run": str(run), "parameters": n_params,
                               "history": list(history), "epochs": cfg.epochs, "world_size": world,
                               "epochs_done": epochs_done, "stopped_early": epochs_done < cfg.epochs}
        if device.type == "cuda":  # the whole run's: earlier calls' epochs of a resumed run recorded theirs
            out.update(peak_training_memory(history, torch.cuda.max_memory_allocated(device)))
        return out

    warmup = getattr(op.net, "pretrain_steps", 0)
    for epoch in range(start_epoch, last_epoch):
        if deadline is not None:
            # every rank decides alike: rank 0's clock and estimate are broadcast under DDP
            estimate = next_epoch_estimate(epoch_wall, epoch, len(loader), warmup)
            stop = torch.tensor([float(time.time() + estimate > deadline)], device=device)
            if world > 1:
                torch.distributed.broadcast(stop, 0)
            if bool(stop.item()):
                break
        t_wall = time.perf_counter()
        if device.type == "cuda":  # each epoch's own peak, so the warm-up's and the solves' can be told apart
            torch.cuda.reset_peak_memory_stats(device)
        if cfg.noise_per_epoch and cfg.noise_level > 0 and epoch > 0:  # a fresh draw, the same on every rank
            x_new, y_new = observed(epoch)
            if cfg.noise_on == "input":
                x_train.copy_(x_norm.encode(x_new))
            else:
                y_raw.copy_(y_new)
        sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        tally = _train_epoch(model, op, loader, opt, sched, cfg, device, world, epoch, ckpt_path, bar)
        if sched is not None and cfg.scheduler == "step":
            sched.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        epoch_time = time.perf_counter() - t0
        train_loss = tally.loss_sum / max(tally.samples, 1)
        if world > 1:
            t = torch.tensor([tally.loss_sum, tally.samples], dtype=torch.float64, device=device)
            torch.distributed.all_reduce(t)
            train_loss = float(t[0] / t[1])
        if not math.isfinite(train_loss):  # before the checkpoint: it keeps the last finite epoch
            raise _diverged(train_loss, epoch, ckpt_path)
        record = tally.record(epoch, train_loss, epoch_time, opt.param_groups[0]["lr"], len(loader))
        if device.type == "cuda":  # this epoch's training steps (the summary takes the maximum over the history)
            record["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
        if main:
            if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
                record.update(_test_record(op, test_ds, device, max(cfg.batch_size, 32), cfg.amp))
            history.append(record)
            save_torch_atomic({
                "model": op.state_dict(), "model_config": op.net.config(), "train_config": dataclasses.asdict(cfg),
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict() if sched is not None else None,
                "epoch": epoch + 1, "history": history, "data": {"train": str(train_path), "test": str(test_path)},
                "parameters": n_params, "global_rng": global_rng_state(device),
                "resolution": int(train_ds.x.shape[-1]),  # the grid it trained on, after subsampling
            }, ckpt_path)
            if on_epoch is not None:
                on_epoch(summary_after(epoch + 1))
            msg = _epoch_message(record, cfg.epochs)
            (bar.write(msg) if bar is not None else say(msg))
        else:
            history.append(record)
        if world > 1:
            torch.distributed.barrier()
        done, epoch_wall = epoch + 1, time.perf_counter() - t_wall
    if bar is not None:
        bar.close()
    if done < last_epoch:
        say(f"deadline: stopped after epoch {done}/{cfg.epochs}; re-run on {run} to resume")
    summary = summary_after(done)
    if main and cfg.plot and history:
        pred, _ = _predict(op, test_ds.x[:4], device, 4, cfg.amp)
        summary["png"] = str(plot_prediction(test_ds.x[:4], test_ds.y[:4], pred, run / "prediction.png",
                                             names=test_ds.inputs + test_ds.targets))
        say(f"checkpoint {ckpt_path}\nfigure {summary['png']}")
    summary["final_state"] = op.state_dict()
    return summary


# ----------------------------------------------------------------------------------- evaluation

def evaluate(checkpoint: str | os.PathLike, data: str | os.PathLike, *, subsample: int = 1,
             limit: int | None = None, max_iter: int | None = None, batch_size: int = 32,
             device: str = "auto", amp: str = "none") -> dict:
    """Relative L2 (mean, std, per sample) and solver statistics of a checkpoint on a data file.

    The file may have another resolution than the training data (zero-shot transfer);
    ``max_iter`` overrides FNO-DEQ's evaluation iteration limit, or IFNO's number of iterations (test-time
    depth). For IFNO, ``solver`` reports the last unrolled step's size, the block's residual there.
    """
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    dev = resolve_device(device)
    ck = read_checkpoint(checkpoint)
    op = load_model(ck).to(dev)
    ds = load_split(Path(data), limit=limit, subsample=subsample)
    if ds.x.shape[1] != op.net.in_channels or ds.y.shape[1] != op.net.out_channels:
        raise ValueError(f"{data}: {ds.x.shape[1]} input / {ds.y.shape[1]} output channels, but the model maps "
                         f"{op.net.in_channels} -> {op.net.out_channels}")
    t0 = time.perf_counter()
    pred, stats = _predict(op, ds.x, dev, batch_size, amp, max_iter)
    wall = time.perf_counter() - t0
    err = relative_l2(pred, ds.y)
    train_res = ck.get("resolution")
    train_file = ck.get("data", {}).get("train")
    if train_res is None and train_file and Path(train_file).is_file():  # a checkpoint from before "resolution"
        import h5py

        with h5py.File(train_file, "r") as f:
            res = int(f.attrs.get("resolution", 0))
        k = int(ck.get("train_config", {}).get("subsample", 1))
        train_res = len(range(0, res, k)) or None  # the [::k] slice the training took
    out: dict[str, Any] = {
        "checkpoint": str(checkpoint), "data": str(data), "model": op.net.config(), "n_samples": len(ds),
        "resolution": int(ds.x.shape[-1]), "train_resolution": train_res,
        "rel_l2_mean": float(err.mean()), "rel_l2_std": float(err.std()) if len(err) > 1 else 0.0,
        "rel_l2": err.tolist(), "wall_clock_s": wall,
    }
    if stats:
        out["solver"] = {"n_iter_mean": float(stats["n_iter"].float().mean()),
                         "residual_mean": float(stats["residual"].mean()),
                         "rel_residual_mean": float(stats["rel_residual"].mean()),
                         "converged_fraction": float(stats["converged"].float().mean()),
                         "n_iter": stats["n_iter"].tolist(), "residual": stats["residual"].tolist()}
    return out


def plot_prediction(x: Tensor, y: Tensor, pred: Tensor, path: str | os.PathLike,
                    names: tuple[str, ...] = ("coefficient", "solution")) -> Path:
    """PNG with one row per sample: first input channel, truth, prediction, |error|."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = x.shape[0]
    fig, axes = plt.subplots(k, 4, figsize=(12, 2.8 * k), squeeze=False)
    err = relative_l2(pred, y)
    for i in range(k):
        panels = [(x[i, 0], names[0]), (y[i, 0], f"truth ({names[-1]})"), (pred[i, 0], "prediction"),
                  ((pred[i, 0] - y[i, 0]).abs(), f"|error| (rel L2 {float(err[i]):.3f})")]
        for j, (img, title) in enumerate(panels):
            ax = axes[i, j]
            im = ax.imshow(img.T.numpy(), origin="lower", extent=(0, 1, 0, 1),
                           cmap="magma" if j == 3 else "viridis")
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return save_figure_atomic(fig, path, dpi=80)


def write_json(path: str | os.PathLike, data: dict) -> Path:
    from implicit.results import write_json_atomic

    return write_json_atomic(path, json.loads(json.dumps(data, default=float)))
