"""``implicit data generate|show``: build data sets from recipes and look at them.

``add_parser(subparsers)`` adds the ``data`` command to the package's argparse
CLI; each leaf sets ``func`` (called with the parsed namespace, returns an exit
code). ``python -m pde.cli_data ...`` runs the same commands standalone.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from .cli_train import _wrap  # errors about the user's input (recipe, split, file) print as one line

__all__ = ["add_parser", "main"]


def _generate(args: argparse.Namespace) -> int:
    from implicit.distributed import resolve_device

    from .datasets import generate, resolve_recipe

    path = resolve_recipe(args.recipe)
    out = Path(args.out) if args.out else path.parent
    device = resolve_device(args.device)
    print(f"recipe {path} -> {out} on {device}", file=sys.stderr)
    for s in generate(path, out, splits=args.split or None, device=device, progress=not args.quiet):
        extra = f", {s['n_rejected']} draws rejected (did not converge)" if s.get("n_rejected") else ""
        print(f"{s['path']}: {s['status']}, {s.get('n_samples', '?')} samples, "
              f"{s.get('wall_time_s', 0.0):.1f} s{extra}")
    return 0


def _show(args: argparse.Namespace) -> int:
    from .datasets import show

    png = show(args.file, args.out, n=args.n)
    print(png)
    return 0


def add_parser(subparsers: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    """Add ``data {generate,show}`` to ``subparsers``; returns the ``data`` parser."""
    p = subparsers.add_parser("data", help="generate PDE data sets from recipes, or plot a data file",
                              description="Generate PDE data sets from TOML recipes (data/*.toml), or plot one.")
    sub = p.add_subparsers(dest="data_command", metavar="{generate,show}")
    sub.required = True
    g = sub.add_parser("generate", help="generate every split of a recipe (resumes an interrupted run)")
    g.add_argument("recipe", help="path to a recipe TOML, or a bare name such as darcy-85 (data/NAME.toml)")
    g.add_argument("--out", help="output folder (default: the recipe's folder, i.e. data/)")
    g.add_argument("--device", default="auto", help='"auto" (CUDA if available), "cpu", "cuda", "cuda:1", ...')
    g.add_argument("--split", action="append", help="only this split (repeatable); default: all splits")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.set_defaults(func=_wrap(_generate))
    s = sub.add_parser("show", help="write a PNG of a few samples of a data file")
    s.add_argument("file", help="an .h5 file written by `data generate`")
    s.add_argument("--out", help="PNG path (default: FILE with .png)")
    s.add_argument("-n", type=int, default=4, help="number of samples to plot (default 4)")
    s.set_defaults(func=_wrap(_show))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point: ``python -m pde.cli_data data generate darcy-tiny``."""
    parser = argparse.ArgumentParser(prog="python -m pde.cli_data")
    subs = parser.add_subparsers(dest="command", metavar="data")
    subs.required = True
    add_parser(subs)
    args = parser.parse_args(argv)
    return args.func(args)  # wrapped: bad input exits 2 with a one-line error


if __name__ == "__main__":
    sys.exit(main())
