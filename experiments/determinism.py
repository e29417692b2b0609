"""Are two trainings of one seed bitwise equal? With and without ``TrainConfig.deterministic`` (writes
experiments/results/determinism.json).

GPU runs of one seed part in the last bits (reductions whose order varies from run to run), and training
grows the gap: two paper-size NS FNO-DEQ trainings of one seed were up to 0.012 apart in test error at epoch 6.
``--deterministic true`` (torch's deterministic algorithms, cuDNN without autotuning, cuBLAS's fixed
workspace) is meant to close it. Each case here is ``implicit train darcy`` twice, in two processes started
together, on the quick Darcy data; the two checkpoints' weights are compared tensor by tensor. Cases: FNO-DEQ
(Anderson, phantom gradient, the Jacobian regulariser's random probes) and FNO++ d4 with instance norm, each
with the option off and on.

    python experiments/determinism.py --out DIR            # GPU: eight processes at once, about a minute
    python experiments/determinism.py --small --out DIR    # CPU, toy widths (the CPU is repeatable either way)
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from implicit.results import target, write_results  # noqa: E402
from pde.train import resolve_data  # noqa: E402

MODELS = {
    "fno-deq": ["--model", "fno-deq", "--jac-reg", "1"],
    "fno++-d4": ["--model", "fno++", "--depth", "4", "--norm", "instance_norm"],
}


def train_command(model: str, deterministic: bool, run: Path, a: argparse.Namespace) -> list[str]:
    args = [sys.executable, "-m", "implicit.cli", "train", "darcy", "--data", a.data, *MODELS[model],
            "--epochs", str(a.epochs), "--pretrain-steps", str(a.pretrain_steps),
            "--deterministic", str(deterministic).lower(),
            "--device", a.device, "--out", str(run), "--overwrite", "--no-plot", "--quiet"]
    return args + (["--width", "8", "--modes", "4", "--max-iter", "4", "--eval-max-iter", "4"] if a.small else [])


def compare(first: Path, second: Path) -> dict:
    """Whether two runs' final weights are bitwise equal, their largest difference, and their test errors."""
    a, b = (torch.load(p / "checkpoint.pt", map_location="cpu", weights_only=True) for p in (first, second))
    diffs = {k: (v.double() - b["model"][k].double()).abs().max().item() for k, v in a["model"].items()
             if torch.is_tensor(v) and v.is_floating_point() and v.numel()}
    return {
        "bitwise_equal": all(torch.equal(v, b["model"][k]) for k, v in a["model"].items() if torch.is_tensor(v)),
        "tensors_differing": sum(d > 0 for d in diffs.values()), "tensors": len(diffs),
        "max_abs_weight_diff": max(diffs.values()),
        "test_rel_l2": [ck["history"][-1]["test_rel_l2"] for ck in (a, b)],
        "train_rel_l2_equal_each_epoch": [r["train_rel_l2"] for r in a["history"]]
        == [r["train_rel_l2"] for r in b["history"]],
        "median_epoch_time_s": [statistics.median(r["time_s"] for r in ck["history"]) for ck in (a, b)],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("--out", required=True, help="folder for the runs and the results file")
    p.add_argument("--results", help="folder for determinism.json (default: --out)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data", default="darcy-quick", help="training file or recipe (default: implicit train darcy's)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--pretrain-steps", type=int, default=8, help="fno-deq's unrolled warm-up (one epoch is 8 steps)")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {sorted(MODELS)}")
    p.add_argument("--small", action="store_true", help="toy widths, for a CPU check of the script")
    a = p.parse_args(argv)
    models = a.models.split(",")
    if set(models) - set(MODELS):
        p.error(f"--models: unknown {sorted(set(models) - set(MODELS))}; choose from {sorted(MODELS)}")
    out = Path(a.out)
    resolve_data(a.data, None)  # made once here, not by eight processes at once
    cases = [(m, det) for m in models for det in (False, True)]
    runs = {(m, det, i): out / "runs" / f"{m}-{'det' if det else 'default'}-{i}" for m, det in cases for i in (0, 1)}
    t0 = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}  # eight processes at once
    procs = {key: subprocess.Popen(train_command(key[0], key[1], run, a), cwd=ROOT, env=env, stderr=subprocess.PIPE,
                                   stdout=subprocess.DEVNULL, text=True) for key, run in runs.items()}
    errors = {key: proc.communicate()[1] for key, proc in procs.items()}  # reads each pipe to the end: no stall
    failed = {key: errors[key][-2000:] for key, proc in procs.items() if proc.returncode != 0}
    if failed:
        raise RuntimeError("training failed: " + "; ".join(f"{k}: {err}" for k, err in failed.items()))
    wall = time.perf_counter() - t0
    metrics = {f"{m} deterministic={det}": compare(runs[m, det, 0], runs[m, det, 1]) for m, det in cases}
    targets = {f"{m}_deterministic_runs_bitwise_equal": target(float(metrics[f"{m} deterministic=True"]
                                                                     ["bitwise_equal"]), 1.0, ">=")
               for m in models}
    for name, r in metrics.items():
        print(f"{name}: bitwise equal {r['bitwise_equal']}, {r['tensors_differing']}/{r['tensors']} tensors differ, "
              f"max |dw| {r['max_abs_weight_diff']:.2e}, test rel L2 {r['test_rel_l2'][0]:.6f} / "
              f"{r['test_rel_l2'][1]:.6f}")
    config = {"models": {m: MODELS[m] for m in models}, "epochs": a.epochs, "small": a.small,
              "pretrain_steps": a.pretrain_steps, "data": a.data,
              "protocol": "each case trained twice, the two processes started together with the other cases' "
                          "(so epoch times are concurrent times); final weights compared tensor by tensor"}
    path = write_results("determinism", config=config, metrics=metrics, targets=targets, device=a.device,
                         wall_clock_s=wall, out_dir=a.results or out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
