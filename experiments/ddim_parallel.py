"""DEQ-DDIM vs sequential DDIM on one GPU (writes experiments/results/ddim_parallel.json/.png).

In one process:
1. Sampling latency, batch 1, with a diffusers ``UNet2DModel`` of DDPM CIFAR-10 size
   (about 35.7M parameters, 3x32x32) with RANDOM weights (timing only), default
   ``DDIMScheduler`` config, at T in {50, 100, 250, 1000}: diffusers' own loop
   (``scheduler.step``), our CUDA-graph sequential sampler, DEQ-DDIM (Anderson on the
   anchored trajectory, CUDA-graphed loop) and the ParaDiGMS-style sliding window (Picard).
   Reports seconds, max abs error to our sequential sample, rounds, model evaluations.
   Throughput (images/s) at batch 16 for sequential-graph vs DEQ-DDIM.
2. Error and rounds on a trained teacher (a small UNet trained here on digits 32x32 for
   ``--teacher-steps`` steps, or ``--teacher PATH``), where the parallel answer must match.
3. Inversion on teacher samples: DEQ inversion (JFB gradients through the fixed point,
   warm-started solves) vs backprop through the sequential chain with checkpointing;
   time for each to reach the same reconstruction MSE.

A configuration whose projected time would overrun ``--budget-s`` is skipped and
listed under ``metrics.skipped``.

    python experiments/ddim_parallel.py            # GPU, about 4-5 minutes on an H100
    python experiments/ddim_parallel.py --small    # a quick CPU check
"""

from __future__ import annotations

import argparse
import time

import torch

from implicit.bench._timing import timed
from implicit.diffusion import UNetEps, ddim, deq_ddim, invert
from implicit.diffusion.schedule import DDIMSchedule
from implicit.diffusion.train import TrainConfig, make_unet, train_teacher
from implicit.results import target, write_results


