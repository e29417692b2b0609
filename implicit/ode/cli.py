"""``implicit ode fit CONFIG``."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    ode = subparsers.add_parser("ode", help="neural ODE/SDE fitting with parallel-in-time trajectories")
    sub = ode.add_subparsers(dest="ode_command", metavar="SUBCOMMAND", required=True)
    p = sub.add_parser("fit", help="fit a neural ODE/SDE to generated trajectories (resumes on the same --out)")
    p.add_argument("config", nargs="?", default=None, help="TOML config (keys of implicit.ode.fit.FitConfig)")
    p.add_argument("--out", default="runs/ode-fit", help="run folder: checkpoint.pt and fit.png")
    for name, kind in (("system", str), ("epochs", int), ("mode", str), ("solver", str), ("steps", int),
                       ("device", str), ("seed", int), ("lr", float)):
        p.add_argument(f"--{name}", type=kind, default=None)
    p.set_defaults(func=_run)


def _run(args) -> None:
    from .fit import FitConfig, fit

    overrides = {k: getattr(args, k) for k in ("system", "epochs", "mode", "solver", "steps", "device", "seed", "lr")}
    metrics = fit(FitConfig.load(args.config, **overrides), args.out)
    print(f"final test loss {metrics['final_test_loss']:.4e}; checkpoint and fit.png in {args.out}")
