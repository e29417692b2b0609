"""The ``implicit`` command line: one subcommand per job.

Each subcommand lives in its family's module, which exposes ``add_parser(subparsers)``
and keeps heavy imports (neuraloperator, diffusers) inside the command itself.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules with add_parser(subparsers); a family not installed yet is skipped.
COMMANDS = [
    "implicit.demo",
    "pde.cli_data",  # data generate|show
    "pde.cli_train",  # train, evaluate
    "implicit.diffusion.cli",  # diffusion train|sample|invert
    "implicit.get.cli",  # get pairs|train|sample
    "implicit.ode.cli",  # ode fit
    "implicit.studies.cli",  # study path-independence
]
BENCHMARKS = ["implicit.bench.solvers"]  # modules added under `implicit bench`


def _add(subparsers, module: str) -> None:
    try:
        importlib.import_module(module).add_parser(subparsers)
    except ModuleNotFoundError as err:
        missing_family = err.name is not None and (module + ".").startswith(err.name + ".")
        if not missing_family:  # a missing dependency is a real error; a family not built yet is not
            raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="implicit", description="Implicit models for scientific machine learning.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMANDS:
        _add(sub, module)
    bench = sub.add_parser("bench", help="GPU benchmarks that write experiments/results/*.json")
    bench_sub = bench.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for module in BENCHMARKS:
        _add(bench_sub, module)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:  # Ctrl-C ends the command with the shell's code for it, not a traceback
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
