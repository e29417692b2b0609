"""FNO-DEQ against FNO++ (and FNO) at depth 4 and IFNO on Darcy, trained in the same process, under variations of the
paper's settings: the FNO-DEQ gradient, the data normaliser and the spectral bias (writes
fno_deq_darcy_<TAG>[_<NOISE>_noise]_<EPOCHS>ep[_seed<S>].json; TAG "backward" by default).

Every run trains one of the paper's Darcy configs (experiments/configs/darcy-*.toml) on darcy-85 for
``--epochs`` (cosine schedule over those epochs), one after the other on one device. FNO-DEQ's gradient:

- ``phantom-1``: the paper's (damping 0.5, 1 step);
- ``phantom-3``: damping 0.8, 3 steps (the paper's Navier-Stokes setting);
- ``ift``: exact implicit gradient, the adjoint solved by Anderson to ``--ift-tol`` (relative).

The suffix sets both models' data normaliser and spectral bias: none, the package's earlier settings
(per-channel normaliser, neuraloperator's spectral bias); ``-pointwise``, the paper's per-point normaliser
(its ``UnitGaussianNormalizer``); ``-paper``, that and no spectral bias (the paper's, and the configs' now).
Each FNO-DEQ run's ratio is to the FNO++ (and FNO depth 4, ``fno-d4``, and IFNO, ``ifno``: FNO-DEQ's block
unrolled 12 times, trained by backprop) run with the same suffix.

The question: which of these closes FNO-DEQ's gap to FNO++ at equal epochs?

    python experiments/fno_deq_darcy_variants.py --out DIR --epochs 16                      # GPU, ~6 min on an H100
    python experiments/fno_deq_darcy_variants.py --out DIR --epochs 64 --variants fno++,ift  # GPU, ~8 min
    python experiments/fno_deq_darcy_variants.py --out DIR --epochs 16 --tag paper_match \
        --variants fno++,phantom-1,fno++-pointwise,phantom-1-pointwise,fno++-paper,phantom-1-paper  # ~6 min
    python experiments/fno_deq_darcy_variants.py --out DIR --epochs 64 --seed S --eval-every 4 \
        --tag paper_match --variants fno++-paper,ift-paper                              # ~8 min a seed
    python experiments/fno_deq_darcy_variants.py ... --noise-on target --noise-level 1e-3  # the paper's noisy data
    python experiments/fno_deq_darcy_variants.py --small --out /tmp/b                       # CPU smoke run

Several seeds and ``--jobs N`` train up to N runs at once, each in its own process on the shared device, so
that runs which leave it idle (the FNO baselines) overlap with others; FNO-DEQ runs already fill an H100 (two
at once, target noise, took 15.3 s an epoch each, against 7.2-7.9 s alone), and epoch times are not comparable
across runs. With ``--time-budget S`` the runs stop at an epoch boundary before S seconds and the script exits
with code 3 without results; the same command with ``--resume`` continues them from their checkpoints under
OUT/runs:

    python experiments/fno_deq_darcy_variants.py --out DIR --epochs 64 --seed 0,1,2 --jobs 9 --time-budget 540 \
        --eval-every 8 --tag paper_match --noise-on target --variants fno++-paper,fno-d4-paper,ift-paper [--resume]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "experiments")]
from fno_deq import _subset  # noqa: E402  (the sibling experiment script's --models parser)

# Explicit, so each name means the same runs whatever the config files say.
GRADIENTS = {"phantom-1": {"backward": "phantom", "backward_steps": 1, "backward_damping": 0.5},
             "phantom-3": {"backward": "phantom", "backward_steps": 3, "backward_damping": 0.8},
             "ift": {"backward": "ift"}}
SETTINGS = {"": {"normalizer": "channel", "spectral_bias": True},
            "-pointwise": {"normalizer": "pointwise", "spectral_bias": True},
            "-paper": {"normalizer": "pointwise", "spectral_bias": False}}
# FNO is neuraloperator's; spectral_bias reaches it since the Darcy noisy runs (whose fno-d4-paper kept the bias)
BASELINES = {"fno++": "darcy-fno++-d4.toml", "fno-d4": "darcy-fno-d4.toml", "ifno": "darcy-ifno.toml"}
VARIANTS: dict[str, tuple[str, dict]] = {}  # name -> (config file, overrides)
for _suffix, _setting in SETTINGS.items():
    for _b, _config in BASELINES.items():
        VARIANTS[f"{_b}{_suffix}"] = (_config, dict(_setting))
    for _g, _grad in GRADIENTS.items():
        VARIANTS[f"{_g}{_suffix}"] = ("darcy-fno-deq.toml", {**_grad, **_setting})


def _baseline(name: str, baseline: str = "fno++") -> str:
    """The baseline run an FNO-DEQ variant is compared with: the one with the same settings suffix."""
    return baseline + next(suffix for suffix in sorted(SETTINGS, key=len, reverse=True) if name.endswith(suffix))


def _config(args: argparse.Namespace, name: str, seed: int) -> tuple:
    """The TrainConfig of one run (variant ``name`` with ``seed``, in its own folder under OUT/runs) and the
    variant's overrides."""
    from pde.train import load_config

    config_file, extra = VARIANTS[name]
    extra = dict(extra, backward_tol=args.ift_tol) if extra.get("backward") == "ift" else extra
    small = dict(data="darcy-quick", width=8, modes=4, max_iter=6, eval_max_iter=6, batch_size=16,
                 pretrain_steps=4, device="cpu") if args.small else {}
    noise = dict(noise_on=args.noise_on, noise_level=args.noise_level) if args.noise_on else {}
    # the solver settings (here and in `small`) are FNO-DEQ's: the FNO++ config ignores them
    return load_config(None, ROOT / "experiments" / "configs" / config_file, epochs=args.epochs, seed=seed,
                       eval_every=args.eval_every, solver_graph=True, plot=False,
                       out=str(Path(args.out) / "runs" / f"{name}_seed{seed}"), **extra, **noise, **small), extra


