"""The path-independence study: train a set of models, evaluate them, write the results file and plots.

Everything lands in a run folder: generated data sets (HDF5), one checkpoint per trained model and
one evaluation file per model, each written atomically. Re-running on the same folder skips models
already trained and evaluated with the same spec, so an interrupted study resumes where it stopped.

Speed and time (config top level): ``workers = N`` trains and evaluates N models at once in separate
processes (small models leave a GPU mostly idle between kernel launches, so several share it well);
``time_budget_s`` is a wall-clock budget for the whole study: training stops ``eval_reserve_s``
before it, models not yet started are skipped (listed in ``metrics.skipped``), and the results file
is still written. A model cut off by the budget (or a killed study) continues from its saved training
state (``partial/<name>.pt``, saved every minute) when the study is run again.

The across-model correlation follows the paper's population: models that fit their training
distribution (in-distribution accuracy at least ``fit_threshold``, default 0.9); the value over
every model is reported beside it. Per-sample, AA is correlated with correctness over all
harder test inputs of those models (Anil et al., 2022, Sec. 6).
"""

from __future__ import annotations

import copy
import json
import math
import multiprocessing as mp
import os
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from tqdm import tqdm

from implicit.distributed import resolve_device
from implicit.results import save_torch_atomic, target, write_json_atomic, write_results

from .data import TaskSet
from .evaluate import BatchFitter, alignment_scores, correct_per_iters, residual_trace, spearman
from .mazes import make_mazes
from .models import build_model
from .prefix_sums import make_prefix_sums
from .train import train_model

TASKS = ("maze", "prefix_sums", "darcy")
CLASSIFICATION = ("maze", "prefix_sums")
# per task: the config key of the training size and of the test sizes, and the set generator
_SIZES = {"maze": ("train_size", "test_sizes"), "prefix_sums": ("train_length", "test_lengths")}


