"""Navier-Stokes, FNO-DEQ against FNO d4 and FNO++ d4 at every training length run, from the results files
of ``experiments/fno_deq.py`` (the NS configs' settings: 6, 24 and 48 epochs by default).

Writes fno_deq_ns_summary.json: per training length, viscosity and setting, FNO-DEQ's ratio of means to each
baseline, whether the target is met (a ratio below 1), its seed-by-seed wins, whether its lead exceeds the
larger std, and its ratio of medians (which one diverged seed does not move); per viscosity, each model's
errors pooled over the settings; per training length, the counts. The PNG beside it shows FNO-DEQ's ratio to
the better baseline in each cell, one bar per training length and a dot for the ratio of medians, so the
cells where the target is missed (above the line at 1) can be compared across lengths. A file whose FNO-DEQ
trained with the Jacobian regulariser (``--jac-reg``, FNO-DEQ's setting alone) gives a row of its own, e.g.
"48 jac_reg 10", against the same training length's baselines from the other files. Files trained on other data
(the paper-size cells: 4500/500 samples at 128x128, against the grids' 1000/200 at 64x64) give rows of their own,
e.g. "6 jac_reg 3 (128x128, 4500/500)", so their seeds are never compared with the grids'. CPU, seconds:

    python experiments/fno_deq_ns_summary.py [--results experiments/results] [--files A.json,B.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "experiments")]
from fno_deq import BASELINES, _agg, _short_label  # noqa: E402  (the script that wrote the files)
from implicit.results import save_figure_atomic  # noqa: E402

# the NS grids at the configs' settings (the paper-settings and instance-norm runs are other protocols),
# FNO-DEQ with the Jacobian regulariser over both 48-epoch grids at weights 10 and 3 (the NS config's), and the
# cells run at the paper's data size (6 epochs, some continued to 8)
PAPER_SIZE = ("6ep_clean_nu0.01", "6ep_clean_nu0.001", "6ep_input_noise_0.001_nu0.01", "6ep_target_noise_0.001_nu0.01",
              "6ep_input_noise_0.004_nu0.01", "6ep_target_noise_0.004_nu0.01", "6ep_input_noise_0.001_nu0.001",
              "6ep_target_noise_0.001_nu0.001", "6ep_input_noise_0.004_nu0.001", "6ep_target_noise_0.004_nu0.001",
              "8ep_clean_nu0.01", "8ep_target_noise_0.001_nu0.01", "8ep_input_noise_0.004_nu0.01",
              "8ep_target_noise_0.004_nu0.01", "8ep_target_noise_0.001_nu0.001", "8ep_input_noise_0.004_nu0.001",
              "8ep_target_noise_0.004_nu0.001")
FILES = ("fno_deq_ns.json", "fno_deq_ns_24ep.json", "fno_deq_ns_48ep_nu0.01.json", "fno_deq_ns_48ep_nu0.001.json",
         "fno_deq_ns_48ep_jac_reg10_nu0.001.json", "fno_deq_ns_48ep_jac_reg10_nu0.01.json",
         "fno_deq_ns_48ep_jac_reg3_nu0.01.json", "fno_deq_ns_48ep_jac_reg3_nu0.001.json",
         *(f"fno_deq_ns_paper_scale_{cell}.json" for cell in PAPER_SIZE))
DEQ = "fno-deq"
COUNTS = ("met", "comparisons", "seed_wins", "seed_comparisons", "lead_above_larger_std", "met_by_median")


def deq_variant(config: dict) -> str:
    """The name FNO-DEQ's runs go by in a results file's ``config``: ``"fno-deq"``, or with the Jacobian
    regulariser's weight (``"fno-deq jac_reg 10"``), so the two trainings of one seed are not mixed."""
    weight = config.get("models", {}).get(DEQ, {}).get("jac_reg", 0)
    return f"{DEQ} jac_reg {weight:g}" if weight else DEQ


class DataSize(NamedTuple):
    """The grid and sample counts a results file's runs trained and were tested on."""

    resolution: int
    train: int
    test: int

    def __str__(self) -> str:
        return f"{self.resolution}x{self.resolution}, {self.train}/{self.test}"


def data_size(config: dict) -> DataSize | None:
    """The :class:`DataSize` a results file's ``config`` records (its data recipes' splits and grid, divided by
    the runs' subsampling); ``None`` where it records no data. One file holds one size."""
    subsample = {m.get("subsample", 1) for m in config.get("models", {}).values()} or {1}
    sizes = {DataSize(data["recipe"]["navier_stokes"]["resolution"] // s, data["recipe"]["splits"]["train"],
                      data["recipe"]["splits"]["test"]) for data in config.get("data", {}).values() for s in subsample}
    if len(sizes) > 1:
        raise ValueError(f"one results file, several data sizes: {sorted(map(str, sizes))}")
    return sizes.pop() if sizes else None


