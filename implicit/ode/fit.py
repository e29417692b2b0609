"""``implicit ode fit CONFIG``: fit a neural ODE (or SDE) to trajectories the package generates.

An ODE is fitted by the mean squared error of its whole predicted trajectory; an SDE
(the Ornstein-Uhlenbeck example) by matching the mean and standard deviation of its
paths to the data's at every time. Each epoch writes an atomic checkpoint to the run
folder; re-running on the same folder resumes. A PNG shows fitted vs true trajectories.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from tqdm import tqdm

from ..results import save_figure_atomic, save_torch_atomic
from .models import MLPField, NeuralODE, NeuralSDE
from .systems import SYSTEMS, ode_dataset, ornstein_uhlenbeck


@dataclass(frozen=True)
class FitConfig:
    system: str = "pendulum"  # pendulum, lotka_volterra or ornstein_uhlenbeck
    n_train: int = 64
    n_test: int = 16
    t_end: float = 5.0
    steps: int = 100
    width: int = 64
    depth: int = 2
    epochs: int = 200
    lr: float = 3e-3
    batch: int = 32
    mode: str = "parallel"  # parallel (backend, implicit gradients) or sequential (torchdiffeq)
    solver: str = "newton"
    sde_method: str = "euler"  # SDE only: euler (Euler-Maruyama), milstein or milstein_grad_free
    seed: int = 0
    device: str = "cpu"

    @classmethod
    def load(cls, path: str | os.PathLike | None, **overrides) -> "FitConfig":
        data = {}
        if path is not None:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        data.update({k: v for k, v in overrides.items() if v is not None})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; allowed: {sorted(known)}")
        cfg = cls(**data)
        if cfg.system not in (*SYSTEMS, "ornstein_uhlenbeck"):
            raise ValueError(f'system must be one of {sorted((*SYSTEMS, "ornstein_uhlenbeck"))}, got "{cfg.system}"')
        if cfg.sde_method not in ("euler", "milstein", "milstein_grad_free"):
            raise ValueError(f'sde_method must be euler, milstein or milstein_grad_free, got "{cfg.sde_method}"')
        if min(cfg.n_train, cfg.n_test, cfg.steps, cfg.epochs, cfg.batch) < 1:
            raise ValueError("n_train, n_test, steps, epochs and batch must be positive")
        return cfg


def _model(cfg: FitConfig, dim: int):
    torch.manual_seed(cfg.seed)
    field = MLPField(dim, cfg.width, cfg.depth)
    if cfg.system == "ornstein_uhlenbeck":
        diffusion = MLPField(dim, cfg.width // 2, 1)
        return NeuralSDE(field, _Softplus(diffusion), method=cfg.sde_method, solver=cfg.solver, tol=1e-6)
    return NeuralODE(field, solver=cfg.solver, tol=1e-6)


class _Softplus(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, t, y):
        return torch.nn.functional.softplus(self.inner(t, y))


def _data(cfg: FitConfig):
    n = cfg.n_train + cfg.n_test
    if cfg.system == "ornstein_uhlenbeck":
        t, ys = ornstein_uhlenbeck(n, cfg.t_end, cfg.steps, seed=cfg.seed)
    else:
        t, ys = ode_dataset(cfg.system, n, cfg.t_end, cfg.steps, seed=cfg.seed)
    return t, ys[:, : cfg.n_train], ys[:, cfg.n_train:]


def _loss(cfg, model, t, ys, generator_seed):
    if cfg.system != "ornstein_uhlenbeck":
        pred = model(ys[0], t, mode=cfg.mode)
        return torch.mean((pred - ys) ** 2)
    import torchsde

    B = ys.shape[1]
    bm = torchsde.BrownianInterval(t0=float(t[0]), t1=float(t[-1]), size=(B, 1), dtype=ys.dtype,
                                   device=ys.device, entropy=generator_seed)
    pred = model(ys[0], t, bm, mode=cfg.mode)
    return torch.mean((pred.mean(1) - ys.mean(1)) ** 2) + torch.mean((pred.std(1) - ys.std(1)) ** 2)


def fit(cfg: FitConfig, run_dir: str | os.PathLike) -> dict:
    """Train, checkpoint every epoch (resuming from ``run_dir/checkpoint.pt``), plot; returns metrics."""
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    dev = torch.device(cfg.device)
    t, train, test = (x.to(dev) for x in _data(cfg))
    model = _model(cfg, train.shape[-1]).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    start, history = 0, []
    ckpt = run / "checkpoint.pt"
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=True)
        same = {k: v for k, v in state["config"].items() if k != "epochs"} == {
            k: v for k, v in asdict(cfg).items() if k != "epochs"}
        if not same:  # only the number of epochs may change when resuming
            raise ValueError(f"{ckpt} was written with another config; use a new run folder")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start, history = state["epoch"], list(state["history"])
    gen = torch.Generator().manual_seed(cfg.seed)
    for _ in range(start):  # replay the batch order of finished epochs, so resuming changes nothing
        torch.randperm(train.shape[1], generator=gen)
    bar = tqdm(range(start, cfg.epochs), desc=f"fit {cfg.system}", initial=start, total=cfg.epochs)
    for epoch in bar:
        model.train()
        perm = torch.randperm(train.shape[1], generator=gen)
        for i, idx in enumerate(perm.split(cfg.batch)):
            loss = _loss(cfg, model, t, train[:, idx.to(dev)], epoch * 1000 + i)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            test_loss = float(_loss(cfg, model, t, test, 10**9 + epoch))
        history.append({"epoch": epoch + 1, "train": float(loss.detach()), "test": test_loss})
        bar.set_postfix(train=f"{history[-1]['train']:.2e}", test=f"{test_loss:.2e}")
        save_torch_atomic({"config": asdict(cfg), "model": model.state_dict(), "optimizer": opt.state_dict(),
                           "epoch": epoch + 1, "history": history}, ckpt)
    _plot(cfg, model, t, test, run / "fit.png")
    return {"final_test_loss": history[-1]["test"] if history else None, "history": history}


def _plot(cfg, model, t, test, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with torch.no_grad():
        if cfg.system == "ornstein_uhlenbeck":
            import torchsde

            bm = torchsde.BrownianInterval(t0=float(t[0]), t1=float(t[-1]), size=(test.shape[1], 1),
                                           dtype=test.dtype, device=test.device, entropy=1)
            pred = model(test[0], t, bm, mode="parallel")
        else:
            pred = model(test[0], t, mode="parallel")
    fig, axes = plt.subplots(1, test.shape[-1], figsize=(5 * test.shape[-1], 3.5), squeeze=False)
    tt = t.cpu()
    for j, ax in enumerate(axes[0]):
        for i in range(min(4, test.shape[1])):
            (line,) = ax.plot(tt, test[:, i, j].cpu(), "-", alpha=0.8)
            ax.plot(tt, pred[:, i, j].cpu(), "--", color=line.get_color())
        ax.set_xlabel("t")
        ax.set_title(f"{cfg.system}: component {j} (solid: true, dashed: fitted)")
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=110)
