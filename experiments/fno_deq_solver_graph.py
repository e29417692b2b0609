"""FNO-DEQ training with the forward solve replayed as a CUDA graph vs eager (writes fno_deq_solver_graph.json).

Both runs train the paper's Darcy FNO-DEQ config (experiments/configs/darcy-fno-deq.toml) on darcy-85 in
this process, one after the other, from the same seed; only ``solver_graph`` differs. Every step costs the
same work in both: no unrolled warm-up and every Anderson solve, forward and adjoint, run to its 32
iterations (tol 1e-30). fno_deq_solver_graph.json was measured when the config used the paper's phantom
gradient; it now uses the exact implicit gradient, whose adjoint solve is not graphed.
Speed-up = the ratio of the median epoch times after the first (which holds the graph capture and cuDNN
autotuning). The test relative L2 after the last epoch shows the two runs train alike.

    python experiments/fno_deq_solver_graph.py --out DIR              # GPU, ~2 minutes on an H100
    python experiments/fno_deq_solver_graph.py --small --out /tmp/g   # CPU smoke run (the graph is a no-op)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="results JSON folder (the runs go to OUT/runs)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--small", action="store_true", help="toy data and model on the CPU")
    args = p.parse_args(argv)
    from implicit.results import write_results
    from pde.train import load_config, train

    out = Path(args.out)
    small = dict(data="darcy-quick", width=8, modes=4, max_iter=6, eval_max_iter=6, batch_size=16,
                 device="cpu") if args.small else {}
    t0 = time.time()
    runs = {}
    for graph in (False, True):
        cfg = load_config(None, ROOT / "experiments" / "configs" / "darcy-fno-deq.toml", epochs=args.epochs,
                          pretrain_steps=0, tol=1e-30, backward_tol=1e-30, eval_every=args.epochs, solver_graph=graph,
                          plot=False, out=str(out / "runs" / f"graph-{graph}"), **small)
        summary = train(cfg, overwrite=True, progress=False, log=lambda s: None)
        times = [h["time_s"] for h in summary["history"]]
        median = statistics.median(times[1:]) if len(times) > 1 else times[0]
        runs["graph" if graph else "eager"] = {
            "epoch_times_s": times, "median_epoch_s_after_first": median,
            "test_rel_l2": summary["history"][-1].get("test_rel_l2"),
            "test_solver_rel_residual": summary["history"][-1].get("test_solver_rel_residual")}
        print(f"solver_graph={graph}: median epoch {median:.2f} s, test rel L2 "
              f"{runs['graph' if graph else 'eager']['test_rel_l2']}", flush=True)
    speedup = runs["eager"]["median_epoch_s_after_first"] / runs["graph"]["median_epoch_s_after_first"]
    config = {"config": "experiments/configs/darcy-fno-deq.toml", "epochs": args.epochs, "pretrain_steps": 0,
              "tol": 1e-30, "backward_tol": 1e-30, "small": args.small,
              "protocol": "one process, the two runs one after the other on one device, same seed; epoch time "
                          "excludes test evaluation"}
    path = write_results("fno_deq_solver_graph" + ("_small" if args.small else ""), config=config,
                         metrics={"runs": runs, "speedup_graph_over_eager": speedup},
                         device=torch.device("cpu") if args.small else None, wall_clock_s=time.time() - t0,
                         out_dir=out)
    print(f"speed-up {speedup:.2f}x; wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
