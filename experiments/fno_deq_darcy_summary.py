"""Darcy with the current configs: FNO, FNO++, IFNO and FNO-DEQ over seeds, clean and noisy, from the runs'
results files (``fno_deq_darcy_paper_match_*.json`` at ``--epochs``; written by fno_deq_darcy_variants.py).

Writes fno_deq_darcy_paper_match_summary.json (test relative L2 per training setting and model: each
seed's value, mean and std, and FNO-DEQ's ratios to the baselines) and a PNG beside it: bars of the means
with each seed as a dot, and the test-error curves of the first seed. CPU, seconds:

    python experiments/fno_deq_darcy_summary.py [--results experiments/results] [--epochs 64]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]
from implicit.results import save_figure_atomic  # noqa: E402

PREFIX = "fno_deq_darcy_paper_match_"
# run name -> label; the Darcy configs' current settings only (the "-paper" suffix: pointwise normaliser, no
# spectral bias; FNO-DEQ with the exact gradient). FNO runs that kept the spectral bias count as "-pointwise".
MODELS = {"fno-d4-paper": "FNO d4", "fno-d4-pointwise": "FNO d4 (spectral bias)", "fno++-paper": "FNO++ d4",
          "ifno-paper": "IFNO", "ift-paper": "FNO-DEQ"}
SETTINGS = ("clean", "input noise", "target noise")
DEQ, BASELINES = "ift-paper", ("fno++-paper", "fno-d4-paper", "fno-d4-pointwise", "ifno-paper")


def collect(results: Path, epochs: int) -> dict:
    """``{setting: {run name: {seed: (file name, run record)}}}`` from the results files at ``epochs``.
    A run recorded twice for one seed and setting is an error (the files would disagree on which counts)."""
    table: dict = {s: {} for s in SETTINGS}
    for path in sorted(results.glob(f"{PREFIX}*.json")):
        if path.name.startswith(f"{PREFIX}summary"):
            continue
        data = json.loads(path.read_text())
        config = data["config"]
        if config.get("epochs") != epochs or config.get("small"):
            continue
        noise = config.get("noise")
        setting = f"{noise['noise_on']} noise" if isinstance(noise, dict) else "clean"
        for name, run in data["metrics"]["runs"].items():
            if name == "fno-d4-paper" and "fno_d4_note" in config:  # ran with the bias: the code ignored the flag
                name = "fno-d4-pointwise"
            if name not in MODELS:
                continue
            seeds = table[setting].setdefault(name, {})
            if config["seed"] in seeds:
                raise ValueError(f"{name}, seed {config['seed']}, {setting}: in both {seeds[config['seed']][0]} "
                                 f"and {path.name}")
            seeds[config["seed"]] = (path.name, run)
    return table


def summarise(table: dict) -> dict:
    """Per setting and model: seeds, values, mean, std (sample; None for one seed), parameters, the largest
    peak training memory over seeds and, where recorded, the test solve's relative residual per seed;
    FNO-DEQ's ratios to each baseline, of the means and per seed where both ran. (Epoch times are left out:
    most runs shared the GPU, so they are not comparable.)"""
    out: dict = {}
    for setting, models in table.items():
        rows = {}
        for name, seeds in sorted(models.items(), key=lambda item: list(MODELS).index(item[0])):
            runs = {s: seeds[s][1] for s in sorted(seeds)}
            values = [r["test_rel_l2"] for r in runs.values()]
            rows[name] = {"label": MODELS[name], "seeds": sorted(seeds), "test_rel_l2": values,
                          "mean": statistics.fmean(values),
                          "std": statistics.stdev(values) if len(values) > 1 else None,
                          "files": sorted({seeds[s][0] for s in seeds}),
                          "parameters": runs[min(runs)].get("parameters"),
                          "peak_memory_bytes_max": max((r.get("peak_memory_bytes") or 0 for r in runs.values()),
                                                       default=0) or None}
            # the last test solve's relative residual (FNO-DEQ) or last unrolled step (IFNO), where a run recorded it
            residuals = {s: r.get("test_solver_rel_residual") for s, r in runs.items()}
            if any(r is not None for r in residuals.values()):
                rows[name]["test_solver_rel_residual"] = residuals
        for b in BASELINES:
            if DEQ in rows and b in rows:
                deq, base = models[DEQ], models[b]
                rows[DEQ][f"ratio_of_means_to_{b}"] = rows[DEQ]["mean"] / rows[b]["mean"]
                rows[DEQ][f"ratio_per_seed_to_{b}"] = {s: deq[s][1]["test_rel_l2"] / base[s][1]["test_rel_l2"]
                                                       for s in sorted(deq) if s in base}
        if rows:
            out[setting] = rows
    return out


def plot(table: dict, summary: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bars, curves) = plt.subplots(1, 2, figsize=(13, 4.2))
    settings = list(summary)
    names = [n for n in MODELS if any(n in summary[s] for s in settings)]
    w = 0.8 / len(names)
    for i, name in enumerate(names):
        xs = [j + i * w for j, s in enumerate(settings) if name in summary[s]]
        rows = [summary[s][name] for s in settings if name in summary[s]]
        bars.bar(xs, [r["mean"] for r in rows], width=w, label=MODELS[name], color=f"C{i}", alpha=0.7)
        for x, r in zip(xs, rows):
            bars.plot([x] * len(r["test_rel_l2"]), r["test_rel_l2"], "k.", ms=4)
    bars.set_xticks([j + 0.4 - w / 2 for j in range(len(settings))], settings)
    bars.set_ylabel("test relative L2 (bars: mean; dots: seeds)")
    bars.set_title("Darcy 85x85, current configs")
    bars.legend(fontsize=8)
    for j, setting in enumerate(settings):
        for i, name in enumerate(names):
            seeds = table[setting].get(name, {})
            curve = seeds[min(seeds)][1].get("test_rel_l2_curve") if seeds else None
            if curve:
                ep, v = zip(*curve)
                curves.plot(ep, v, ["-", "--", ":"][j % 3], color=f"C{i}", label=f"{MODELS[name]}, {setting}")
    curves.set_xlabel("epoch")
    curves.set_ylabel("test relative L2 (first seed)")
    curves.set_yscale("log")
    curves.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return save_figure_atomic(fig, path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("--results", default=str(ROOT / "experiments" / "results"), help="folder of the results files")
    p.add_argument("--epochs", type=int, default=64, help="the runs' length, in their files' names (default 64)")
    p.add_argument("--out", help="folder for the summary and PNG (default: --results)")
    args = p.parse_args(argv)
    from implicit.results import write_results

    results = Path(args.results)
    if not results.is_dir():
        p.error(f"--results: no folder {results}")
    table = collect(results, args.epochs)
    summary = summarise(table)
    if not summary:
        p.error(f"no {PREFIX}*.json results at {args.epochs} epochs in {results}")
    out = Path(args.out or results)
    out.mkdir(parents=True, exist_ok=True)
    png = plot(table, summary, out / f"{PREFIX}summary.png")
    config = {"epochs": args.epochs, "source": f"{PREFIX}*.json in {results.name}", "models": MODELS}
    path = write_results(f"{PREFIX}summary", config=config, metrics=summary, device="cpu", out_dir=out)
    for setting, rows in summary.items():
        print(setting + ": " + ", ".join(
            f"{r['label']} {r['mean']:.4f}" + (f" ± {r['std']:.4f}" if r["std"] is not None else "")
            + f" (seeds {r['seeds']})" for r in rows.values()))
    print(f"wrote {path} and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
