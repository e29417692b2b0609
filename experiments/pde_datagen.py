"""Benchmark: steady-state PDE data generation on the GPU (issue 4).

Measures, in one run on one device:
  * Darcy 421x421: samples/s of the batched FFT-preconditioned CG (1024 samples, GRF + solve),
    against scipy.sparse.linalg.spsolve on the CPU for a few of the same coefficients, and the
    end-to-end generation of the paper's darcy-85 files (1024 train + 500 test, solved at 421);
  * steady Navier-Stokes at 64x64 and 128x128, viscosity 0.01 and 0.001: samples/s of
    Newton-Krylov with Newton and Krylov iteration counts, and the projected (or, with
    --generate-ns, measured) time of the 5000-sample paper sets;
  * Newton-Krylov against plain time stepping (Crank-Nicolson/Heun, the route of the paper's
    data) to the same steady residual on the same forcings.

Writes experiments/results/pde_datagen.json (+ .png), rewritten after every section so a run
cut short still leaves its numbers. ``--small`` runs everything at toy sizes on the CPU.

    python experiments/pde_datagen.py            # GPU, full sizes
    python experiments/pde_datagen.py --small    # CPU smoke run
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from implicit.distributed import resolve_device
from implicit.results import save_figure_atomic
from pde import darcy, navier_stokes as ns
from pde.datasets import generate_split, load_recipe

try:
    from implicit.results import target, write_results
except ImportError:  # pragma: no cover - older checkouts
    target = write_results = None

NAME = "pde_datagen"


class OutOfBudget(Exception):
    """Raised from a chunk callback once the run's time budget is spent (the file stays resumable)."""


