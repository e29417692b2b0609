"""Parallel-in-time vs sequential neural-ODE trajectories (writes experiments/results/ode_parallel.json/.png).

Field: a 3-layer MLP of width 256 on a 64-dimensional state, rk4 on a uniform grid over
t in [0, 1] with K steps. In one process, for K in {100, 1000, 10000} and batch 1 and 64:
torchdiffeq's fixed-grid odeint, our CUDA-graph sequential loop, and the parallel solve
(Newton with a parallel scan, eager and CUDA-graphed); error to torchdiffeq's trajectory,
rounds, wall time (median of repeats after a warm-up, device synchronised).

    python experiments/ode_parallel.py            # GPU
    python experiments/ode_parallel.py --small    # a quick CPU check
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from implicit.bench._timing import timed
from implicit.distributed import resolve_device
from implicit.ode import odeint_parallel, odeint_sequential
from implicit.results import save_figure_atomic, target, write_results


class Field(nn.Module):
    def __init__(self, dim: int = 64, width: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                                 nn.Linear(width, dim))

    def forward(self, t, y):
        return self.net(y)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--device", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="experiments/results")
    args = parser.parse_args(argv)
    dev = resolve_device(args.device)
    dim, width = (8, 32) if args.small else (64, 256)
    Ks = (20, 50) if args.small else (100, 1000, 10000)
    batches = (1, 4) if args.small else (1, 64)
    torch.manual_seed(0)
    field = Field(dim, width).to(dev)
    start = time.perf_counter()
    rows = []
    for K in Ks:
        t = torch.linspace(0, 1, K + 1, device=dev)
        for B in batches:
            y0 = torch.randn(B, dim, device=dev)
            # memory budget for the Jacobian JVPs: at most ~16k rows per call
            chunk = max(1, min(B * K, 16384))
            row = {"K": K, "batch": B}
            with torch.no_grad():
                sec, ref = timed(lambda: odeint_sequential(field, y0, t, method="rk4"), dev,
                                 repeats=1 if K >= 10000 else args.repeats)
                row["torchdiffeq_s"] = sec
                if dev.type == "cuda":
                    sec, ys = timed(lambda: odeint_sequential(field, y0, t, method="rk4", graph=True), dev,
                                    repeats=args.repeats)
                    row["graph_sequential_s"] = sec
                    row["graph_sequential_err"] = float((ys - ref).abs().max())
                for name, graph in (("parallel_newton", False), ("parallel_newton_graph", True)):
                    if graph and dev.type != "cuda":
                        continue
                    try:
                        sec, (ys, res) = timed(
                            lambda: odeint_parallel(field, y0, t, solver="newton", tol=2e-7, graph=graph, max_iter=10,
                                                    chunk=chunk, check_every=1, backward=None),
                            dev, repeats=args.repeats)
                    except (RuntimeError, torch.OutOfMemoryError) as err:  # record, keep the sweep going
                        row[name + "_error"] = str(err).splitlines()[0][:200]
                        torch.cuda.empty_cache() if dev.type == "cuda" else None
                        continue
                    row[name + "_s"] = sec
                    row[name + "_err"] = float((ys - ref).abs().max())
                    row[name + "_rounds"] = int(res.n_iter.max())
                    row[name + "_converged"] = bool(res.converged.all())
            print(row, flush=True)
            rows.append(row)
    targets = {}
    key = [r for r in rows if r["K"] == (1000 if not args.small else Ks[-1]) and r["batch"] == 1][0]
    par = min((k for k in ("parallel_newton_s", "parallel_newton_graph_s") if k in key), key=lambda k: key[k])
    targets["K1000_b1_speedup_vs_torchdiffeq"] = target(key["torchdiffeq_s"] / key[par], 20.0, ">=")
    if "graph_sequential_s" in key:
        targets["K1000_b1_speedup_vs_cuda_graph_sequential"] = target(key["graph_sequential_s"] / key[par], 3.0, ">=")
    targets["K1000_b1_max_abs_error"] = target(key[par.replace("_s", "_err")], 1e-5, "<=")
    config = {"field": f"3-layer MLP width {width} (tanh), state dim {dim}, autonomous", "method": "rk4",
              "t": "[0, 1] uniform", "Ks": Ks, "batches": batches, "parallel_solver": "newton (DEER scan)",
              "tol": "2e-7 relative residual of the whole trajectory (max 10 rounds)", "dtype": "float32", "repeats": args.repeats, "small": args.small,
              "timing": "median wall time after a warm-up, device synchronised; K=10000 torchdiffeq timed once"}
    path = write_results("ode_parallel", config=config, metrics={"rows": rows}, targets=targets, device=dev,
                         wall_clock_s=time.perf_counter() - start, out_dir=args.out)
    plot(rows, path.with_suffix(".png"))
    print(path)


def plot(rows, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, B in zip(axes, sorted({r["batch"] for r in rows})):
        sub = [r for r in rows if r["batch"] == B]
        Ks = [r["K"] for r in sub]
        for key, label in (("torchdiffeq_s", "torchdiffeq (sequential)"), ("graph_sequential_s", "CUDA-graph sequential"),
                           ("parallel_newton_s", "parallel (Newton)"), ("parallel_newton_graph_s", "parallel (Newton, graph)")):
            if all(key in r for r in sub):
                ax.loglog(Ks, [r[key] for r in sub], "o-", label=label)
        ax.set_title(f"batch {B}")
        ax.set_xlabel("steps K")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("wall time (s)")
    axes[0].legend()
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=120)


if __name__ == "__main__":
    main()