def _train_run(args: argparse.Namespace, name: str, seed: int, read_only: bool = False) -> dict | None:
    """Train (or, with --resume, continue) one run; its record, or None if the time budget stopped it.
    ``read_only``: train no epoch, only read the run's checkpoint (after other processes trained it)."""
    from pde.train import train

    cfg, extra = _config(args, name, seed)
    summary = train(cfg, overwrite=not args.resume, progress=False, log=lambda s: None, deadline=args.deadline,
                    stop_after=0 if read_only else None)
    if summary["stopped_early"]:
        print(f"{name} seed {seed}: stopped after epoch {summary['epochs_done']}/{args.epochs}", flush=True)
        return None
    history = summary["history"]
    times = [h["time_s"] for h in history]
    run = {"config": VARIANTS[name][0], "overrides": extra, "parameters": summary["parameters"],
           "test_rel_l2": history[-1].get("test_rel_l2"), "train_rel_l2": history[-1].get("train_rel_l2"),
           "test_rel_l2_curve": [[h["epoch"], h["test_rel_l2"]] for h in history if "test_rel_l2" in h],
           "epoch_time_s_last": times[-1], "train_time_s": sum(times),
           "peak_memory_bytes": summary.get("peak_memory_bytes"),  # over all resumed parts
           # FNO-DEQ's last test solve, or IFNO's last unrolled step (has it reached a fixed point?)
           "test_solver_iters": history[-1].get("test_solver_iters"),
           "test_solver_rel_residual": history[-1].get("test_solver_rel_residual")}
    print(f"{name} seed {seed}: test rel L2 {run['test_rel_l2']:.5f}, last epoch {times[-1]:.1f} s", flush=True)
    return run


