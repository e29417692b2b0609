"""Figures of ``implicit ode fit`` as results (writes experiments/results/ode_fit.json and ode_fit_<name>.png).

Runs the fit (the same code as ``implicit ode fit CONFIG``) on the damped-pendulum neural ODE
(experiments/configs/ode_pendulum.toml) and the Ornstein-Uhlenbeck neural SDE
(experiments/configs/ode_ou.toml), both trained through the parallel-in-time solve, and copies
each run's fitted-vs-true PNG beside the JSON. ``--epochs`` overrides the configs' epochs (small CPU runs).

    python experiments/ode_fit.py --epochs pendulum=30 ou=60   # CPU, a few minutes
    python experiments/ode_fit.py --device cuda  # the configs as written
"""

from __future__ import annotations

import argparse
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch

from implicit.ode.fit import FitConfig, fit
from implicit.results import write_results

CONFIGS = {"pendulum": "experiments/configs/ode_pendulum.toml", "ou": "experiments/configs/ode_ou.toml"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--epochs", nargs="+", default=[], metavar="[NAME=]N",
                        help="epochs for all runs (N) or per run (pendulum=30 ou=60)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--runs", default="runs/ode-fit-results", help="run folders (checkpoints)")
    parser.add_argument("--out", default="experiments/results")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    epochs: dict[str, int | None] = dict.fromkeys(CONFIGS)
    for item in args.epochs:
        key, _, value = item.rpartition("=")
        for name in ([key] if key else list(CONFIGS)):
            epochs[name] = int(value)
    configs, metrics = {}, {}
    for name in args.only:
        cfg = FitConfig.load(CONFIGS[name], epochs=epochs[name], device=args.device)
        run = Path(args.runs) / name
        if run.exists():
            shutil.rmtree(run)  # a fresh run: the figure and numbers belong to this config
        t0 = time.perf_counter()
        out = fit(cfg, run)
        hist = out["history"]
        configs[name] = {**asdict(cfg), "config_file": CONFIGS[name]}
        metrics[name] = {
            "final_test_loss": out["final_test_loss"],
            "first_epoch_test_loss": hist[0]["test"],
            "loss": "trajectory MSE" if cfg.system != "ornstein_uhlenbeck" else "MSE of per-time mean + std of paths",
            "history": hist[:: max(1, len(hist) // 20)] + ([hist[-1]] if len(hist) % 20 else []),
            "fit_s": time.perf_counter() - t0,
            "figure": f"ode_fit_{name}.png",
        }
        Path(args.out).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(run / "fit.png", Path(args.out) / f"ode_fit_{name}.png")
        print(name, {k: v for k, v in metrics[name].items() if k != "history"}, flush=True)
    dev = torch.device(args.device)
    config = {"runs": configs, "ran_on": "CPU" if dev.type == "cpu" else "GPU", "threads": torch.get_num_threads(),
              "epochs_override": epochs}
    path = write_results("ode_fit", config=config, metrics=metrics, device=dev,
                         wall_clock_s=time.perf_counter() - start, out_dir=args.out)
    print(path)


if __name__ == "__main__":
    main()