def diffusers_loop(unet, scheduler, x_T, K):
    scheduler.set_timesteps(K)
    x = x_T
    for t in scheduler.timesteps:
        x = scheduler.step(unet(x, t).sample, t, x).prev_sample
    return x


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true")
    p.add_argument("--device", default=None)
    p.add_argument("--budget-s", type=float, default=270.0, help="skip configurations that would overrun this")
    p.add_argument("--teacher", default=None, help="a local diffusers folder; default: train one here")
    p.add_argument("--teacher-steps", type=int, default=1500)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--tol", type=float, default=1e-3, help="relative tolerance of the parallel solves")
    p.add_argument("--out", default="experiments/results")
    a = p.parse_args(argv)
    dev = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    t_start = time.perf_counter()
    left = lambda: a.budget_s - (time.perf_counter() - t_start)  # noqa: E731
    from diffusers import DDIMScheduler

    Ts = (10, 20) if a.small else (50, 100, 250, 1000)
    size, res, ch = ("tiny", 8, 3) if a.small else ("cifar", 32, 3)
    torch.manual_seed(0)
    unet = make_unet(size, res, ch).to(dev).eval().requires_grad_(False)
    n_params = sum(q.numel() for q in unet.parameters())
    scheduler = DDIMScheduler()
    schedule = DDIMSchedule.from_config(scheduler)
    eps = UNetEps(unet)
    metrics, skipped = {"latency": {}, "throughput": {}, "teacher": {}, "inversion": {}}, []
    opts = dict(tol=a.tol, backward=None, graph=dev.type == "cuda")
    if opts["graph"]:  # CUDA graphs need a capturable UNet forward; fall back (and say so) if not
        try:
            with torch.no_grad():
                ddim(eps, torch.zeros(1, ch, res, res, device=dev), schedule, 2, graph=True)
        except RuntimeError as err:
            opts["graph"] = False
            metrics["graph_error"] = str(err)[:300]

    # 1. latency at batch 1 with random weights
    x_T = torch.randn(1, ch, res, res, generator=torch.Generator().manual_seed(0)).to(dev)
    step_s = None
    for T in Ts:
        row = {}
        with torch.no_grad():
            est = (step_s or 0.02) * T * 1.5
            if est < left():
                s, _ = timed(lambda: diffusers_loop(unet, scheduler, x_T, T), dev, repeats=1, warmup=1 if T <= 100 else 0)
                row["diffusers_s"] = s
                step_s = s / T
            else:
                skipped.append(f"diffusers loop T={T} (projected {est:.0f} s)")
            s, seq = timed(lambda: ddim(eps, x_T, schedule, T, graph=opts["graph"]), dev, repeats=2)
            row["graph_sequential_s"] = s
            for name, kw in (("deq_anderson", dict(method="anderson", max_iter=min(2 * T, 100))),
                             ("window_picard", dict(method="window", window=min(a.window, T), max_iter=T + 1))):
                if left() < 15:
                    skipped.append(f"{name} T={T} (budget)")
                    continue
                s, (x0, r) = timed(lambda: deq_ddim(eps, x_T, schedule, T, **kw, **opts), dev,
                                   repeats=1 if T >= 250 else 2)
                row[name] = {"s": s, "max_abs_err": float((x0 - seq).abs().max()), "rounds": int(r.n_iter.max()),
                             "model_evals": int(r.stats["step_evaluations"].max()),
                             "converged": bool(r.converged.all())}
        metrics["latency"][T] = row
        print(T, row, flush=True)

    # throughput at batch 16
    Tt = Ts[1]
    xb = torch.randn(16, ch, res, res, generator=torch.Generator().manual_seed(1)).to(dev)
    if left() > 30:
        with torch.no_grad():
            s_seq, seq16 = timed(lambda: ddim(eps, xb, schedule, Tt, graph=opts["graph"]), dev, repeats=2)
            s_deq, (x16, r16) = timed(lambda: deq_ddim(eps, xb, schedule, Tt, method="anderson", max_iter=100, **opts),
                                      dev, repeats=2)
        metrics["throughput"] = {"T": Tt, "batch": 16, "graph_sequential_img_s": 16 / s_seq,
                                 "deq_anderson_img_s": 16 / s_deq, "deq_rounds": int(r16.n_iter.max()),
                                 "deq_max_abs_err": float((x16 - seq16).abs().max())}
    else:
        skipped.append("throughput (budget)")

    # 2. trained teacher: error and rounds
    from implicit.diffusion import load_local

    if a.teacher is None:
        steps = 40 if a.small else a.teacher_steps
        cfg = TrainConfig(size="tiny" if a.small else "small", sample_size=8 if a.small else 32, steps=steps,
                          batch=64, lr=1e-3 if a.small else 4e-4, save_every=steps)
        folder = train_teacher("runs/ddim_parallel_teacher" + ("_small" if a.small else ""), cfg, device=dev,
                               progress=False)
    else:
        folder = a.teacher
    t_eps, t_sched, t_unet, _ = load_local(folder, device=dev)
    shape = t_eps.sample_shape
    xt = torch.randn(4, *shape, generator=torch.Generator().manual_seed(2)).to(dev)
    for T in Ts[:3]:
        if left() < 30:
            skipped.append(f"teacher T={T} (budget)")
            continue
        with torch.no_grad():
            ref = ddim(t_eps, xt, t_sched, T)
            row = {}
            for name, kw in (("deq_anderson", dict(method="anderson", max_iter=min(2 * T, 150))),
                             ("window_picard", dict(method="window", window=min(a.window, T)))):
                x0, r = deq_ddim(t_eps, xt, t_sched, T, tol=a.tol, backward=None, **kw)
                row[name] = {"max_abs_err": float((x0 - ref).abs().max()), "rounds": int(r.n_iter.max()),
                             "converged": bool(r.converged.all())}
        metrics["teacher"][T] = row
        print("teacher", T, row, flush=True)

    # 3. inversion on teacher samples
    T_inv = 10 if a.small else 50
    if left() > 40:
        with torch.no_grad():
            tgt = ddim(t_eps, torch.randn(2, *shape, generator=torch.Generator().manual_seed(3)).to(dev), t_sched, T_inv)
        iters = 10 if a.small else 60
        runs = {m: invert(t_eps, tgt, t_sched, T_inv, method=m, iters=iters, lr=0.05, tol=1e-3,
                          eval_every=2 if a.small else 5, **({"backward": "jfb"} if m == "deq" else {}))
                for m in ("deq", "backprop")}
        goal = max(min(e for _, e in r.history) for r in runs.values())  # an MSE both reach
        reach = {m: next(t for t, e in r.history if e <= goal) for m, r in runs.items()}
        metrics["inversion"] = {"T": T_inv, "iters": iters, "goal_mse": goal, "seconds_to_goal": reach,
                                "history": {m: r.history for m, r in runs.items()},
                                "speedup": reach["backprop"] / max(reach["deq"], 1e-9)}
    else:
        skipped.append("inversion (budget)")

    metrics["skipped"] = skipped
    Tmax = Ts[-1]
    lat = metrics["latency"].get(Tmax, {})
    targets = {}
    if "deq_anderson" in lat or "window_picard" in lat:
        best = min((lat[k] for k in ("deq_anderson", "window_picard") if k in lat), key=lambda v: v["s"])
        if "diffusers_s" in lat:
            targets[f"speedup_vs_diffusers_T{Tmax}"] = target(lat["diffusers_s"] / best["s"], 4.0, ">=")
        targets[f"speedup_vs_graph_sequential_T{Tmax}"] = target(lat["graph_sequential_s"] / best["s"], 1.5, ">=")
        targets[f"max_abs_error_T{Tmax}"] = target(best["max_abs_err"], 1e-3, "<=")
    if metrics["inversion"]:
        targets["inversion_speedup_to_equal_mse"] = target(metrics["inversion"]["speedup"], 5.0, ">=")
    config = {"unet_params": n_params, "unet_size": size, "weights": "random (timing); trained teacher for error",
              "teacher": str(folder), "Ts": list(Ts), "window": a.window, "tol": a.tol, "dtype": "float32",
              "scheduler": dict(scheduler.config), "small": a.small}
    path = write_results("ddim_parallel" + ("_small" if a.small else ""), config=config, metrics=metrics,
                         targets=targets, device=dev, wall_clock_s=time.perf_counter() - t_start, out_dir=a.out)
    _plot(metrics, path.with_suffix(".png"))
    print(path, targets)


def _plot(metrics, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    lat = metrics["latency"]
    Ts = sorted(lat)
    for key, label in (("diffusers_s", "diffusers loop"), ("graph_sequential_s", "CUDA-graph sequential")):
        pts = [(T, lat[T][key]) for T in Ts if key in lat[T]]
        if pts:
            ax1.plot(*zip(*pts), marker="o", label=label)
    for key, label in (("deq_anderson", "DEQ-DDIM (Anderson)"), ("window_picard", "sliding window (Picard)")):
        pts = [(T, lat[T][key]["s"]) for T in Ts if key in lat[T]]
        if pts:
            ax1.plot(*zip(*pts), marker="s", label=label)
    ax1.set_xscale("log")
    ax1.set_yscale("log")
    ax1.set_xlabel("DDIM steps T")
    ax1.set_ylabel("batch-1 latency (s)")
    ax1.legend(fontsize=8)
    inv = metrics.get("inversion") or {}
    for m, hist in inv.get("history", {}).items():
        t, e = zip(*hist)
        ax2.plot(t, e, marker=".", label=m)
    ax2.set_xlabel("wall-clock (s)")
    ax2.set_ylabel("reconstruction MSE")
    ax2.set_yscale("log")
    if inv:
        ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
