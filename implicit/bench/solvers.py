"""Solver overhead against torchdeq on two DEQ layers (issue: the root-finding backend).

Case (a): ``z -> tanh(W z + x)``, ``W`` 4096x4096 Gaussian scaled to spectral norm 0.9,
``x`` of shape (64, 4096). Case (b): a weight-tied FNO block ``z -> gelu(K z + C z) + u``
with neuraloperator's ``SpectralConv(64, 64, n_modes=(16, 16))`` as ``K``, a 1x1
convolution ``C``, all weights times 0.5, ``u`` of shape (32, 64, 64, 64). Float32, from
``z0 = 0`` to relative residual 1e-5. The overhead ratio is a solver's wall time over
(iterations x the time of one bare ``f`` evaluation).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn

from ..deq import DEQ
from ..distributed import resolve_device
from ..results import save_figure_atomic, target, write_results
from ..solvers import SOLVERS
from ._timing import peak_memory, timed

TOL = 1e-5


def tanh_case(device: torch.device, small: bool) -> tuple[nn.Module, torch.Tensor]:
    n, batch = (256, 8) if small else (4096, 64)
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(n, n, generator=gen)
    W = 0.9 * W / torch.linalg.matrix_norm(W, 2)
    layer = TanhLayer(W).to(device)
    x = torch.randn(batch, n, generator=gen).to(device)
    return layer, x


class TanhLayer(nn.Module):
    def __init__(self, W: torch.Tensor):
        super().__init__()
        self.W = nn.Parameter(W)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z @ self.W.T + x)


class FNOBlock(nn.Module):
    """``gelu(K z + C z) + u``: one weight-tied Fourier layer with injected input."""

    def __init__(self, channels: int, modes: int):
        super().__init__()
        from neuralop.layers.spectral_convolution import SpectralConv

        self.K = SpectralConv(channels, channels, n_modes=(modes, modes))
        self.C = nn.Conv2d(channels, channels, 1)
        with torch.no_grad():
            for p in self.parameters():
                p.mul_(0.5)

    def forward(self, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return nn.functional.gelu(self.K(z) + self.C(z)) + u


def fno_case(device: torch.device, small: bool) -> tuple[nn.Module, torch.Tensor]:
    channels, size, modes, batch = (8, 16, 4, 4) if small else (64, 64, 16, 32)
    torch.manual_seed(0)
    layer = FNOBlock(channels, modes).to(device)
    u = torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(1)).to(device)
    return layer, u


def _ours(name: str, graph: bool, compile: bool = False, check_every: int = 4):
    solver = SOLVERS[name]

    def run(f, z0):
        r = solver(f, z0, tol=TOL, max_iter=200, stop_mode="rel", graph=graph, compile=compile,
                   check_every=check_every)
        return int(r.n_iter.max()), bool(r.converged.all())

    return run


def _torchdeq(name: str):
    from torchdeq.solver import get_solver

    solver = get_solver(name)

    def run(f, z0):
        _, _, info = solver(f, z0, max_iter=200, tol=TOL, stop_mode="rel")
        return int(info["nstep"].max()), bool((info["rel_lowest"] <= TOL).all())

    return run


def solver_table(layer: nn.Module, x: torch.Tensor, device: torch.device, repeats: int) -> dict:
    """Time every solver on ``f(z) = layer(z, x)`` and the bare ``f``."""
    f = lambda z: layer(z, x)  # noqa: E731
    z0 = torch.zeros_like(x)
    with torch.no_grad():
        f_time, _ = timed(lambda: f(z0), device, repeats=max(repeats, 20), warmup=3)
        rows = {"bare_f_ms": f_time * 1e3}
        runners = {f"ours_{n}": _ours(n, False) for n in ("anderson", "broyden", "picard")}
        if device.type == "cuda":
            runners |= {f"ours_{n}_graph": _ours(n, True) for n in ("anderson", "broyden", "picard")}
            runners |= {f"ours_{n}_graph_compiled": _ours(n, True, True) for n in ("anderson", "picard")}
            # a host check every iteration wastes no iterations past convergence; costs a sync each
            runners["ours_anderson_graph_compiled_check1"] = _ours("anderson", True, True, check_every=1)
        runners |= {f"torchdeq_{n}": _torchdeq(n) for n in ("anderson", "broyden", "fixed_point_iter")}
        for name, run in runners.items():
            seconds, (iters, converged) = timed(lambda: run(f, z0), device, repeats=repeats)
            rows[name] = {
                "wall_ms": seconds * 1e3, "iterations": iters, "converged": converged,
                "overhead": seconds / (iters * f_time),
            }
    return rows


def backward_and_memory(layer: nn.Module, x: torch.Tensor, device: torch.device, repeats: int) -> dict:
    """Exact implicit backward time over forward solve time; peak memory at 10 vs 100 iterations."""
    adjoint = {}
    deq = DEQ(layer, solver="anderson", tol=TOL, max_iter=200, backward="ift",
              backward_options={"tol": TOL, "max_iter": 200,
                                "on_result": lambda r: adjoint.update(iterations=int(r.n_iter.max()))})

    def forward():
        with torch.no_grad():
            return deq(x)

    fwd, _ = timed(forward, device, repeats=repeats)

    def train_step():
        z, _ = deq(x)
        z.square().mean().backward()

    step, _ = timed(train_step, device, repeats=repeats)
    layer.zero_grad(set_to_none=True)
    memory = {}
    for iters in (10, 100):
        fixed = DEQ(layer, solver="anderson", tol=1e-30, max_iter=iters, backward="ift",
                    backward_options={"tol": TOL, "max_iter": 50, "solver": "anderson"})
        fixed._warned = True  # the tolerance is unreachable on purpose: run exactly `iters` iterations

        def fixed_step():
            z, _ = fixed(x)
            z.square().mean().backward()

        memory[iters] = peak_memory(fixed_step, device)
        layer.zero_grad(set_to_none=True)
    with torch.no_grad():
        forward_iterations = int(deq(x)[1].n_iter.max())
    return {
        "forward_iterations": forward_iterations, "adjoint_iterations": adjoint.get("iterations"),
        "forward_ms": fwd * 1e3, "backward_ms": (step - fwd) * 1e3, "backward_over_forward": (step - fwd) / fwd,
        "peak_train_memory_bytes_10_iters": memory[10], "peak_train_memory_bytes_100_iters": memory[100],
    }


def plot(metrics: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (case, rows) in zip(axes, metrics.items()):
        names = [k for k, v in rows["solvers"].items() if isinstance(v, dict)]
        walls = [rows["solvers"][k]["wall_ms"] for k in names]
        colors = ["tab:blue" if k.startswith("ours") else "tab:gray" for k in names]
        bars = ax.barh(names, walls, color=colors)
        for bar, k in zip(bars, names):
            r = rows["solvers"][k]
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2,
                    f" {r['iterations']} it, {r['overhead']:.1f}x", va="center", fontsize=8)
        ax.set_xlabel("wall time to rel. residual 1e-5 (ms)")
        ax.set_title(case)
        ax.invert_yaxis()
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=120)


def run(device: str | None = None, small: bool = False, repeats: int = 5,
        out_dir: str = "experiments/results") -> Path:
    """Run both cases and write ``solver_overhead.json`` and ``.png`` under ``out_dir``."""
    dev = resolve_device(device)
    start = time.perf_counter()
    metrics, targets = {}, {}
    for case, build, limit in (("a_tanh", tanh_case, 2.0), ("b_fno", fno_case, 1.2)):
        layer, x = build(dev, small)
        rows = solver_table(layer, x, dev, repeats)
        metrics[case] = {"solvers": rows, "backward": backward_and_memory(layer, x, dev, repeats)}
        ours = {k: v for k, v in rows.items() if k.startswith("ours") and isinstance(v, dict) and v["converged"]}
        theirs = {k: v for k, v in rows.items() if k.startswith("torchdeq") and v["converged"]}
        best_ours = min(ours, key=lambda k: ours[k]["wall_ms"])
        best_theirs = min(theirs, key=lambda k: theirs[k]["wall_ms"])
        metrics[case]["best"] = {"ours": best_ours, "torchdeq": best_theirs}
        targets[f"{case}_overhead_best_ours"] = target(ours[best_ours]["overhead"], limit, "<=")
        fastest_anderson = min((k for k in ours if k.startswith("ours_anderson")), key=lambda k: ours[k]["wall_ms"])
        targets[f"{case}_overhead_ours_anderson"] = target(ours[fastest_anderson]["overhead"], limit, "<=")
        targets[f"{case}_best_wall_ms_vs_torchdeq_best"] = target(
            ours[best_ours]["wall_ms"], theirs[best_theirs]["wall_ms"], "<=")
        b = metrics[case]["backward"]
        targets[f"{case}_backward_over_forward"] = target(b["backward_over_forward"], 1.5, "<=")
        if b["peak_train_memory_bytes_10_iters"]:
            ratio = b["peak_train_memory_bytes_100_iters"] / b["peak_train_memory_bytes_10_iters"]
            targets[f"{case}_memory_100_over_10_iters"] = target(ratio, 1.1, "<=")
    config = {"tol": TOL, "stop_mode": "rel", "dtype": "float32", "small": small, "repeats": repeats,
              "timing": "median wall time over repeats after one warm-up, device synchronised"}
    path = write_results("solver_overhead", config=config, metrics=metrics, targets=targets, device=dev,
                         wall_clock_s=time.perf_counter() - start, out_dir=out_dir)
    plot(metrics, path.with_suffix(".png"))
    return path


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("solvers", help="solver overhead vs torchdeq (writes solver_overhead.json/.png)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--small", action="store_true", help="tiny sizes, for a quick check on the CPU")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="experiments/results", help="folder for the results files")
    p.set_defaults(func=lambda a: print(run(a.device, a.small, a.repeats, a.out)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_parser(parser.add_subparsers(required=True))
    args = parser.parse_args(["solvers", *(argv if argv is not None else [])])
    args.func(args)
