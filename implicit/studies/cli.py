"""``implicit study path-independence CONFIG``: train, evaluate and report the path-independence study."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    study = subparsers.add_parser("study", help="studies of equilibrium models (path independence)")
    sub = study.add_subparsers(dest="study", metavar="STUDY", required=True)
    p = sub.add_parser("path-independence", help="AA scores and upward generalisation (Anil et al., 2022)",
                       description="Train the models of CONFIG (TOML), evaluate accuracy vs test-time iterations "
                                   "and asymptotic alignment, and write <out-dir>/<name>.json and PNGs. Re-running "
                                   "on the same run folder skips models already done.")
    p.add_argument("config", help="TOML config, e.g. experiments/configs/path_independence.toml")
    p.add_argument("--run-dir", help="folder for data, checkpoints and per-model evaluations (resumable)")
    p.add_argument("--out-dir", help="folder for the results JSON and PNGs")
    p.add_argument("--device", help='"auto", "cpu", "cuda", "cuda:1"...')
    p.add_argument("--models", help="comma-separated subset of model names to run")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config entry, e.g. --set defaults.epochs=2 --set tasks.maze.n_train=500")
    p.add_argument("--train-only", action="store_true",
                   help="train (or train on) until time_budget_s is nearly spent, then stop: no evaluation, no "
                        "results; a study too long for one sitting runs as several such commands on one run "
                        "folder, then one without it")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> None:
    from .study import load_config, run_study, set_option

    config = load_config(args.config)
    for flag, key in ((args.run_dir, "run_dir"), (args.out_dir, "out_dir"), (args.device, "device")):
        if flag:
            config[key] = flag
    for assignment in args.set:
        set_option(config, assignment)
    only = [m for m in args.models.split(",") if m] if args.models else None
    path = run_study(config, progress=not args.no_progress, only=only, train_only=args.train_only)
    if path is not None:
        print(f"wrote {path}")