def load_config(path: str | Path) -> dict:
    """Read a TOML study config."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    with open(path, "rb") as fh:
        return tomllib.load(fh)


def set_option(config: dict, assignment: str) -> None:
    """Apply ``"a.b.c=value"`` to ``config`` in place; ``value`` is read as TOML (bare words as strings)."""
    try:
        import tomllib
    except ModuleNotFoundError:
        import tomli as tomllib
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise ValueError(f'--set needs KEY=VALUE, got "{assignment}"')
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    *parents, leaf = key.strip().split(".")
    node = config
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f'--set {key}: "{part}" is not a table')
    node[leaf] = value


def model_specs(config: dict) -> list[dict]:
    """Every ``[[models]]`` entry merged over ``[defaults]``, checked for names and tasks."""
    defaults = config.get("defaults", {})
    specs, seen = [], set()
    for entry in config.get("models", []):
        spec = {**defaults, **entry}
        name = spec.get("name")
        if not name or name in seen:
            raise ValueError(f"every model needs a unique name, got {name!r}")
        if spec.get("task") not in TASKS:
            raise ValueError(f'model "{name}": task must be one of {TASKS}, got {spec.get("task")!r}')
        if spec["task"] not in config.get("tasks", {}):
            raise ValueError(f'model "{name}": no [tasks.{spec["task"]}] table in the config')
        seen.add(name)
        specs.append(spec)
    if not specs:
        raise ValueError("the config has no [[models]]")
    return specs


def _dataset(run_dir: Path, task: str, size: int, count: int, seed: int) -> TaskSet:
    path = run_dir / "data" / f"{task}_{size}_{count}_s{seed}.h5"
    if path.exists():
        return TaskSet.read_hdf5(path)
    data = make_mazes(count, size, seed=seed) if task == "maze" else make_prefix_sums(count, size, seed=seed)
    data.write_hdf5(path)
    return data


def task_data(run_dir: Path, task: str, cfg: dict, seed: int) -> tuple[TaskSet, dict[int, TaskSet]]:
    """The training set and the test sets (by size) of one task, cached as HDF5 in the run folder."""
    train_key, test_key = _SIZES[task]
    train = _dataset(run_dir, task, int(cfg[train_key]), int(cfg["n_train"]), seed)
    tests = {int(s): _dataset(run_dir, task, int(s), int(cfg["n_test"]), seed + 1 + i)
             for i, s in enumerate(cfg[test_key])}
    return train, tests


def _load_if_same(path: Path, spec: dict, loader) -> Any:
    if not path.exists():
        return None
    obj = loader(path)
    return obj if obj.get("spec") == spec else None


def checkpoint_or_train(model: nn.Module, data: TaskSet, spec: dict, run_dir: Path, *,
                        deadline: float | None = None, bar: bool = False, **train_kw: Any) -> dict | None:
    """The checkpoint of ``spec``'s model: a finished one in ``models/<name>.pt`` as it is; otherwise
    ``model`` trained (continuing the saved training state in ``partial/<name>.pt`` that a killed or
    cut-off run left), checkpointed and returned; ``None`` when ``deadline`` (a :func:`time.time`
    value) passed before training could start. The training state is kept only while the training
    is unfinished (stopped by the deadline). ``bar``: a progress bar of the training steps."""
    name = spec["name"]
    ckpt_path = Path(run_dir) / "models" / f"{name}.pt"
    ckpt = _load_if_same(ckpt_path, spec, lambda p: torch.load(p, map_location="cpu", weights_only=False))
    if ckpt is not None and ckpt["train"].get("stopped_by") != "deadline":
        return ckpt  # one cut off by an earlier run's budget trains on from where it stopped
    if deadline is not None and time.time() >= deadline:
        return None
    if bar:
        steps = tqdm(total=1, desc=f"train {name}", leave=False)

        def report(step: int, total: int, loss: float) -> None:
            steps.total = total
            steps.update(1)
            if step % 10 == 0:
                steps.set_postfix(loss=f"{loss:.4f}")

        train_kw["progress"] = report
    partial = Path(run_dir) / "partial" / f"{name}.pt"
    info = train_model(model, data, spec, resume=partial, deadline=deadline, **train_kw)
    if bar:
        steps.close()
    ckpt = {"spec": spec, "state_dict": {k: v.cpu() for k, v in model.state_dict().items()}, "train": info}
    save_torch_atomic(ckpt, ckpt_path)
    if info["stopped_by"] != "deadline":
        partial.unlink(missing_ok=True)
    return ckpt


def training_summary(train: dict) -> dict:
    """What an evaluation file records of a model's training (its checkpoint's ``train``)."""
    recent = train["loss_history"][-20:]
    return {"final_loss": float(sum(recent) / max(1, len(recent))), "steps": train["steps"],
            "train_seconds": train["train_seconds"], "stopped_by": train.get("stopped_by", "epochs")}


def run_model(spec: dict, config: dict, run_dir: Path, device: torch.device, progress: bool,
              deadline: float | None = None, train_only: bool = False) -> dict | None:
    """Train (unless checkpointed) and evaluate (unless evaluated) one model; returns its evaluation,
    or ``None`` when ``deadline`` (a :func:`time.time` value) passed before it could start.
    ``train_only``: stop after training and return how it ended (:func:`training_status`)."""
    task, name = spec["task"], spec["name"]
    eval_path = run_dir / "eval" / f"{name}.json"
    done = _load_if_same(eval_path, spec, lambda p: json.loads(p.read_text()))
    if done is not None and done.get("train", {}).get("stopped_by") != "deadline":
        return training_status(name, done["train"]) if train_only else done
    if task == "darcy":
        from .darcy_task import run_darcy_model

        return run_darcy_model(spec, config, run_dir, device, deadline=deadline, train_only=train_only)
    cfg = config["tasks"][task]
    train_set, tests = task_data(run_dir, task, cfg, int(config.get("seed", 0)))
    torch.manual_seed(int(spec.get("seed", 0)))
    model = build_model(task, spec)
    ckpt = checkpoint_or_train(model, train_set, spec, run_dir, deadline=deadline, bar=progress, device=device)
    if ckpt is None:
        return None
    if train_only:
        return training_status(name, ckpt["train"])
    model.load_state_dict(ckpt["state_dict"])
    model.to(device).eval()
    evaluation = evaluate_model(model, train_set, tests, cfg, config, device)
    evaluation.update(spec=spec, name=name, task=task, train=training_summary(ckpt["train"]))
    write_json_atomic(eval_path, evaluation)
    return evaluation


def evaluate_model(model, train_set: TaskSet, tests: dict[int, TaskSet], cfg: dict, config: dict, device) -> dict:
    """Accuracy vs iterations on every test size, per-sample AA and correctness, and a residual trace."""
    iters = [int(k) for k in cfg["eval_iters"]]
    fitting = BatchFitter(model, int(config.get("eval_batch_size", 256)))
    aa_iters = int(cfg.get("aa_iters", max(iters)))
    seen = TaskSet(*train_set[: int(cfg["n_test"])])  # in-distribution: training-size inputs
    in_iters = sorted({model.iters, *iters}) if model.iterative else [model.iters]
    in_dist = fitting(lambda b: correct_per_iters(model, seen, in_iters, batch_size=b, device=device))
    out: dict[str, Any] = {"train_accuracy": float(in_dist[model.iters].float().mean()),
                           "in_distribution_accuracy": max(float(v.float().mean()) for v in in_dist.values()),
                           "accuracy": {}, "per_sample": {}}
    for size, data in tests.items():
        correct = fitting(lambda b: correct_per_iters(model, data, iters, batch_size=b, device=device))
        out["accuracy"][str(size)] = {str(k): float(v.float().mean()) for k, v in correct.items()}
        sample = {"correct": correct[max(iters)].tolist()}
        if model.iterative:
            aa = fitting(lambda b: alignment_scores(model, data, aa_iters, batch_size=b, device=device))
            sample["aa"] = aa.tolist()
        out["per_sample"][str(size)] = sample
    out["eval_batch_size"] = fitting.batch
    if model.iterative:
        hardest = tests[max(tests)]
        trace = residual_trace(model, hardest, max(iters), count=int(config.get("trace_count", 32)), device=device)
        out["trace_median"] = trace.median(dim=1).values.tolist()
    return out


# the paper's numbers quoted by issue 9 (Anil et al., 2022): model-level AA scores
PAPER_AA = {"maze": {"path_independent": 1.00, "path_dependent": 0.32},
            "prefix_sums": {"path_independent": 0.99, "path_dependent": 0.62}}


def upward_test_size(train_size: int, test_sizes: list[int]) -> int | None:
    """The test size the upward-generalisation target is judged at: the smallest one at least
    twice ``train_size`` (issue 9: "mazes at least twice that size"), or ``None`` if there is none.
    Larger test sizes are still evaluated and reported beside it."""
    twice = [s for s in test_sizes if s >= 2 * train_size]
    return min(twice) if twice else None


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarise(evals: dict[str, dict], config: dict) -> tuple[dict, dict]:
    """Model-level metrics, the two targets, the across-model and per-sample rank correlations,
    and the paper-vs-ours comparison."""
    models: dict[str, dict] = {}
    darcy = {}
    for name, ev in evals.items():
        if ev["task"] == "darcy":
            darcy[name] = {k: v for k, v in ev.items() if k != "spec"}
            continue
        spec = ev["spec"]
        acc = ev["accuracy"]
        final = {s: a[max(a, key=int)] for s, a in acc.items()}
        best = {s: max(a.values()) for s, a in acc.items()}
        row = {"task": ev["task"], "kind": spec.get("kind", "deq"), "init": spec.get("init", "zero"),
               "injection": spec.get("injection", True), "budget": spec.get("budget"),
               "memorise_init": spec.get("memorise_init", 0.0), "seed": spec.get("seed", 0),
               "width": spec.get("width", 32), "role": spec.get("role"),
               "train": ev["train"], "train_accuracy": ev["train_accuracy"],
               "in_distribution_accuracy": ev.get("in_distribution_accuracy", ev["train_accuracy"]),
               "accuracy": acc, "hard_accuracy": sum(final.values()) / len(final), "best_accuracy": best}
        aa_all = [a for s in ev["per_sample"].values() for a in s.get("aa", [])]
        if aa_all:
            ok = [c for s in ev["per_sample"].values() for c in s["correct"]]
            row["aa_mean"] = sum(aa_all) / len(aa_all)
            row["aa_mean_correct"] = _mean([a for a, c in zip(aa_all, ok) if c])
            row["aa_mean_incorrect"] = _mean([a for a, c in zip(aa_all, ok) if not c])
            varied = len(set(ok)) > 1 and len(set(aa_all)) > 1
            row["aa_vs_correct_spearman"] = spearman(aa_all, [float(c) for c in ok]) if varied else None
        models[name] = row
    threshold = float(config.get("fit_threshold", 0.9))
    iterative = {n: r for n, r in models.items() if "aa_mean" in r}
    fitted = {n: r for n, r in iterative.items() if r["in_distribution_accuracy"] >= threshold}

    def across(rows: dict) -> float:
        if len(rows) < 2:
            return float("nan")
        return spearman([r["aa_mean"] for r in rows.values()], [r["hard_accuracy"] for r in rows.values()])

    rho_all, rho = across(iterative), across(fitted)
    per_task = {t: across({n: r for n, r in fitted.items() if r["task"] == t}) for t in CLASSIFICATION
                if sum(r["task"] == t for r in fitted.values()) >= 3}
    # per sample (the paper's Sec. 6): AA vs correctness over every harder input of the fitted models
    per_sample = {}
    for task in CLASSIFICATION:
        aa, ok = [], []
        for n, r in fitted.items():
            if r["task"] == task:
                for s in evals[n]["per_sample"].values():
                    aa += s.get("aa", [])
                    ok += [float(c) for c in s["correct"]]
        if len(set(ok)) > 1 and len(set(aa)) > 1:
            per_sample[task] = {"spearman": spearman(aa, ok), "n_samples": len(aa),
                                "aa_mean_correct": _mean([a for a, c in zip(aa, ok) if c]),
                                "aa_mean_incorrect": _mean([a for a, c in zip(aa, ok) if not c])}
    metrics = {"models": models, "fit_threshold": threshold,
               "aa_vs_hard_accuracy_spearman": rho, "aa_vs_hard_accuracy_spearman_all_models": rho_all,
               "aa_vs_hard_accuracy_spearman_per_task": per_task, "aa_vs_correct_per_sample": per_sample,
               "n_iterative_models": len(iterative), "n_fitted_models": len(fitted),
               "fitted_models": sorted(fitted)}
    if darcy:
        metrics["darcy"] = darcy

    targets = {}
    maze_cfg = config.get("tasks", {}).get("maze")
    paper: dict[str, Any] = {}
    if maze_cfg:
        size = upward_test_size(int(maze_cfg["train_size"]), [int(s) for s in maze_cfg["test_sizes"]])
        deqs = [r for r in models.values() if r["task"] == "maze" and r["kind"] == "deq"]
        value = max((r["best_accuracy"][str(size)] for r in deqs), default=float("nan")) if size else float("nan")
        metrics["upward_size"] = size
        # every test size, the target's and the larger ones alike: best DEQ accuracy over test-time budgets
        metrics["maze_deq_best_accuracy_by_size"] = {
            str(s): max((r["best_accuracy"][str(s)] for r in deqs), default=None) for s in maze_cfg["test_sizes"]}
        targets["maze_deq_solves_2x_size_with_more_iterations"] = target(value, 0.9, ">=")
        if size:
            targets["maze_deq_solves_2x_size_with_more_iterations"]["size"] = size
            paper["maze_deq_accuracy_at_2x_size"] = {"issue_target": 0.9, "ours": None if math.isnan(value) else value,
                                                     "size": size, "train_size": maze_cfg["train_size"]}
    for task, quoted in PAPER_AA.items():
        for role, value in quoted.items():
            ours = [r["aa_mean"] for r in iterative.values() if r["task"] == task and r["role"] == role]
            paper[f"{task}_aa_{role}"] = {"paper": value, "ours": _mean(ours), "n_models": len(ours)}
    paper["aa_vs_hard_accuracy_rank_correlation"] = {"issue_target": 0.7, "ours": None if math.isnan(rho) else rho}
    metrics["paper_vs_ours"] = paper
    spear = target(rho, 0.7, ">=")
    if len(fitted) < 8 or math.isnan(rho):
        spear["met"] = False  # the target asks for at least 8 trained models
    for entry in (*targets.values(), spear):
        if isinstance(entry["value"], float) and math.isnan(entry["value"]):
            entry["value"] = None  # undefined (too few models, or no test size twice the training size)
    spear["n_models"] = len(fitted)
    spear["population"] = f"iterative models with in-distribution accuracy >= {threshold}"
    targets["aa_vs_hard_accuracy_rank_correlation_8plus_models"] = spear
    return metrics, targets


def training_status(name: str, train: dict) -> dict:
    """How a model's training ended (what a ``train_only`` study reports instead of an evaluation)."""
    return {"name": name, "train": {"steps": train["steps"], "stopped_by": train.get("stopped_by", "epochs")}}


