"""``implicit demo``: a DEQ learns a nonlinear map in a few seconds on a CPU.

The layer is ``z -> tanh(W z + U x)`` with ``W`` kept contractive by spectral
normalisation; the target is a fixed random smooth function of ``x``. Each epoch
prints the training loss and the forward solver's residuals and iterations, so a
new user sees the equilibrium being solved and the implicit gradient training it.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from tqdm import tqdm

from .deq import DEQ


class TanhCell(nn.Module):
    """``f(z, x) = tanh(W z + U x)``: the classic single-layer DEQ cell."""

    def __init__(self, width: int, in_dim: int):
        super().__init__()
        self.W = nn.Linear(width, width, bias=False)
        self.U = nn.Linear(in_dim, width)
        with torch.no_grad():
            self.W.weight.mul_(0.5 / torch.linalg.matrix_norm(self.W.weight, 2))

    def init_state(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(x.shape[0], self.W.in_features)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.W(z) + self.U(x))


class DEQRegressor(nn.Module):
    def __init__(self, in_dim: int, width: int, out_dim: int, solver: str, backward: str):
        super().__init__()
        self.deq = DEQ(TanhCell(width, in_dim), solver=solver, tol=1e-5, max_iter=50, backward=backward,
                       norm="spectral_norm")
        self.head = nn.Linear(width, out_dim)

    def forward(self, x: torch.Tensor):
        z, result = self.deq(x)
        return self.head(z), result


def run(epochs: int = 20, solver: str = "anderson", backward: str = "ift", seed: int = 0) -> float:
    """Train the demo DEQ; returns the final test mean-squared error."""
    torch.manual_seed(seed)
    in_dim, out_dim = 8, 4
    teacher = nn.Sequential(nn.Linear(in_dim, 64), nn.Tanh(), nn.Linear(64, out_dim))
    x_train, x_test = torch.randn(1024, in_dim), torch.randn(256, in_dim)
    with torch.no_grad():
        y_train, y_test = teacher(x_train), teacher(x_test)
    model = DEQRegressor(in_dim, 64, out_dim, solver, backward)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    print(f"DEQ demo: tanh cell, width 64, solver={solver}, backward={backward}")
    bar = tqdm(range(1, epochs + 1), desc="epochs", leave=False)
    for epoch in bar:
        model.train()
        for batch in torch.randperm(len(x_train)).split(128):
            pred, _ = model(x_train[batch])
            loss = nn.functional.mse_loss(pred, y_train[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        model.eval()
        with torch.no_grad():
            pred, result = model(x_test)
            test = nn.functional.mse_loss(pred, y_test).item()
        tqdm.write(
            f"epoch {epoch:3d}  train mse {loss.item():.4f}  test mse {test:.4f}  "
            f"residual max {result.rel_residual.max().item():.1e}  "
            f"iterations {int(result.n_iter.float().mean())} mean / {int(result.n_iter.max())} max"
        )
    return test


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("demo", help="train a small DEQ on a toy task and print solver residuals",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--solver", default="anderson", help="anderson, broyden or picard")
    p.add_argument("--backward", default="ift", help="ift, phantom, jfb or unrolled")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=lambda a: run(a.epochs, a.solver, a.backward, a.seed))
