"""GET vs a 5x larger ViT vs a plain one-step student, distilled from one of the package's own teachers.

Pipeline (one process, every stage reused when its output already exists):
1. teacher: the package's diffusers UNet2DModel trained at 32x32 (DDPM objective,
   :func:`implicit.diffusion.train.train_teacher`) on ``--data``: scikit-learn digits (default), or the
   package's own Darcy solutions (``darcy``, the darcy-85 recipe) or steady Navier-Stokes vorticities
   (``ns``, the ns-nu0.01 recipe), generated first; or ``--teacher``;
2. pairs: x_T and the teacher's 100-step DDIM image (HDF5, :func:`implicit.get.pairs.write_pairs`);
3. three students at exactly equal training steps (no wall-clock cap): GET (6 plain fixed-point
   iterations, trained as the paper does: unrolled through the 6 iterations with a loss on every
   decoded iterate, the injection added to every equilibrium block), a ViT with ~5x GET's
   parameters, and a plain ViT of GET's width with about its parameters;
4. evaluation on held-out noise: FD-own (Frechet distance in the features of a CNN the package
   trains itself: on the digit classes, or for PDE fields on their own k-means clusters; not FID), precision/recall, nearest-neighbour ratio, MSE to the teacher,
   samples/s, params, FLOPs; GET also evaluated with Anderson to a tolerance instead of 6 iterations;
   the teacher's own 100-step sampling speed for the speed-up target, timed at the same batch
   (``speed_batch``) and precision as the students (float32, and bfloat16 autocast for both).

Writes experiments/results/get_distill.json (+ .png), or get_distill_darcy / get_distill_ns. ``--small``
runs everything at toy size on the CPU. In commands of at most ten minutes, with the students training
side by side on one GPU (every stage resumes from its files in ``--work``)::

    python experiments/get_distill.py --work W --stop-after pairs
    for s in get vit_5x vit_plain; do
        python experiments/get_distill.py --work W --students $s --stop-after train --train-seconds 540 &
    done; wait                                   # repeat until every student reaches --steps
    python experiments/get_distill.py --work W   # evaluate and write the results
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
import warnings
from pathlib import Path

import torch
from torch import Tensor

from implicit.bench._timing import timed
from implicit.distributed import resolve_device
from implicit.get.evaluate import (cluster_labels, digits_images, evaluate_generator, generate, tile_batch,
                                   train_feature_net)
from implicit.get.model import build_model
from implicit.get.pairs import load_pairs, teacher_sampler, write_pairs
from implicit.get.train import TrainConfig, load_generator, train
from implicit.results import save_figure_atomic, target, write_results
from implicit.solvers import NonConvergenceWarning

FULL = dict(teacher_size="small", teacher_steps=3000, teacher_batch=128, teacher_lr=4e-4, n_pairs=40000, holdout=2000,
            pair_batch=2000, ddim_steps=100, steps=12000, batch=256, lr=3e-4, dim=192, big_dim=384, big_depth=5,
            feat_epochs=20, speed_batch=1024, amp_speed=True)
SMALL = dict(teacher_size="tiny", teacher_steps=30, teacher_batch=32, teacher_lr=1e-3, n_pairs=256, holdout=64,
             pair_batch=64, ddim_steps=10, steps=40, batch=32, lr=1e-3, dim=32, big_dim=64, big_depth=5,
             feat_epochs=2, speed_batch=64, amp_speed=True)


DEFAULT_STUDENTS = ("get", "vit_5x", "vit_plain")
ROOT = Path(__file__).resolve().parents[1]
# PDE fields for the teacher: the paper-size recipes, and the tests' tiny ones for --small
PDE_RECIPES = {"darcy": ("darcy-85.toml", "darcy-tiny.toml"), "ns": ("ns-nu0.01.toml", "ns-tiny.toml")}


def training_images(data: str, work: Path, device: torch.device, small: bool) -> tuple[str, Tensor, Tensor, str]:
    """The teacher's data argument, the real images (N, 1, 32, 32) in [-1, 1], the feature net's labels,
    and a description of the FD-own feature space."""
    if data == "digits":
        real, labels = digits_images(32)
        return "digits", real, labels, "the package's own digit classifier CNN (all 1797 digits)"
    if data not in PDE_RECIPES:
        raise ValueError(f'--data must be "digits" or one of {sorted(PDE_RECIPES)}, got "{data}"')
    from implicit.diffusion.train import load_images
    from pde.datasets import generate_split

    recipe = ROOT / "data" / PDE_RECIPES[data][1 if small else 0]
    path = generate_split(recipe, "train", work / "data", device=device)["path"]
    real = load_images(path, 32)
    return path, real, cluster_labels(real, 10), (f"a CNN the package trains to tell apart 10 k-means clusters of "
                                                  f"the {len(real)} training fields ({recipe.name}, train split)")


# other GET designs a run may add with --students (same parameter budget): trained and evaluated
# like "get", reported beside it; the targets stay on "get"
GET_VARIANTS = {
    "get_deep": dict(inj_depth=1, eq_depth=3),  # one injection block, three weight-tied blocks
    "get_wide": dict(inj_depth=1, eq_mlp_ratio=8.0),  # one injection block, MLPs twice as wide in the two tied ones
}


def students(p: dict) -> dict[str, tuple[str, dict]]:
    """Every known student: (model kind, options). GET runs the paper's 6 plain iterations, in
    training unrolled with a loss on every iterate (fixed-point correction, weights 0.8**(5-k))."""
    base = dict(image_size=32, channels=1, patch=4)
    heads = max(2, p["dim"] // 64)
    get = dict(base, dim=p["dim"], heads=heads, inj_depth=2, eq_depth=2, solver="fixed", max_iter=6,
               injection="every", train_unroll=6, iterate_gamma=0.8)
    return {
        "get": ("get", get),
        "vit_5x": ("vit", dict(base, dim=p["big_dim"], heads=max(2, p["big_dim"] // 64), depth=p["big_depth"])),
        "vit_plain": ("vit", dict(base, dim=p["dim"], heads=heads, depth=4)),
        **{name: ("get", dict(get, **over)) for name, over in GET_VARIANTS.items()},
    }


def student_configs(p: dict, pairs: Path | str, work: Path, device: torch.device, small: bool = False,
                    names: list[str] | None = None) -> dict[str, TrainConfig]:
    """One :class:`TrainConfig` per student in ``names`` (default: get, vit_5x, vit_plain), identical
    but for the model: the same pairs, batch, learning-rate schedule and number of steps ``p["steps"]``
    (equal training steps, no time cap)."""
    known = students(p)
    names = names or list(DEFAULT_STUDENTS)
    unknown = set(names) - set(known)
    if unknown:
        raise ValueError(f"unknown students {sorted(unknown)}; known: {sorted(known)}")
    return {name: TrainConfig(pairs=str(pairs), out=str(work / name), model=kind, model_options=opts,
                              steps=p["steps"], batch_size=p["batch"], lr=p["lr"], warmup=min(200, p["steps"] // 10),
                              schedule="cosine", loss="pseudo_huber", ema_decay=0.999 if not small else 0.9,
                              ckpt_every=max(250, min(1000, p["steps"] // 4)), holdout=p["holdout"],
                              eval_every=max(1, p["steps"] // 24), device=str(device))
            for name, (kind, opts) in ((n, known[n]) for n in names)}


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="toy sizes; runs on the CPU in a few minutes")
    ap.add_argument("--data", default="digits", help="teacher data: digits, darcy or ns (generated by the package)")
    ap.add_argument("--teacher", help="existing teacher folder (diffusers unet/ + scheduler/); default: train one")
    ap.add_argument("--work", default="runs/get_distill", help="folder for the teacher, pairs and student runs")
    ap.add_argument("--out", default="experiments/results")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--steps", type=int, help="override the student training steps")
    ap.add_argument("--n-pairs", type=int, help="override the number of pairs (holdout included)")
    ap.add_argument("--students", default=",".join(DEFAULT_STUDENTS),
                    help=f"students to train and evaluate; get, vit_5x and vit_plain are always evaluated; "
                         f"GET variants: {', '.join(GET_VARIANTS)}")
    ap.add_argument("--stop-after", choices=("pairs", "train"),
                    help="stop once the pairs and feature net exist, or once --students are trained (no "
                         "evaluation): to train students in parallel processes on one GPU before one final run")
    ap.add_argument("--train-seconds", type=float,
                    help="with --stop-after train: stop each student after this long, checkpointed, to resume")
    args = ap.parse_args(argv)
    names = [n for n in args.students.split(",") if n]
    if args.stop_after != "train":
        names = list(DEFAULT_STUDENTS) + [n for n in names if n not in DEFAULT_STUDENTS]
    p = dict(SMALL if args.small else FULL)
    p["steps"] = args.steps or p["steps"]
    p["n_pairs"] = args.n_pairs or p["n_pairs"]
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    result_name = "get_distill" + ("" if args.data == "digits" else f"_{args.data}") + ("_small" if args.small else "")
    work = Path(args.work + ("" if args.data == "digits" else f"_{args.data}") + ("_small" if args.small else ""))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    stages: dict[str, float] = {}

    # 1. teacher (and its data)
    data_arg, real, labels, feature_space = training_images(args.data, work, device, args.small)
    if args.teacher:
        teacher = Path(args.teacher)
    else:  # trains, or resumes, or finds the finished teacher in the work folder
        from implicit.diffusion.train import TrainConfig as TeacherConfig, train_teacher

        tcfg = TeacherConfig(data=data_arg, size=p["teacher_size"], steps=p["teacher_steps"],
                             batch=p["teacher_batch"], lr=p["teacher_lr"], save_every=1000)
        done = work / "teacher" / "pipeline"
        teacher = done if (done / "unet").is_dir() else train_teacher(work / "teacher", tcfg, device=device)
    stages["teacher_s"] = time.perf_counter() - t0

    # 2. pairs
    t = time.perf_counter()
    fn, recipe = teacher_sampler(teacher, sampler="ddim", steps=p["ddim_steps"], device=device)
    pairs_path = write_pairs(work / "pairs.h5", fn, n=p["n_pairs"], shape=tuple(recipe["teacher_shape"]),
                             batch_size=p["pair_batch"], seed=0, recipe=recipe, device=device)
    data = load_pairs(pairs_path, holdout=p["holdout"])
    stages["pairs_s"] = time.perf_counter() - t
    test = data["test"]

    # 3. feature net for FD-own (trained on the real images)
    t = time.perf_counter()
    net, acc = train_feature_net(real, labels, epochs=p["feat_epochs"], device=device, cache=work / "featnet.pt")
    stages["feature_net_s"] = time.perf_counter() - t
    configs = student_configs(p, pairs_path, work, device, args.small, names)
    if args.stop_after == "pairs":
        return pairs_path
    if args.stop_after == "train":
        for name, cfg in configs.items():
            summary = train(cfg, data=data, max_seconds=args.train_seconds)
            print(f"{name}: step {summary['step']} of {p['steps']}")
        return Path(work)

    # 4. students at equal steps
    metrics: dict[str, dict] = {}
    runs = {}
    speed = dict(throughput_batch=p["speed_batch"], amp=p["amp_speed"])
    for name, cfg in configs.items():
        t = time.perf_counter()
        summary = train(cfg, data=data)
        if summary["step"] != p["steps"]:
            raise RuntimeError(f"{name} stopped at step {summary['step']} of {p['steps']}")
        runs[name] = cfg
        model = load_generator(cfg.out, device=device)
        metrics[name] = dict(evaluate_generator(model, test["noise"], test["image"], real, net, **speed),
                             train_steps=summary["step"], final_loss=summary["final_loss"], evals=summary["evals"],
                             train_s=summary["seconds"], steps_per_s=summary["step"] / summary["seconds"])
        stages[f"{name}_s"] = time.perf_counter() - t
    metrics["equal_train_steps"] = len({metrics[n]["train_steps"] for n in runs}) == 1

    # GET solved by Anderson to a tolerance instead of 6 plain iterations (same weights)
    state = load_generator(runs["get"].out, device=device).state_dict()
    kind, opts = students(p)["get"]
    for label, over in {"get_anderson_tol1e-3": dict(solver="anderson", tol=1e-3, max_iter=30),
                        "get_fixed_12": dict(solver="fixed", max_iter=12)}.items():
        alt = build_model(kind, **dict(opts, **over)).to(device)
        alt.load_state_dict(state)
        alt.eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NonConvergenceWarning)
            metrics[label] = evaluate_generator(alt, test["noise"], test["image"], real, net, **speed)

    # teacher: quality of its own held-out images and its sampling speed (100-step DDIM), timed at
    # the students' batch (float32 first; bfloat16 autocast after the results are on disk)
    from implicit.get.evaluate import features, frechet_distance, precision_recall

    xb = tile_batch(test["noise"], p["speed_batch"]).to(device)
    with torch.no_grad():
        teacher_s, _ = timed(lambda: fn(xb), device, repeats=2)
    f_t, f_r = features(net, test["image"]), features(net, real)
    pt, rt = precision_recall(f_r, f_t)
    metrics["teacher"] = {"fd_own_vs_data": frechet_distance(f_t, f_r), "precision": pt, "recall": rt,
                          "samples_per_s": len(xb) / teacher_s, "throughput_batch": len(xb),
                          "ddim_steps": p["ddim_steps"]}
    metrics["feature_net_accuracy"] = acc
    metrics["stages_s"] = stages
    config = {"params": p, "students": {k: dataclasses.asdict(c) for k, c in runs.items()},
              "teacher": str(teacher), "pairs_recipe": json.loads(data["attrs"]["recipe"]),
              "data": args.data,
              "fd_own": f"Frechet distance in the pooled features of {feature_space} (not FID); "
                        "vs_teacher uses held-out teacher images, vs_data the real images",
              "speed": f"samples/s of one batch of {p['speed_batch']} for every model and the teacher (its "
                       "CUDA-graph DDIM sampler); float32 and bfloat16 autocast; the speed-up target compares "
                       "GET and the teacher at the same batch and precision"}

    def finish() -> tuple[Path, dict]:
        g, v, tm = metrics["get"], metrics["vit_5x"], metrics["teacher"]
        speedups = {"float32": g["samples_per_s"] / tm["samples_per_s"]}
        if "samples_per_s_bf16" in g and "samples_per_s_bf16" in tm:
            speedups["bf16"] = g["samples_per_s_bf16"] / tm["samples_per_s_bf16"]
        precision = max(speedups, key=speedups.get)  # each entry compares like with like
        targets = {
            "get_params_over_vit_params": target(g["params"] / v["params"], 0.25, "<="),
            # "matches or beats": GET's FD-own to the teacher's samples within 10% of the ViT's, or lower
            "get_fd_own_over_vit_fd_own": target(g["fd_own_vs_teacher"] / v["fd_own_vs_teacher"], 1.1, "<="),
            "get_mse_over_vit_mse": target(g["mse_to_teacher"] / v["mse_to_teacher"], 1.1, "<="),
            f"get_speedup_over_{p['ddim_steps']}_step_teacher": target(speedups[precision], 50.0, ">="),
        }
        for name in runs:  # every GET design against the same ViT, beside the targets on "get"
            if name.startswith("get"):
                metrics[f"{name}_fd_own_over_vit_fd_own"] = metrics[name]["fd_own_vs_teacher"] / v["fd_own_vs_teacher"]
                metrics[f"{name}_mse_over_vit_mse"] = metrics[name]["mse_to_teacher"] / v["mse_to_teacher"]
        metrics["get_speedup_over_teacher"] = speedups[precision]
        metrics["get_speedup_over_teacher_by_precision"] = speedups
        metrics["get_speedup_precision"] = precision
        path = write_results(result_name, config=config, metrics=metrics,
                             targets=targets, device=device,
                             wall_clock_s=time.perf_counter() - t0, out_dir=args.out)
        return path, targets

    path, targets = finish()
    if p["amp_speed"] and device.type == "cuda":
        try:  # a fresh sampler: the cached CUDA graph of `fn` was captured in float32
            fn16, _ = teacher_sampler(teacher, sampler="ddim", steps=p["ddim_steps"], device=device)
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
                sec, _ = timed(lambda: fn16(xb), device, repeats=2)
            metrics["teacher"]["samples_per_s_bf16"] = len(xb) / sec
        except Exception as err:  # keep the float32 comparison, say why bf16 is missing
            metrics["teacher"]["bf16_error"] = repr(err)[:300]
        path, targets = finish()
    _plot(path.with_suffix(".png"), test, runs, metrics, device, p["ddim_steps"])
    _plot_curves(path.with_name(path.stem + "_curves.png"), runs, metrics)
    print(json.dumps({k: metrics[k] for k in ("get", "vit_5x", "vit_plain", "teacher")}, indent=1, default=float))
    print(json.dumps(targets, indent=1))
    return path


def _plot(path: Path, test: dict, runs: dict, metrics: dict, device: torch.device, steps: int) -> None:
    """Sample grids from the same held-out noise: teacher, GET, ViT-5x, plain ViT."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    noise = test["noise"][:36]
    panels = {f"teacher ({steps}-step DDIM)": test["image"][:36]}
    for name, cfg in runs.items():
        m = metrics[name]
        title = (f"{name}: {m['params'] / 1e6:.2f}M params\n"
                 f"FD-own {m['fd_own_vs_teacher']:.2f}, MSE {m['mse_to_teacher']:.3f}")
        panels[title] = generate(load_generator(cfg.out, device=device), noise)
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6))
    for ax, (title, imgs) in zip(axes, panels.items()):
        x = ((imgs.float().clamp(-1, 1) + 1) / 2)[:, 0]
        grid = x.view(6, 6, 32, 32).permute(0, 2, 1, 3).reshape(6 * 32, 6 * 32)
        ax.imshow(grid, cmap="gray", vmin=0, vmax=1)
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=110)


def _plot_curves(path: Path, runs: dict, metrics: dict) -> None:
    """Training loss (mean since the last evaluation) and the EMA model's held-out loss against step,
    one line pair per student: where a student starts to fit its pairs better than new noise."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, name in enumerate(runs):
        evals = metrics[name].get("evals") or []
        if not evals:
            continue
        steps = [e["step"] for e in evals]
        color = f"C{i}"
        ax.plot(steps, [e["train_loss"] for e in evals], color=color, ls="--", label=f"{name} train")
        ax.plot(steps, [e["loss"] for e in evals], color=color, label=f"{name} held-out (EMA)")
    ax.set_xlabel("training step")
    ax.set_ylabel("distillation loss")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=110)


if __name__ == "__main__":
    main()
