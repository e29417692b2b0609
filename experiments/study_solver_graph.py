"""Path-independence maze DEQ training with CUDA-graph solves vs eager (writes study_solver_graph.json).

The study trains on the clock (``train_seconds``), so optimiser steps per second decide how far a model
gets. This trains the study's ``maze_deq_progressive`` model (experiments/configs/path_independence.toml:
random initial states, budget [10, 40], progressive loss, 9x9 mazes, batch 256) for ``--seconds`` each,
eager and with ``solver_options = {graph = true}``, one after the other in this process, and reports
steps per second. Alone on the GPU; in the study 15-18 processes share it and the CPU, where fewer
kernel launches should count for more.

    python experiments/study_solver_graph.py --out DIR                # GPU, ~2 minutes
    python experiments/study_solver_graph.py --small --out /tmp/sg    # CPU smoke run (graph is a no-op)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--seconds", type=float, default=45.0, help="training clock of each run")
    p.add_argument("--small", action="store_true", help="tiny mazes and model on the CPU")
    args = p.parse_args(argv)
    from implicit.distributed import resolve_device
    from implicit.results import write_results
    from implicit.studies.mazes import make_mazes
    from implicit.studies.models import build_model
    from implicit.studies.study import load_config, model_specs, training_summary
    from implicit.studies.train import train_model

    config = load_config(ROOT / "experiments" / "configs" / "path_independence.toml")
    spec = next(s for s in model_specs(config) if s["name"] == "maze_deq_progressive")
    spec = dict(spec, train_seconds=args.seconds, epochs=10**6)
    device = resolve_device("cpu" if args.small else "auto")
    if args.small:
        spec.update(width=8, batch_size=16, budget=[2, 6])
    data = make_mazes(256 if args.small else 4096, 5 if args.small else config["tasks"]["maze"]["train_size"], seed=0)
    t0, runs = time.time(), {}
    for graph in (False, True):
        run_spec = dict(spec, solver_options={"graph": True} if graph else None)
        torch.manual_seed(0)
        model = build_model("maze", run_spec)
        info = train_model(model, data, run_spec, device=device)
        runs["graph" if graph else "eager"] = {"steps": info["steps"], "seconds": info["train_seconds"],
                                               "steps_per_s": info["steps"] / info["train_seconds"],
                                               "final_loss": training_summary(info)["final_loss"]}
        print(f"graph={graph}: {info['steps']} steps in {info['train_seconds']:.1f} s", flush=True)
    ratio = runs["graph"]["steps_per_s"] / runs["eager"]["steps_per_s"]
    config_out = {"model": "maze_deq_progressive (experiments/configs/path_independence.toml)", "spec": spec,
                  "n_mazes": len(data), "small": args.small,
                  "protocol": "one process alone on the device, the two runs one after the other; steps per "
                              "second of training on the clock, the first steps (cuDNN autotuning, graph "
                              "captures) included"}
    path = write_results("study_solver_graph" + ("_small" if args.small else ""), config=config_out,
                         metrics={"runs": runs, "steps_per_s_ratio_graph_over_eager": ratio}, device=device,
                         wall_clock_s=time.time() - t0, out_dir=args.out)
    print(f"graph/eager steps per second: {ratio:.2f}; wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