def _worker(spec: dict, config: dict, run_dir: str, device: str, deadline: float | None, threads: int,
            train_only: bool):
    torch.set_num_threads(threads)
    if torch.device(device).type == "cuda":
        torch.backends.cudnn.benchmark = True
    return run_model(spec, config, Path(run_dir), torch.device(device), False, deadline, train_only)


def warn_if_oversubscribed(specs: list[dict], workers: int, cpus: int) -> None:
    """Warn when more models train at once than there are CPU cores while some train on the clock
    (``train_seconds``): each such model then gets fewer optimiser steps than its config implies, and
    how many depends on the machine (22 processes on 16 cores cost every model ~25% of its steps in
    experiments/results/path_independence_22_models.json)."""
    timed = [s["name"] for s in specs if s.get("train_seconds")]
    if workers > cpus and timed:
        warnings.warn(f"{workers} workers on {cpus} CPU cores: the {len(timed)} models trained for train_seconds "
                      f"share the cores and each gets fewer steps; use workers <= {cpus} to compare runs",
                      RuntimeWarning, stacklevel=2)


def run_study(config: dict, *, progress: bool = True, only: list[str] | None = None,
              train_only: bool = False) -> Path | None:
    """Train and evaluate every model of ``config``; write the results JSON and PNGs; return the JSON path.

    ``train_only``: train (or train on) until ``time_budget_s`` is nearly spent, then stop without
    evaluating or writing results (returns ``None``): a study too long for one sitting runs as several
    such commands on the same run folder and a last one without it.

    A model that raises (out of GPU memory, say) does not lose the others: their results are written,
    the failure is named in ``metrics["failed"]``, and a ``RuntimeError`` follows; a re-run on the same
    run folder retries just the failed models."""
    start, wall_start = time.perf_counter(), time.time()
    device = resolve_device(config.get("device", "auto"))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # few distinct conv shapes, reused thousands of times
    run_dir = Path(config.get("run_dir", "runs/path_independence"))
    specs = model_specs(config)
    if only:
        unknown = set(only) - {s["name"] for s in specs}
        if unknown:
            raise ValueError(f"unknown model(s) {sorted(unknown)}; the config has {[s['name'] for s in specs]}")
        specs = [s for s in specs if s["name"] in only]
    budget = config.get("time_budget_s")
    reserve = 15.0 if train_only else float(config.get("eval_reserve_s", 60))  # no evaluation to leave time for
    deadline = wall_start + float(budget) - reserve if budget else None
    workers = max(1, min(int(config.get("workers", 1)), len(specs)))
    warn_if_oversubscribed(specs, workers, os.cpu_count() or 1)
    seed = int(config.get("seed", 0))
    for task in sorted({s["task"] for s in specs}):  # generate (or load) the data once, before any worker
        if task == "darcy":
            from .darcy_task import darcy_data

            darcy_data(run_dir, config["tasks"]["darcy"], seed)
        else:
            task_data(run_dir, task, config["tasks"][task], seed)
    evals: dict[str, dict] = {}
    skipped: list[str] = []
    failed: dict[str, str] = {}  # a model that raised does not cost the others their results

    def collect(name: str, outcome: Callable[[], dict | None]) -> None:
        try:
            ev = outcome()
        except Exception as err:  # reported, and raised again once the results of the others are written
            failed[name] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            warnings.warn(f"model {name} failed: {failed[name]}", RuntimeWarning, stacklevel=3)
            return
        (skipped.append(name) if ev is None else evals.__setitem__(name, ev))

    bar = tqdm(total=len(specs), desc="models", disable=not progress)
    if workers == 1:
        for spec in specs:
            collect(spec["name"], lambda: run_model(spec, config, run_dir, device, progress, deadline, train_only))
            bar.update(1)
    else:
        threads = max(1, (os.cpu_count() or 2) // workers)
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            jobs = {pool.submit(_worker, spec, config, str(run_dir), str(device), deadline, threads, train_only):
                    spec["name"] for spec in specs}
            for job in as_completed(jobs):
                collect(jobs[job], job.result)
                bar.update(1)
    evals = {s["name"]: evals[s["name"]] for s in specs if s["name"] in evals}  # config order
    bar.close()
    if train_only:
        for name, ev in evals.items():
            print(f"{name}: {ev['train']['steps']} steps, stopped by {ev['train']['stopped_by']}")
        print(f"not started: {', '.join(sorted(skipped)) or 'none'}")
        _raise_if_failed(failed, run_dir, None)
        return None
    metrics, targets = summarise(evals, config)
    metrics["skipped"] = sorted(skipped)
    metrics["failed"] = failed
    metrics["workers"] = workers
    name = config.get("name", "path_independence")
    out_dir = Path(config.get("out_dir", "experiments/results"))
    from .plots import plot_all

    metrics["plots"] = plot_all(evals, metrics, out_dir, name)
    stored = copy.deepcopy(config)
    path = write_results(name, config=stored, metrics=metrics, targets=targets, device=device,
                         wall_clock_s=time.perf_counter() - start, out_dir=out_dir)
    _raise_if_failed(failed, run_dir, path)
    return path


def _raise_if_failed(failed: dict[str, str], run_dir: Path, results: Path | None) -> None:
    """Raise one error naming every failed model and how to retry them (after the results are written)."""
    if not failed:
        return
    written = f"the results of the others are in {results}; " if results else ""
    lines = "\n".join(f"  {name}: {why}" for name, why in failed.items())
    raise RuntimeError(f"{len(failed)} model(s) failed:\n{lines}\n{written}re-run the same command on the same "
                       f"run folder ({run_dir}) to retry them: finished models and evaluations are reused")