class Budget:
    """Wall-clock budget of the whole run (``None``: unlimited)."""

    def __init__(self, seconds: float | None):
        self.t0, self.seconds = time.perf_counter(), seconds

    def left(self) -> float:
        return math.inf if self.seconds is None else self.seconds - (time.perf_counter() - self.t0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


# ------------------------------------------------------------------------------------------ Darcy

def bench_darcy(cfg: dict, device: torch.device, data_dir: Path) -> dict:
    s, n, batch = cfg["darcy_resolution"], cfg["darcy_samples"], cfg["darcy_batch"]
    p = darcy.check_params({**darcy.DEFAULTS, "fine_resolution": s, "subsample": 1})
    gen = torch.Generator(device=device).manual_seed(0)
    darcy.generate_chunk(p, 2, gen, device)  # warm-up (cuFFT plans, kernels)

    def run():
        res, its, kept = [], [], []
        for i in range(0, n, batch):
            out = darcy.generate_chunk(p, min(batch, n - i), gen, device)
            res.append(out["stats"]["residual"])
            its.append(out["stats"]["iterations"])
            if i == 0:
                kept = out["fields"]["coefficient"][: cfg["scipy_samples"]], out["fields"]["solution"][: cfg["scipy_samples"]]
        return torch.cat(res), torch.cat(its), kept

    (res, its, (a_ref, u_ref)), t_batched = timed(run, device)
    # scipy on the CPU, same coefficients, same discretisation
    import scipy.sparse.linalg as sla

    t_sp, errs = 0.0, []
    for k in range(a_ref.shape[0]):
        t0 = time.perf_counter()
        A = darcy.assemble_matrix(a_ref[k].cpu())
        u = sla.spsolve(A.tocsc(), np.ones(A.shape[0]))
        t_sp += time.perf_counter() - t0
        ref = u_ref[k, 1:-1, 1:-1].reshape(-1).double().cpu().numpy()
        errs.append(float(np.abs(ref - u).max() / np.abs(u).max()))
    m = {
        "resolution": s, "samples": n, "batch": batch,
        "batched_seconds": t_batched, "batched_samples_per_s": n / t_batched,
        "scipy_samples": int(a_ref.shape[0]), "scipy_seconds_per_sample": t_sp / a_ref.shape[0],
        "scipy_samples_per_s": a_ref.shape[0] / t_sp,
        "speedup_vs_scipy": (n / t_batched) / (a_ref.shape[0] / t_sp),
        "pcg_iterations_mean": float(its.double().mean()), "pcg_iterations_max": int(its.max()),
        "rel_residual_max": float(res.max()), "converged": int((res <= p["tol"]).sum()),
        "max_rel_diff_vs_spsolve": max(errs),
    }
    if cfg.get("darcy_recipe"):
        recipe = load_recipe(cfg["darcy_recipe"])
        gen_times = {}
        for split in recipe["splits"]:
            (out, t) = timed(lambda: generate_split(recipe, split, data_dir, device=device, progress=False,
                                                    overwrite=True), device)
            gen_times[split] = {"seconds": t, "samples": out["n_samples"], "rejected": out["n_rejected"]}
        m["generate_" + recipe["name"]] = gen_times
    return m


# ----------------------------------------------------------------------------------- Navier-Stokes

def ns_params(nu: float, n: int) -> dict:
    name = "ns-nu0.01" if nu >= 0.005 else "ns-nu0.001"
    p = dict(load_recipe(name)["navier_stokes"])
    p["resolution"] = n
    return p


def bench_ns(cfg: dict, device: torch.device) -> dict:
    out = {}
    for nu in cfg["viscosities"]:
        for n in cfg["ns_resolutions"]:
            p = ns_params(nu, n)
            B = cfg["ns_batch"]
            ns.generate_chunk(p, 2, torch.Generator(device=device).manual_seed(1), device)  # warm-up
            r, t = timed(lambda: ns.generate_chunk(p, B, torch.Generator(device=device).manual_seed(0), device), device)
            st, acc = r["stats"], r["accepted"]
            n_acc = int(acc.sum())
            rate = n_acc / t
            out[f"nu{nu:g}_n{n}"] = {
                "viscosity": nu, "resolution": n, "batch": B, "seconds": t,
                "accepted": n_acc, "rejected": B - n_acc, "samples_per_s": rate,
                "projected_seconds_5000": 5000 / rate if rate > 0 else float("inf"),
                "newton_iterations_mean": float(st["newton_iterations"].double().mean()),
                "newton_iterations_max": int(st["newton_iterations"].max()),
                "krylov_iterations_mean": float(st["krylov_iterations"].double().mean()),
                "krylov_iterations_max": int(st["krylov_iterations"].max()),
                "continuation_used": int(st["continuation"].sum()),
                "rel_residual_max_accepted": float(st["residual"][acc].max()) if n_acc else None,
            }
            print(f"NS nu={nu:g} n={n}: {B} samples in {t:.2f} s, {B - n_acc} rejected, "
                  f"newton {out[f'nu{nu:g}_n{n}']['newton_iterations_mean']:.1f}, "
                  f"krylov {out[f'nu{nu:g}_n{n}']['krylov_iterations_mean']:.0f}", flush=True)
    return out


def compare_time_stepping(cfg: dict, device: torch.device, budget: Budget | None = None) -> dict:
    """Newton-Krylov vs time stepping to the same residual on the same forcings."""
    out = {}
    budget = budget or Budget(None)
    for i, nu in enumerate(cfg["viscosities"]):
        # leave each remaining viscosity its share of the budget (time stepping is capped by it)
        share = budget.left() / (len(cfg["viscosities"]) - i)
        if share < 5.0:
            out[f"nu{nu:g}"] = {"viscosity": nu, "skipped": "out of time budget"}
            continue
        ts_cap = min(cfg["ts_max_seconds"], 0.8 * share)
        ts_deadline = time.perf_counter() + ts_cap  # shared by the CFL retries
        n, B = cfg["compare_resolution"], cfg["compare_batch"]
        p = ns_params(nu, n)
        dtype = getattr(torch, p["dtype"])
        grid = ns.SpectralGrid(n, device, dtype)
        gen = torch.Generator(device=device).manual_seed(2)
        _, _, f = ns.sample_forcing(B, grid, kolmogorov_amplitude=p["kolmogorov_amplitude"],
                                    perturbation_amplitude=p["perturbation_amplitude"],
                                    peak_wavenumber=p["peak_wavenumber"], generator=gen)
        ns.solve_steady(f[:1], nu, max_iter=1)  # warm-up
        sol, t_nk = timed(lambda: ns.solve_steady(f, nu, tol=p["tol"], krylov_dim=p["krylov_dim"],
                                                  krylov_max_iter=p["krylov_max_iter"]), device)
        tol = p["tol"]  # the acceptance residual of the data sets (1e-6); Newton's own run goes further
        # velocity scale from the steady state: dt at advective CFL 0.25 (Crank-Nicolson takes the viscous part)
        psi = torch.fft.irfft2(torch.fft.rfft2(sol.w) * grid.inv_k2, s=(n, n))
        u = torch.fft.irfft2(grid.dy * torch.fft.rfft2(psi), s=(n, n))
        v = torch.fft.irfft2(-grid.dx * torch.fft.rfft2(psi), s=(n, n))
        umax = float((u**2 + v**2).sqrt().max())
        for cfl in (cfg["cfl"], cfg["cfl"] / 2, cfg["cfl"] / 4):  # the largest advective CFL number that is stable
            dt = cfl / n / umax
            (wt, rel_t, steps), t_ts = timed(lambda: ns.integrate_to_steady(
                f, nu, dt, tol=tol, max_seconds=max(ts_deadline - time.perf_counter(), 1.0), check_every=20), device)
            if bool(torch.isfinite(rel_t).all()):
                break
        reached = bool((rel_t <= tol).all())
        slowest = 1.0 / (nu * (2 * math.pi) ** 2)
        out[f"nu{nu:g}"] = {
            "viscosity": nu, "resolution": n, "batch": B, "tol": tol, "time_stepping_cap_seconds": ts_cap,
            "newton_krylov_seconds": t_nk, "newton_converged": int(sol.converged.sum()),
            "time_stepping_seconds": t_ts, "time_steps": steps, "dt": dt, "cfl": cfl, "simulated_time": steps * dt,
            "time_stepping_reached_tol": reached, "time_stepping_rel_residual_max": float(rel_t.max()),
            "slowest_viscous_decay_time": slowest,
            "speedup": t_ts / t_nk,
            "speedup_is_lower_bound": not reached,
            "max_abs_diff_of_solutions": float((wt - sol.w).abs().max()) if reached else None,
        }
        print(f"compare nu={nu:g}: Newton-Krylov {t_nk:.2f} s, time stepping {t_ts:.2f} s ({steps} steps, "
              f"{'reached' if reached else 'did NOT reach'} {tol:.1e}), speedup {t_ts / t_nk:.1f}x", flush=True)
    return out


def generate_ns_sets(cfg: dict, device: torch.device, data_dir: Path, budget: Budget | None = None,
                     on_update=None) -> dict:
    """Generate the paper-size NS sets; past the budget, stop after the current chunk (partial, resumable)."""
    import h5py

    from pde.datasets import split_path

    budget = budget or Budget(None)
    out = {}
    for name in cfg["ns_recipes"]:
        recipe = load_recipe(name)
        entry = out[name] = {"seconds": 0.0, "samples": 0, "rejected": 0, "partial": False}
        raw: dict = {}
        for split in recipe["splits"]:
            if budget.left() <= 0:
                entry["partial"] = True
                break
            done = {"n": 0}

            def on_chunk(c, n_samples):
                done["n"] = n_samples
                if budget.left() <= 0:
                    raise OutOfBudget

            sync(device)
            t0 = time.perf_counter()
            try:
                r = generate_split(recipe, split, data_dir, device=device, progress=False, overwrite=True,
                                   on_chunk=on_chunk)
                n_split, rej = r["n_samples"], r["n_rejected"]
                path = Path(r["path"])
            except OutOfBudget:
                n_split, rej, entry["partial"] = done["n"], None, True
                path = split_path(recipe, split, data_dir)
                path = path.with_name(path.name + ".tmp")
            sync(device)
            entry["seconds"] += time.perf_counter() - t0
            entry["samples"] += n_split
            if rej is not None:
                entry["rejected"] += rej
            try:
                with h5py.File(path, "r") as fh:
                    if rej is None:
                        entry["rejected"] += int(fh.attrs["n_rejected"])
                    for key in ("newton_iterations", "krylov_iterations", "continuation"):
                        vals = np.asarray(fh[key][:n_split], dtype=np.float64)
                        raw.setdefault(key, []).append(vals)
            except (OSError, KeyError):
                pass
            for key, parts in raw.items():
                vals = np.concatenate(parts)
                if vals.size:
                    entry[key] = {"mean": float(vals.mean()), "max": float(vals.max()),
                                  **({"count": int(vals.sum())} if key == "continuation" else {})}
            if on_update is not None:
                on_update(out)
        print(f"generated {name}: {entry['samples']} samples in {entry['seconds']:.1f} s "
              f"({entry['rejected']} draws rejected{', PARTIAL: out of time budget' if entry['partial'] else ''})",
              flush=True)
        if on_update is not None:
            on_update(out)
    return out


# ------------------------------------------------------------------------------------------ output

def targets_of(cfg: dict, m: dict) -> dict:
    t = {}
    d = m.get("darcy")
    if d:
        # 1024-sample Darcy 421 training set: measured directly on cfg["darcy_samples"] samples
        sec_1024 = d["batched_seconds"] * 1024 / d["samples"]
        t["darcy421_1024_samples_seconds"] = {**target(sec_1024, 15.0, "<="),
                                              "extrapolated": d["samples"] != 1024}
        t["darcy421_speedup_vs_scipy"] = target(d["speedup_vs_scipy"], 100.0, ">=")
    ns_b, gen = m.get("navier_stokes", {}), m.get("generated", {})
    for nu, name, goal in ((0.01, "ns-nu0.01", 120.0), (0.001, "ns-nu0.001", 600.0)):
        key = f"nu{nu:g}_n128"
        if name in gen and gen[name]["samples"]:
            sec, extra = gen[name]["seconds"] * 5000 / gen[name]["samples"], {"extrapolated": gen[name]["samples"] != 5000}
        elif key in ns_b:
            sec, extra = ns_b[key]["projected_seconds_5000"], {"extrapolated": True,
                                                               "from_batch": ns_b[key]["batch"]}
        elif name in gen:  # asked for, but the budget left no sample: a missed target
            t[f"ns128_{name}_5000_samples_seconds"] = {"value": None, "target": goal, "op": "<=", "met": False,
                                                      "skipped": "out of time budget"}
            continue
        else:
            continue
        t[f"ns128_{name}_5000_samples_seconds"] = {**target(sec, goal, "<="), **extra}
    for key, c in m.get("compare", {}).items():
        if "speedup" not in c:  # skipped for the time budget: a missed target, kept in the file
            t[f"newton_krylov_vs_time_stepping_speedup_{key}"] = {"value": None, "target": 10.0, "op": ">=",
                                                                  "met": False, "skipped": c.get("skipped")}
            continue
        t[f"newton_krylov_vs_time_stepping_speedup_{key}"] = {**target(c["speedup"], 10.0, ">="),
                                                              "lower_bound": c["speedup_is_lower_bound"]}
    return t


def plot(m: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    labels, vals = [], []
    if "darcy" in m:
        d = m["darcy"]
        labels += [f"Darcy {d['resolution']}\nbatched PCG", f"Darcy {d['resolution']}\nscipy spsolve"]
        vals += [d["batched_samples_per_s"], d["scipy_samples_per_s"]]
    for k, v in m.get("navier_stokes", {}).items():
        labels.append(f"NS nu={v['viscosity']:g}\n{v['resolution']}x{v['resolution']}")
        vals.append(v["samples_per_s"])
    axes[0].bar(range(len(vals)), vals, color="tab:blue")
    axes[0].set_xticks(range(len(vals)), labels, fontsize=7)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("samples / s")
    axes[0].set_title("data generation throughput")
    comp = {k: c for k, c in m.get("compare", {}).items() if "speedup" in c}
    for i, (k, c) in enumerate(comp.items()):
        axes[1].bar([3 * i, 3 * i + 1], [c["newton_krylov_seconds"], c["time_stepping_seconds"]],
                    color=["tab:green", "tab:red"])
        axes[1].text(3 * i + 0.5, c["time_stepping_seconds"], f"{c['speedup']:.0f}x" +
                     ("+" if c["speedup_is_lower_bound"] else ""), ha="center", va="bottom")
    axes[1].set_xticks([3 * i + 0.5 for i in range(len(comp))],
                       [f"nu={c['viscosity']:g}, {c['batch']} forcings" for c in comp.values()])
    axes[1].set_yscale("log")
    axes[1].set_ylabel("seconds to the same steady residual")
    axes[1].set_title("Newton-Krylov (green) vs time stepping (red)")
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=90)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="toy sizes for a CPU smoke run")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--data-dir", default=None, help="where generated files go (default: a temporary folder)")
    ap.add_argument("--generate-ns", action="store_true",
                    help="also generate the 5000-sample ns-nu0.01 and ns-nu0.001 sets and time them")
    ap.add_argument("--skip", action="append", default=[], choices=["darcy", "ns", "compare"])
    ap.add_argument("--budget-seconds", type=float, default=None,
                    help="wall-clock budget of the whole run: time stepping is capped to fit, sections that "
                         "cannot start are skipped, NS generation stops after the chunk that crosses it "
                         "(partial counts are written, files stay resumable)")
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    if args.small:
        cfg = dict(darcy_resolution=65, darcy_samples=32, darcy_batch=16, scipy_samples=3, darcy_recipe="darcy-tiny",
                   viscosities=[0.01, 0.001], ns_resolutions=[24, 32], ns_batch=2,
                   compare_resolution=32, compare_batch=2, cfl=0.5, ts_max_seconds=30.0, ns_recipes=["ns-tiny"],
                   compare_budget_share=0.4)
    else:
        cfg = dict(darcy_resolution=421, darcy_samples=1024, darcy_batch=128, scipy_samples=3, darcy_recipe="darcy-85",
                   viscosities=[0.01, 0.001], ns_resolutions=[64, 128], ns_batch=500,
                   compare_resolution=128, compare_batch=64, cfl=0.5, ts_max_seconds=90.0,
                   ns_recipes=["ns-nu0.01", "ns-nu0.001"], compare_budget_share=0.3)
    cfg.update(small=args.small, device=str(device), generate_ns=args.generate_ns)
    tmp = tempfile.TemporaryDirectory() if args.data_dir is None else None
    data_dir = Path(args.data_dir or tmp.name)
    t_start = time.perf_counter()
    budget = Budget(args.budget_seconds)
    cfg["budget_seconds"] = args.budget_seconds
    metrics: dict = {}
    png = Path(args.out_dir) / f"{NAME}.png"

    def save():
        metrics["wall_clock_s"] = time.perf_counter() - t_start
        if write_results is None:
            raise RuntimeError("implicit.results.write_results is missing")
        path = write_results(NAME, config=cfg, metrics=metrics, targets=targets_of(cfg, metrics), device=device,
                             wall_clock_s=metrics["wall_clock_s"], out_dir=args.out_dir)
        plot(metrics, png)
        return path

    if "darcy" not in args.skip:
        metrics["darcy"] = bench_darcy(cfg, device, data_dir)
        d = metrics["darcy"]
        print(f"Darcy {d['resolution']}: {d['samples']} samples in {d['batched_seconds']:.2f} s "
              f"({d['batched_samples_per_s']:.1f}/s), scipy {d['scipy_seconds_per_sample']:.2f} s/sample, "
              f"speedup {d['speedup_vs_scipy']:.0f}x, PCG its {d['pcg_iterations_mean']:.1f}", flush=True)
        save()
    if "ns" not in args.skip:
        metrics["navier_stokes"] = bench_ns(cfg, device)
        save()
    if "compare" not in args.skip:
        # keep most of the budget for generation when it is asked for
        share = Budget(None if args.budget_seconds is None else
                       budget.left() * (cfg["compare_budget_share"] if args.generate_ns else 1.0))
        metrics["compare"] = compare_time_stepping(cfg, device, share)
        save()
    if args.generate_ns:
        def on_update(gen):
            metrics["generated"] = gen
            save()

        metrics["generated"] = generate_ns_sets(cfg, device, data_dir, budget, on_update)
    path = save()
    print(f"wrote {path} and {png}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