def variant_training(variant: str) -> str:
    """What a ``deq_variant`` name adds to FNO-DEQ's: ``""``, or e.g. ``"jac_reg 10"``."""
    return variant[len(DEQ) + 1:]


def gather(paths: list[Path]) -> dict:
    """``{(data size, epochs): {viscosity: {setting: {model: {seed: test rel L2}}}}}`` from the files' finished
    runs, FNO-DEQ under its ``deq_variant`` name. A run recorded in two files with different errors is an error
    (the files would disagree on which counts)."""
    table: dict = {}
    for path in paths:
        data = json.loads(path.read_text())
        epochs = data["config"]["epochs"]
        size = data_size(data["config"])
        variant = deq_variant(data["config"])
        for nu, settings in data["metrics"]["accuracy"].items():
            for setting, models in settings.items():
                for model, cell in models.items():
                    model = variant if model == DEQ else model
                    seeds = table.setdefault((size, epochs), {}).setdefault(nu, {}).setdefault(setting, {}).setdefault(
                        model, {})
                    cut = cell.get("cut_runs", {})  # fno_deq.py's word, where the file records it
                    for run in cell["runs"]:
                        if run["epochs_done"] != epochs or str(run["seed"]) in cut:
                            continue  # cut by a budget: the error of fewer epochs
                        old = seeds.setdefault(run["seed"], run["test_rel_l2"])
                        if old != run["test_rel_l2"]:
                            where = f"{epochs} epochs" + (f" at {size}" if size else "")
                            raise ValueError(f"{where}, {nu} {setting} {model} seed {run['seed']}: "
                                             f"{old} in one file, {run['test_rel_l2']} in {path.name}")
    return table


def compare(table: dict) -> dict:
    """One row per data size, training length and FNO-DEQ variant (key ``"48"``, ``"48 jac_reg 10"``, with the
    size where the files record it: ``"6 jac_reg 3 (128x128, 4500/500)"``): each cell's comparisons with the
    baselines of that size and length, the pooled errors per viscosity, and the counts (over all cells, and
    per viscosity). Rows go by size (smallest first), then length."""
    out: dict = {}
    for size, epochs in sorted(table, key=lambda k: (k[0] or DataSize(0, 0, 0), k[1])):
        settings_by_nu = table[size, epochs]
        variants = {m for settings in settings_by_nu.values() for models in settings.values() for m in models
                    if m.startswith(DEQ)}
        for variant in sorted(variants, key=lambda v: (v != DEQ, v)):
            key = f"{epochs} {variant_training(variant)}".rstrip() + (f" ({size})" if size else "")
            out[key] = {"epochs": epochs, "data_size": str(size) if size else None, "fno_deq": variant,
                        **_compare_row(settings_by_nu, variant)}
    return out


def _compare_row(settings_by_nu: dict, variant: str) -> dict:
    """One training length's cells where ``variant`` ran, each against the baselines; pooled errors over
    those cells only, so a variant run on fewer settings is pooled like for like."""
    cells, pooled, totals = {}, {}, {"all": dict.fromkeys(COUNTS, 0)}  # zeros for a row with no baselines
    for nu, settings in settings_by_nu.items():
        for setting, all_models in settings.items():
            if variant not in all_models:
                continue
            # the baselines (and IFNO where it ran) beside this variant, not FNO-DEQ's other trainings
            models = {m: s for m, s in all_models.items() if m == variant or not m.startswith(DEQ)}
            deq = models[variant]
            cell = {"test_rel_l2": {m: _agg([s[k] for k in sorted(s)]) for m, s in models.items()}}
            for base in BASELINES:
                if base not in models:
                    continue
                d, b = cell["test_rel_l2"][variant], cell["test_rel_l2"][base]
                common = sorted(set(deq) & set(models[base]))
                wins = sum(deq[s] < models[base][s] for s in common)
                d_med, b_med = (statistics.median(s.values()) for s in (deq, models[base]))
                cell[base] = {"ratio_of_means": d["mean"] / b["mean"], "met": d["mean"] < b["mean"],
                              "seed_wins": wins, "seeds_compared": len(common),
                              "lead_above_larger_std": b["mean"] - d["mean"] > max(d["std"], b["std"]),
                              # one diverged or lucky seed moves a mean of three; the median shows it
                              "ratio_of_medians": d_med / b_med, "met_by_median": d_med < b_med}
                for key in ("all", nu):
                    t = totals.setdefault(key, dict.fromkeys(COUNTS, 0))
                    for name, add in zip(COUNTS, (cell[base]["met"], 1, wins, len(common),
                                                  cell[base]["lead_above_larger_std"],
                                                  cell[base]["met_by_median"])):
                        t[name] += add
            cells.setdefault(nu, {})[setting] = cell
            for m, seeds in models.items():
                pooled.setdefault(nu, {}).setdefault(m, []).extend(seeds[k] for k in sorted(seeds))
    pooled_stats = {nu: {"settings": sorted(cells[nu]), **{m: _agg(v) for m, v in models.items()}}
                    for nu, models in pooled.items()}
    return {"cells": cells, "pooled": pooled_stats, "totals": totals}


