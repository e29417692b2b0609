"""``implicit get pairs|train|sample``: teacher pairs, offline distillation, one-step sampling."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(subparsers) -> None:
    """Add the ``get`` command and its three subcommands to an argparse ``subparsers``."""
    get = subparsers.add_parser("get", help="GET: one-step generators distilled from a diffusion teacher")
    sub = get.add_subparsers(dest="get_command", metavar="SUBCOMMAND", required=True)

    p = sub.add_parser("pairs", help="draw x_T and write the teacher's images for them to an HDF5 file (resumable)")
    p.add_argument("teacher", help="local diffusers folder of the teacher (e.g. from `implicit diffusion train`)")
    p.add_argument("--out", default="data/get_pairs.h5", help="HDF5 file to write")
    p.add_argument("--n", type=int, default=10000, help="number of pairs")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sampler", choices=["ddim", "deq-ddim"], default="ddim",
                   help="sequential DDIM or DEQ-DDIM (recorded in the file)")
    p.add_argument("--steps", type=int, default=100, help="DDIM steps of the teacher")
    p.add_argument("--tol", type=float, help="DEQ-DDIM solver tolerance (default 1e-5, relative)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_pairs)

    t = sub.add_parser("train", help="distil a generator from a pairs file (TOML config; resumes in its out folder)")
    t.add_argument("config", help="TOML file with TrainConfig fields (see implicit.get.train.TrainConfig)")
    t.add_argument("--pairs", help="override the pairs file")
    t.add_argument("--out", help="override the run folder")
    t.add_argument("--steps", type=int, help="override the number of steps")
    t.add_argument("--device", help="override the device")
    t.set_defaults(func=_train)

    s = sub.add_parser("sample", help="one-step samples of a trained run as a PNG grid")
    s.add_argument("run", help="run folder written by `implicit get train`")
    s.add_argument("--n", type=int, default=64)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", help="PNG path (default: <run>/samples.png)")
    s.add_argument("--no-ema", action="store_true", help="use the raw weights instead of their EMA")
    s.add_argument("--device", default="auto")
    s.set_defaults(func=_sample)


def _pairs(args: argparse.Namespace) -> None:
    from ..distributed import resolve_device
    from .pairs import teacher_sampler, write_pairs

    device = resolve_device(args.device)
    options = {"tol": args.tol} if args.tol is not None and args.sampler == "deq-ddim" else {}
    fn, recipe = teacher_sampler(args.teacher, sampler=args.sampler, steps=args.steps, device=device, **options)
    path = write_pairs(args.out, fn, n=args.n, shape=tuple(recipe["teacher_shape"]), batch_size=args.batch_size,
                       seed=args.seed, recipe=recipe, device=device)
    print(f"pairs: {path}")


def _train(args: argparse.Namespace) -> None:
    from .train import load_config, train

    cfg = load_config(args.config, pairs=args.pairs, out=args.out, steps=args.steps, device=args.device)
    summary = train(cfg)
    print(json.dumps(summary, indent=2))


def _sample(args: argparse.Namespace) -> None:
    from ..distributed import resolve_device
    from ..results import save_torch_atomic
    from .evaluate import generate, save_grid
    from .pairs import chunk_noise
    from .train import load_generator

    device = resolve_device(args.device)
    model = load_generator(args.run, ema=not args.no_ema, device=device)
    c = model.cfg
    x, y = chunk_noise(args.seed, 0, args.n, (c.channels, c.image_size, c.image_size), c.num_classes)
    images = generate(model, x, y)
    out = Path(args.out or Path(args.run) / "samples.png")
    save_grid(images, out, nrow=max(1, int(round(args.n ** 0.5))))
    save_torch_atomic({"noise": x, "images": images, "labels": y}, out.with_suffix(".pt"))
    print(f"samples: {out}")
