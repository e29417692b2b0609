"""Figures of the path-independence study, saved as PNGs beside the results file."""

from __future__ import annotations

from pathlib import Path

import torch

from ..results import save_figure_atomic


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    """Lay out ``fig``, write it atomically and close it."""
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=110)


def _model_colors(plt, evals: dict) -> dict:
    """A colour per model, distinct within its task (up to 20) and the same in every panel."""
    cmap, seen, colors = plt.get_cmap("tab20"), {}, {}
    for name, ev in evals.items():
        i = seen[ev["task"]] = seen.get(ev["task"], -1) + 1
        colors[name] = cmap((2 * i) % 20 + (2 * i) // 20 % 2)  # the dark shades first, then the light
    return colors


def _line_style(spec: dict) -> str:
    """Solid for models meant to be path independent, dotted for path dependent, dashed feed-forward."""
    if spec.get("kind") == "feedforward":
        return "--"
    return {"path_independent": "-o", "path_dependent": ":o"}.get(spec.get("role"), "-.o")


def plot_accuracy(evals: dict, path: Path) -> None:
    """Accuracy vs test-time iterations: one panel per task and test size, one line per model."""
    plt = _plt()
    panels = sorted({(ev["task"], int(s)) for ev in evals.values() for s in ev["accuracy"]})
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    legend_done = set()  # one legend per task, on its first panel: each task has its own models
    colors = _model_colors(plt, evals)
    for ax, (task, size) in zip(axes.flat, panels):
        for name, ev in evals.items():
            if ev["task"] != task:
                continue
            curve = ev["accuracy"][str(size)]
            ks = sorted(curve, key=int)
            ax.plot([int(k) for k in ks], [curve[k] for k in ks], _line_style(ev["spec"]), ms=3,
                    color=colors[name], label=name)
        if task not in legend_done:
            ax.legend(fontsize=6)
            legend_done.add(task)
        ax.set_xscale("log")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"{task}, size {size}")
        ax.set_xlabel("test-time iterations")
        ax.set_ylabel("exact accuracy")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    _save(fig, path)


def plot_aa_histogram(evals: dict, path: Path) -> None:
    """Per-sample AA scores of correct vs incorrect test answers, pooled over models, one panel per task."""
    plt = _plt()
    tasks = sorted({ev["task"] for ev in evals.values()})
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.2), squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        good, bad = [], []
        for ev in evals.values():
            if ev["task"] != task:
                continue
            for s in ev["per_sample"].values():
                for a, c in zip(s.get("aa", []), s["correct"]):
                    (good if c else bad).append(a)
        bins = torch.linspace(min(good + bad + [0.0]), 1.0, 31).tolist()
        for values, label in ((good, "correct"), (bad, "incorrect")):
            if values:  # an empty group has no density
                ax.hist(values, bins=bins, alpha=0.6, label=f"{label} ({len(values)})", density=True)
        ax.set_title(f"{task}: AA score per test input")
        ax.set_xlabel("asymptotic alignment")
        ax.legend(fontsize=7)
    _save(fig, path)


def plot_aa_scatter(metrics: dict, path: Path) -> None:
    """Model-level AA score vs accuracy on harder inputs, with the Spearman correlation."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.8))
    for task, marker in (("maze", "o"), ("prefix_sums", "s")):
        rows = {n: r for n, r in metrics["models"].items() if r["task"] == task and "aa_mean" in r}
        ax.scatter([r["aa_mean"] for r in rows.values()], [r["hard_accuracy"] for r in rows.values()],
                   marker=marker, label=task)
        for n, r in rows.items():
            ax.annotate(n, (r["aa_mean"], r["hard_accuracy"]), fontsize=5)
    ax.set_xlabel("mean AA score (test inputs)")
    ax.set_ylabel("accuracy on harder inputs")
    ax.set_title(f"Spearman rho = {metrics['aa_vs_hard_accuracy_spearman']:.2f} "
                 f"({metrics['n_fitted_models']} fitted models)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, path)


def plot_traces(evals: dict, path: Path) -> None:
    """Median relative residual per fixed-point iteration on the hardest test inputs, per model."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, ev in evals.items():
        if "trace_median" in ev:
            t = ev["trace_median"]
            ax.semilogy(range(1, len(t) + 1), t, label=name, lw=1)
    ax.set_xlabel("iteration")
    ax.set_ylabel("median relative residual")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=5)
    _save(fig, path)


def plot_darcy(evals: dict, path: Path) -> None:
    """Darcy: relative L2 error vs test-time iterations, one panel per test set, one line per model."""
    plt = _plt()
    sets = sorted({s for ev in evals.values() for s in ev["rel_l2"]})
    fig, axes = plt.subplots(1, len(sets), figsize=(4 * len(sets), 3.2), squeeze=False)
    for ax, set_name in zip(axes.flat, sets):
        for name, ev in evals.items():
            curve = ev["rel_l2"].get(set_name, {})
            ks = sorted(curve, key=int)
            ax.plot([int(k) for k in ks], [curve[k] for k in ks], "-o", ms=3, label=name)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"darcy {set_name}")
        ax.set_xlabel("test-time iterations")
        ax.set_ylabel("relative L2 error")
        ax.grid(alpha=0.3, which="both")
    axes.flat[0].legend(fontsize=6)
    _save(fig, path)


def plot_all(evals: dict, metrics: dict, out_dir: Path, name: str) -> list[str]:
    """Write the figures (four, and a fifth when the study has Darcy models); returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    darcy = {n: ev for n, ev in evals.items() if ev["task"] == "darcy"}
    evals = {n: ev for n, ev in evals.items() if ev["task"] != "darcy"}
    paths = {
        "accuracy": out_dir / f"{name}_accuracy.png",
        "aa_hist": out_dir / f"{name}_aa_hist.png",
        "aa_scatter": out_dir / f"{name}_aa_scatter.png",
        "traces": out_dir / f"{name}_traces.png",
    }
    if not evals:  # every model skipped (time budget) or only Darcy models
        paths = {}
    else:
        plot_accuracy(evals, paths["accuracy"])
        plot_aa_histogram(evals, paths["aa_hist"])
        plot_aa_scatter(metrics, paths["aa_scatter"])
        plot_traces(evals, paths["traces"])
    if darcy:
        paths["darcy"] = out_dir / f"{name}_darcy.png"
        plot_darcy(darcy, paths["darcy"])
    return [str(p) for p in paths.values()]
