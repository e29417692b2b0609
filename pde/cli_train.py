"""``implicit train`` and ``implicit evaluate``: steady-state PDE operators from the command line.

``implicit train darcy`` trains FNO-DEQ with the embedded quick-start defaults (generating
its small data set on first use); ``--config FILE.toml`` and the flags below override them.
``implicit evaluate CHECKPOINT DATA`` scores a checkpoint on any data file and resolution.
Under ``torchrun --nproc_per_node N -m pde.cli_train train ...`` training uses DDP.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

__all__ = ["add_parser", "main"]


def _flag_bool(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f'expected true or false, got "{text}"')
    return text.lower() in ("true", "1", "yes")


# flag -> (TrainConfig field, type, help)
_FLAGS = {
    "--data": ("data", str, "training file (*_train.h5) or recipe name (data/NAME.toml; generated if missing)"),
    "--test-data": ("test_data", str, "test file (default: the training file with _train -> _test)"),
    "--ntrain": ("ntrain", int, "use only the first N training samples"),
    "--ntest": ("ntest", int, "use only the first N test samples"),
    "--subsample": ("subsample", int, "keep every k-th grid point of the data"),
    "--model": ("model", str, "fno | fno++ | ifno | fno-deq"),
    "--width": ("width", int, "channels of the Fourier layers"),
    "--modes": ("modes", int, "Fourier modes per direction (the FNO papers' convention)"),
    "--depth": ("depth", int, "fno/fno++: number of 3-layer blocks"),
    "--iterations": ("iterations", int, "ifno: applications of the tied block"),
    "--padding": ("padding", float, "domain padding, fraction of the grid (0 for periodic data)"),
    "--grid": ("grid", str, "grid coordinates: auto (the data's) | periodic (i/s, NS) | closed (i/(s-1), Darcy's walls)"),
    "--norm": ("norm", str, 'normalisation in the Fourier layers: instance_norm | group_norm | none'),
    "--spectral-bias": ("spectral_bias", _flag_bool,
                        "a bias in each spectral convolution (true | false; papers: false)"),
    "--solver": ("solver", str, "fno-deq forward solver: anderson | broyden | picard"),
    "--tol": ("tol", float, "fno-deq solver tolerance (relative residual)"),
    "--max-iter": ("max_iter", int, "fno-deq solver iterations in training"),
    "--eval-max-iter": ("eval_max_iter", int, "fno-deq solver iterations in evaluation"),
    "--solver-graph": ("solver_graph", _flag_bool,
                       "fno-deq on CUDA: replay the forward solve as a CUDA graph (true | false)"),
    "--backward": ("backward", str, "fno-deq gradient: ift | phantom | jfb | unrolled"),
    "--backward-steps": ("backward_steps", int, "phantom/unrolled gradient steps"),
    "--backward-damping": ("backward_damping", float, "phantom gradient damping"),
    "--backward-tol": ("backward_tol", float, "ift: adjoint solve tolerance (default: --tol)"),
    "--backward-max-iter": ("backward_max_iter", int, "ift: adjoint solve iterations (default: --max-iter)"),
    "--pretrain-steps": ("pretrain_steps", int, "fno-deq: first training steps run unrolled iterations"),
    "--pretrain-iter": ("pretrain_iter", int, "fno-deq: unrolled iterations during pretraining"),
    "--checkpoint-unrolled": ("checkpoint_unrolled", _flag_bool,
                              "ifno and fno-deq's warm-up: recompute unrolled iterations in the backward "
                              "(less memory, same gradient; true | false)"),
    "--jac-reg": ("jac_reg", float, "fno-deq: weight of the Jacobian regulariser at the fixed point (0: off)"),
    "--jac-reg-samples": ("jac_reg_samples", int, "fno-deq: Hutchinson probes of the Jacobian regulariser"),
    "--epochs": ("epochs", int, "training epochs"),
    "--batch-size": ("batch_size", int, "global batch size (split across processes)"),
    "--lr": ("lr", float, "learning rate"),
    "--weight-decay": ("weight_decay", float, "Adam weight decay"),
    "--loss-reduction": ("loss_reduction", str, "mean | sum of the relative L2 over the batch (the paper's code: sum)"),
    "--normalizer": ("normalizer", str, "channel | pointwise (per grid point, the FNO papers') | "
                                        "scale (mean 0, fitted on clean data: the paper's NS)"),
    "--scheduler": ("scheduler", str, "cosine | step | constant"),
    "--step-size": ("step_size", int, "scheduler=step: epochs between decays"),
    "--gamma": ("gamma", float, "scheduler=step: decay factor"),
    "--seed": ("seed", int, "random seed (initialisation, data order, noise)"),
    "--device": ("device", str, '"auto", "cpu", "cuda", "cuda:1", ...'),
    "--deterministic": ("deterministic", _flag_bool,
                        "bitwise-repeatable GPU runs: deterministic algorithms only (slower; true | false)"),
    "--amp": ("amp", str, "mixed precision: none | bf16 (fp16 cannot train the complex spectral weights)"),
    "--noise-level": ("noise_level", float, "maximum noise variance of the observations (paper: 1e-3)"),
    "--noise-on": ("noise_on", str, "input | target: which field gets the noise"),
    "--noise-per-epoch": ("noise_per_epoch", _flag_bool,
                          "draw the noise anew each epoch, as the paper's NS loader (true | false; default: once)"),
    "--noise-scale": ("noise_scale", float, "multiplies the noise variances (1: the paper's, on the raw field)"),
    "--out": ("out", str, "run folder (default runs/<data>-<model>)"),
}


def _train(args: argparse.Namespace) -> int:
    from .train import _run_dir, load_config, train

    overrides = {field: getattr(args, field) for field, _, _ in _FLAGS.values()}
    if args.no_plot:
        overrides["plot"] = False
    cfg = load_config(None if args.config and args.problem is None else (args.problem or "darcy"),
                      args.config, **overrides)
    resume = True if args.resume else None
    try:
        summary = train(cfg, resume=resume, overwrite=args.overwrite, progress=not args.quiet)
    except KeyboardInterrupt:  # checkpoints are written whole at each epoch's end: say what is kept
        ckpt = _run_dir(cfg) / "checkpoint.pt"
        kept = (f"{ckpt} holds the last finished epoch; the same command resumes from it" if ckpt.exists()
                else "no epoch had finished, so there is no checkpoint to resume from")
        print(f"interrupted: {kept}", file=sys.stderr)
        raise SystemExit(130) from None
    if summary["history"] and summary.get("world_size", 1) >= 1 and "test_rel_l2" in summary["history"][-1]:
        last = summary["history"][-1]
        print(f"{cfg.model}: test relative L2 {last['test_rel_l2']:.4f} after {last['epoch']} epochs "
              f"({summary['parameters'] / 1e6:.2f}M parameters); checkpoint {summary['checkpoint']}")
    return 0


def _default_eval_path(args: argparse.Namespace) -> Path:
    """``eval_<data>[_sub<k>][_iter<n>][_first<N>].json`` beside the checkpoint: the name carries every option that
    changes the numbers, so evaluating one file two ways (e.g. more solver iterations) keeps both results."""
    parts = [f"eval_{Path(args.data).stem}"]
    parts += [f"sub{args.subsample}"] if args.subsample != 1 else []
    parts += [f"iter{args.max_iter}"] if args.max_iter is not None else []
    parts += [f"first{args.limit}"] if args.limit is not None else []
    parts += [args.amp] if args.amp != "none" else []
    return Path(args.checkpoint).with_name("_".join(parts) + ".json")


def _evaluate(args: argparse.Namespace) -> int:
    from .train import evaluate, write_json

    res = evaluate(args.checkpoint, args.data, subsample=args.subsample, limit=args.limit, max_iter=args.max_iter,
                   batch_size=args.batch_size, device=args.device, amp=args.amp)
    line = (f"{Path(args.data).name} at {res['resolution']}x{res['resolution']}"
            + (f" (trained at {res['train_resolution']})" if res.get("train_resolution") else "")
            + f": relative L2 {res['rel_l2_mean']:.4f} +- {res['rel_l2_std']:.4f} over {res['n_samples']} samples")
    s = res.get("solver")
    if s and res["model"]["model"] == "ifno":  # no tolerance: how far the last unrolled step still moved
        line += (f"; {s['n_iter_mean']:.0f} unrolled iterations, last step {s['residual_mean']:.2e} "
                 f"(relative {s['rel_residual_mean']:.2e})")
    elif s:
        line += (f"; solver {s['n_iter_mean']:.1f} iterations, residual {s['residual_mean']:.2e}, "
                 f"{100 * s['converged_fraction']:.0f}% converged")
    print(line)
    out = Path(args.out) if args.out else _default_eval_path(args)
    write_json(out, res)
    print(f"per-sample results: {out}")
    if args.json:
        summary = {k: v for k, v in res.items() if k != "rel_l2"}
        if "solver" in summary:
            summary["solver"] = {k: v for k, v in summary["solver"].items() if k not in ("n_iter", "residual")}
        print(json.dumps(summary, indent=1, default=str))
    return 0


def _wrap(fn):
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError, OSError) as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
    return run


def add_parser(subparsers: "argparse._SubParsersAction") -> None:
    """Add the top-level ``train`` and ``evaluate`` commands to ``subparsers``."""
    t = subparsers.add_parser(
        "train", help="train a steady-state PDE operator (FNO-DEQ by default): `implicit train darcy`",
        description="Train FNO, FNO++, IFNO or FNO-DEQ on Darcy or steady Navier-Stokes data. PROBLEM picks the "
                    "embedded defaults (a quick CPU run); --config and the flags override them. Re-running on the "
                    "same run folder resumes from its last checkpoint.")
    t.add_argument("problem", nargs="?", choices=["darcy", "ns"], help="embedded defaults (default: darcy)")
    t.add_argument("--config", help="TOML config (keys of pde.train.TrainConfig, top level or under [train])")
    for flag, (field, typ, help_) in _FLAGS.items():
        t.add_argument(flag, dest=field, type=typ, default=None, help=help_)
    t.add_argument("--resume", action="store_true",
                   help="require a checkpoint in the run folder to continue (without the flag a run folder with one "
                        "continues it too; --overwrite starts again)")
    t.add_argument("--overwrite", action="store_true", help="start again even if the run folder has a checkpoint")
    t.add_argument("--no-plot", action="store_true", help="no prediction PNG")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=_wrap(_train))

    e = subparsers.add_parser(
        "evaluate", help="relative L2 and solver statistics of a checkpoint on a data file (any resolution)",
        description="Evaluate a checkpoint from `implicit train` on a data file: relative L2 (mean, std, per "
                    "sample), FNO-DEQ solver iterations and residuals; the file may have another resolution "
                    "than the training data (zero-shot transfer).")
    e.add_argument("checkpoint", help="checkpoint.pt of a training run")
    e.add_argument("data", help="an .h5 file written by `implicit data generate`")
    e.add_argument("--subsample", type=int, default=1, help="keep every k-th grid point")
    e.add_argument("--limit", type=int, help="only the first N samples")
    e.add_argument("--max-iter", type=int,
                   help="FNO-DEQ solver iterations, or IFNO's unrolled iterations (default: the checkpoint's)")
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--device", default="auto")
    e.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
    e.add_argument("--out", help="JSON with per-sample results (default: beside the checkpoint)")
    e.add_argument("--json", action="store_true", help="also print the summary as JSON (per-sample lists only in the file)")
    e.set_defaults(func=_wrap(_evaluate))


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry (``torchrun ... -m pde.cli_train train darcy``)."""
    parser = argparse.ArgumentParser(prog="python -m pde.cli_train")
    subs = parser.add_subparsers(dest="command", metavar="{train,evaluate}", required=True)
    add_parser(subs)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