def row_label(row: dict) -> str:
    """``"48 epochs"``, ``"48 epochs, FNO-DEQ jac_reg 10"`` for a variant's row, and the data size where known
    (``"6 epochs, FNO-DEQ jac_reg 3, 128x128, 4500/500"``)."""
    variant = variant_training(row["fno_deq"])
    return (f"{row['epochs']} epochs" + (f", FNO-DEQ {variant}" if variant else "")
            + (f", {row['data_size']}" if row.get("data_size") else ""))


def figure(summary: dict):
    """FNO-DEQ's ratio of means to the better baseline per cell, one bar per row (training length, FNO-DEQ
    variant); a dot marks the ratio of medians. A row with cells not run says how many it has."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = []
    for per in summary.values():
        keys += [(nu, s) for nu in per["cells"] for s in per["cells"][nu] if (nu, s) not in keys]
    fig, ax = plt.subplots(figsize=(max(8, 1.2 * len(keys)), 4.2))
    w = 0.8 / len(summary)
    for i, per in enumerate(summary.values()):
        xs, ys, medians = [], [], []
        for j, (nu, s) in enumerate(keys):
            cell = per["cells"].get(nu, {}).get(s)
            if cell and all(b in cell for b in BASELINES):
                xs.append(j + i * w)
                ys.append(max(cell[b]["ratio_of_means"] for b in BASELINES))  # against the better baseline
                medians.append(max(cell[b]["ratio_of_medians"] for b in BASELINES))
        partial = f" ({len(xs)} of {len(keys)} cells)" if len(xs) < len(keys) else ""
        ax.bar(xs, ys, width=w, label=row_label(per) + partial, color=f"C{i}")
        ax.plot(xs, medians, "k.", ms=5, label="ratio of medians" if i == 0 else None)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([j + 0.4 - w / 2 for j in range(len(keys))], [_short_label(nu, s, "ns") for nu, s in keys],
                  fontsize=7)
    ax.set_ylabel("FNO-DEQ / better of FNO d4, FNO++ d4\n(mean test rel. L2; < 1: target met)")
    ax.set_title("Navier-Stokes: FNO-DEQ against the depth-4 baselines, by data size, training length and "
                 "FNO-DEQ training")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot(summary: dict, path: Path) -> Path:
    """:func:`figure`, saved to ``path``."""
    return save_figure_atomic(figure(summary), path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("--results", default=str(ROOT / "experiments" / "results"), help="folder of the results files")
    p.add_argument("--files", default=",".join(FILES), help="comma-separated results files in --results")
    p.add_argument("--out", help="folder for the summary and PNG (default: --results)")
    args = p.parse_args(argv)
    from implicit.results import write_results

    results = Path(args.results)
    paths = [results / f for f in args.files.split(",") if f]
    missing = [str(q) for q in paths if not q.is_file()]
    if missing:
        p.error(f"no results file {', '.join(missing)}")
    summary = compare(gather(paths))
    out = Path(args.out or results)
    out.mkdir(parents=True, exist_ok=True)
    png = plot(summary, out / "fno_deq_ns_summary.png")
    config = {"files": [q.name for q in paths], "deq": DEQ, "baselines": list(BASELINES),
              "note": "test relative L2 of the runs that finished all epochs; means over seeds"}
    path = write_results("fno_deq_ns_summary", config=config, metrics=summary, device="cpu", out_dir=out)
    for per in summary.values():
        t = per["totals"]["all"]
        models = (*BASELINES, per["fno_deq"])
        pooled = "; ".join(f"{nu}: " + ", ".join(f"{m} {per['pooled'][nu][m]['mean']:.4f}" for m in models
                                                  if m in per["pooled"][nu]) for nu in per["pooled"])
        print(f"{row_label(per)}: met {t['met']}/{t['comparisons']} (by medians {t['met_by_median']}), seed wins "
              f"{t['seed_wins']}/{t['seed_comparisons']}, lead above the larger std {t['lead_above_larger_std']}; "
              f"pooled {pooled}")
    print(f"wrote {path} and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