def _train_in_processes(args: argparse.Namespace, pairs: list[tuple[str, int]]) -> None:
    """Train each (variant, seed) run in its own process of this script, ``--jobs`` at a time; logs in OUT/logs."""
    from pde.train import resolve_data

    cfg, _ = _config(args, *pairs[0])
    resolve_data(cfg.data, cfg.test_data)  # generated once here, so the processes do not race to write it
    logs = Path(args.out) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    shared = ["--out", args.out, "--epochs", str(args.epochs), "--ift-tol", str(args.ift_tol), "--eval-every",
              str(args.eval_every), "--tag", args.tag, "--train-only"]
    shared += ["--noise-on", args.noise_on, "--noise-level", str(args.noise_level)] if args.noise_on else []
    shared += ["--small"] * args.small + ["--resume"] * args.resume
    shared += ["--deadline", repr(args.deadline)] if args.deadline is not None else []

    def run(pair: tuple[str, int]) -> tuple[int, Path]:
        log = logs / f"{pair[0]}_seed{pair[1]}.log"
        with log.open("w") as f:
            cmd = [sys.executable, __file__, "--variants", pair[0], "--seed", str(pair[1]), *shared]
            return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode, log

    with ThreadPoolExecutor(args.jobs) as pool:
        for code, log in pool.map(run, pairs):
            print(log.read_text().strip(), flush=True)
            if code not in (0, 3):
                raise RuntimeError(f"{log.stem} failed (exit code {code}); see {log}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="results JSON folder (the runs go to OUT/runs)")
    p.add_argument("--epochs", type=int, default=16)
    p.add_argument("--seed", default="0", help="a seed, or comma-separated seeds (a results file each)")
    p.add_argument("--variants", default="fno++,phantom-1,phantom-3,ift",
                   help=f"comma-separated subset of {list(VARIANTS)}")
    p.add_argument("--ift-tol", type=float, default=1e-4, help="relative tolerance of the IFT adjoint solve")
    p.add_argument("--eval-every", type=int, default=1, help="test evaluation every k epochs (and after the last)")
    p.add_argument("--noise-on", choices=["input", "target"], help="every run: the paper's noisy observations")
    p.add_argument("--noise-level", type=float, default=1e-3, help="with --noise-on: the maximum noise variance")
    p.add_argument("--tag", default="backward", help="results file fno_deq_darcy_TAG[_EPOCHSep].json")
    p.add_argument("--jobs", type=int, default=1, help="train up to this many runs at once, a process each")
    p.add_argument("--time-budget", type=float, help="seconds; runs stop at an epoch boundary before it (exit 3)")
    p.add_argument("--resume", action="store_true", help="continue the runs under OUT/runs instead of restarting")
    p.add_argument("--small", action="store_true", help="toy data and model on the CPU")
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)  # a child process: the parent's deadline
    p.add_argument("--train-only", action="store_true", help=argparse.SUPPRESS)  # a child process: no results
    args = p.parse_args(argv)
    from implicit.results import write_results

    names = list(_subset(VARIANTS, args.variants, "--variants"))
    try:
        seeds = [int(s) for s in str(args.seed).split(",")]
    except ValueError:
        p.error(f"--seed: expected integers separated by commas, got {args.seed!r}")
    if args.jobs < 1:
        p.error("--jobs must be at least 1")
    t0 = time.time()
    if args.time_budget is not None and args.deadline is None:
        args.deadline = t0 + args.time_budget
    pairs = [(name, seed) for seed in seeds for name in names]
    continued = args.resume  # the runs may have been trained partly by earlier calls
    in_processes = args.jobs > 1 and len(pairs) > 1
    if in_processes:
        _train_in_processes(args, pairs)
        args.resume = True  # below, the runs are read back from their checkpoints
    complete = True
    for seed in seeds:
        runs = {name: _train_run(args, name, seed, read_only=in_processes) for name in names}
        if any(r is None for r in runs.values()):
            complete = False
            continue
        if args.train_only:
            continue
        metrics: dict = {"runs": runs}
        deqs = [n for n in runs if not n.startswith(tuple(BASELINES))]
        for b in BASELINES:  # each FNO-DEQ run to the baseline run with the same settings suffix
            ratios = {n: runs[n]["test_rel_l2"] / runs[_baseline(n, b)]["test_rel_l2"]
                      for n in deqs if _baseline(n, b) in runs}
            if ratios:
                metrics[f"ratio_to_{b}"] = ratios
        concurrent = min(args.jobs, len(pairs))
        config = {"epochs": args.epochs, "seed": seed, "eval_every": args.eval_every,
                  "variants": {n: VARIANTS[n] for n in names}, "ift_tol": args.ift_tol, "small": args.small,
                  "noise": ({"noise_on": args.noise_on, "noise_level": args.noise_level} if args.noise_on
                            else "clean training data (test data is always clean)"),
                  "data": "darcy-85 (1024 train / 500 test at 85x85)",
                  "protocol": f"REDUCED: {args.epochs} epochs (paper: 500, 3 seeds); "
                              + ("continued from earlier calls' checkpoints (how many runs shared the device "
                                 "then is not recorded here); " if continued else "")
                              + (f"up to {concurrent} runs at once, a process each, sharing one device: epoch "
                                 "times are not comparable across runs; " if concurrent > 1 else
                                 "runs one after the other in one process on one device; ")
                              + "FNO-DEQ forward solve replayed as a CUDA graph; epoch time excludes test evaluation"}
        if continued or concurrent > 1:
            config["file_level_note"] = ("wall_clock_s and peak_memory_bytes at the file's top level are this "
                                         "call's process alone; each run's peak is in metrics.runs")
        name = (f"fno_deq_darcy_{args.tag}" + (f"_{args.noise_on}_noise" if args.noise_on else "")
                + ("_small" if args.small else f"_{args.epochs}ep") + (f"_seed{seed}" if seed else ""))
        path = write_results(name, config=config, metrics=metrics,
                             device=torch.device("cpu") if args.small else None, wall_clock_s=time.time() - t0,
                             out_dir=Path(args.out))
        print(f"wrote {path}")
    if not complete:
        print("incomplete: re-run the same command with --resume to continue", flush=True)
    return 0 if complete else 3


if __name__ == "__main__":
    raise SystemExit(main())
