"""FNO-DEQ vs FNO, FNO++ and IFNO on Darcy flow and steady Navier-Stokes (protocol of arXiv 2312.00234).

One command trains every (problem, noise setting, model, seed) as its own process on one GPU
(``--jobs`` at once: the models are small and one process leaves the GPU idle between kernel
launches), under one wall-clock budget, then writes ``fno_deq_darcy.json`` and ``fno_deq_ns.json``
(+ PNGs) into ``--out`` through :func:`implicit.results.write_results`. On a host with several GPUs
(``--device cuda``, or ``auto`` there) each process goes to the GPU with the least expected load.

- Data: darcy-85 (1024 train / 500 test, solved at 421 and stored at 85x85) and the ns-nu0.01 /
  ns-nu0.001 recipes (128x128) with ``--ns-train`` / ``--ns-test`` samples (the paper: 4500 / 500;
  nu=0.001 costs ~35 samples/s to generate on an H100), generated on the device into
  ``<out>/data`` by their own processes before any training starts.
- Models (paper settings, see ``experiments/configs/``): FNO and FNO++ at depth 4, IFNO (the tied
  block unrolled 12 times), FNO-DEQ (Anderson, phantom gradient after a warm-up of unrolled steps; on
  Darcy the exact gradient with ``--paper-match``).
  Every model gets the same epochs; the warm-up is scaled with the epochs (the paper: 300 of 16000
  steps on Darcy), at least two epochs and at most 300 steps.
- Noise (the paper's protocol, :func:`pde.train.add_observation_noise`): Darcy variances up to 1e-3
  on the raw inputs, and on the raw targets; Navier-Stokes up to 1e-3 and 4e-3, scaled to the
  paper's signal-to-noise ratio (``noise_scale``, our NS fields are on another raw scale).
- Budget: every training stops at an epoch boundary before ``--budget-s`` runs out; the results
  files are written with the epochs actually run (``epochs_done``). Re-running the same command on
  the same ``--out`` resumes every run from its checkpoint (same ``--epochs``: the cosine schedule
  depends on it) and skips finished ones, so a second command completes a cut run, or adds seeds. A run
  trained on under a longer constant-rate plan counts at a shorter plan's epochs (:func:`finished_for`),
  read from its per-epoch records where it trained past them (:func:`at_plan_epochs`: a 6-epoch file
  from an 8-epoch cell is ``--collect-only --reuse`` of the 8-epoch file with ``--ns-epochs 6``).
  ``wall_clock_s`` sums the commands run on that ``--out`` (each one's in ``command_wall_clock_s``).
  A training keeps its job file current after every epoch, so a process killed with its machine leaves
  its last evaluation: ``--collect-only`` of the ``jobs/*.json`` that came back reports it as a cut run,
  or as a finished run of a plan that ends at that epoch (killed before its first evaluation: the epochs it
  trained, listed under ``runs`` only). The run's own ``wall_clock_s`` counts its time up to its last
  checkpoint, so a resumed run counts each epoch once.
- Several machines: each run's job file records the device, torch and commit it trained with. Gather
  the ``jobs/*.json`` of several ``--out`` folders into one and ``--collect-only`` writes the results
  files from them, naming the machines the runs trained on, not the one that collected them.
- Memory: FNO-DEQ's peak training memory at 8, 16, 32, 48 solver iterations against IFNO unrolled
  to the same depths (one process of its own).

    python experiments/fno_deq.py --out OUT --budget-s 540   # GPU: one ~9.5-minute command (H100)
    python experiments/fno_deq.py --out OUT --budget-s 540 --seeds 0,1,2   # a second one: resume, add seed 2
    python experiments/fno_deq.py --small --out /tmp/fd      # CPU smoke run, about a minute
    # a fresh machine adds NS seed 1 to the seed-0 runs recorded in the repo's results file:
    python experiments/fno_deq.py --out OUT --problems ns --ns-seeds 0,1 --reuse experiments/results/fno_deq_ns.json
    # Darcy, clean data, 3 seeds, 32 epochs: three resumed commands on one warm H100 (fno_deq_darcy_32ep_clean.json)
    python experiments/fno_deq.py --out /tmp/fd --problems darcy --darcy-settings clean --epochs 32 \\
        --seeds 0,1,2 --budget-s 570
    # the paper's summed loss, 64 epochs, FNO-DEQ and FNO++ only (fno_deq_darcy_64ep_sum_clean.json): FNO++ takes
    # one ~9-minute command (6 runs at once), the three DEQs two more on a warm machine (3 at once, 13.5 s an epoch)
    python experiments/fno_deq.py --out /tmp/fd --problems darcy --darcy-settings clean --models fno-deq,fno++-d4 \\
        --epochs 64 --seeds 0,1,2 --loss-reduction sum --jobs 3 --budget-s 565
    # every Darcy result above used the earlier settings; --paper-match trains with the Darcy configs' current
    # ones (fno_deq_darcy_variants.py compares them, one model pair per process)
    # NS, both noise levels and IFNO with noise, on top of the runs recorded in the repo (fno_deq_ns.json)
    python experiments/fno_deq.py --out OUT --problems ns --ns-seeds 0,1,2 --ns-noise 0.001,0.004 --ifno-noisy \\
        --reuse experiments/results/fno_deq_ns.json
    # NS clean, 24 epochs, with the paper's loss, no spectral bias and its normaliser (fno_deq_ns_24ep_clean_
    # paper_match.json ran before --paper-match set the normaliser on NS: it kept the per-channel one)
    python experiments/fno_deq.py --out OUT --problems ns --ns-seeds 0,1,2 --ns-noise '' --ns-epochs 24 \\
        --paper-match --loss-reduction sum
    # NS nu=0.01, 48 epochs, split over two machines, then merged (fno_deq_ns_48ep_nu0.01.json)
    python experiments/fno_deq.py --out A --problems ns --ns-seeds 0,1,2 --ns-noise 0.001 --ns-epochs 48 \\
        --ns-viscosities 0.01 --models fno-deq,fno-d4,fno++-d4          # machine 1 (resume until done)
    python experiments/fno_deq.py --out B ... --ns-noise 0.004 --reuse A/fno_deq_ns.json --jobs 16   # machine 2
    mkdir -p M/jobs && cp A/jobs/*.json B/jobs/*.json M/jobs/   # then, on any machine:
    python experiments/fno_deq.py --out M ... --ns-noise 0.001,0.004 --collect-only
    # the paper's NS data size and resolution (4500 / 500 at 128x128), nu=0.01 clean, on one H200 (the 9 runs need
    # ~91 GB of GPU memory; with --checkpoint-unrolled FNO-DEQ's warm-up keeps 1.7 GB instead of 13 GB for its
    # backward, its steps taking about 1.35x as long (fno_deq_warmup_memory.json), and the nine peaked at 58 GB on an
    # H100 80GB in their warm-up (..._memory_h100_checkpoint_unrolled.json; the implicit phase took 71 GB on an
    # H200): repeat until done; --ns-epochs 8 then continues them (fno_deq_ns_paper_scale_*.json)
    python experiments/fno_deq.py --out OUT --problems ns --ns-seeds 0,1,2 --ns-noise '' --ns-viscosities 0.01 \\
        --ns-train 4500 --ns-test 500 --ns-subsample 1 --models fno-deq,fno-d4,fno++-d4 --jac-reg 3 --jobs 9 \\
        --ns-epochs 6
    # a paper-size nu=0.001 cell too long for one machine's hold: its baselines on one machine, then its FNO-DEQs on
    # another, which takes the baselines' finished runs from the first file (the same jobs in both plans)
    python experiments/fno_deq.py --out A --problems ns --ns-seeds 0,1,2 --ns-noise 0.004 --ns-viscosities 0.001 \\
        --ns-settings input-noise-0.004 --ns-train 4500 --ns-test 500 --ns-subsample 1 --jac-reg 3 --jobs 9 \\
        --ns-epochs 8 --models fno-d4,fno++-d4
    python experiments/fno_deq.py --out B ... --models fno-deq,fno-d4,fno++-d4 --reuse A/fno_deq_ns.json
    # or the whole cell in one command on a two-GPU host (nvidia-h200-x2): heaviest first, each process on the
    # GPU with the least expected load, so two FNO-DEQs share one GPU and the third the six baselines' (not yet
    # run on a GPU)
    python experiments/fno_deq.py --out OUT ... --ns-epochs 8 --models fno-deq,fno-d4,fno++-d4
    # three more seeds (3,4,5) of one NS cell: --ns-settings picks it (the clean cell is always planned otherwise)
    python experiments/fno_deq.py --out OUT --problems ns --ns-seeds 3,4,5 --ns-noise 0.001 --ns-epochs 48 \\
        --ns-viscosities 0.001 --ns-settings input-noise-0.001 --models fno-deq,fno-d4,fno++-d4
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from implicit.results import save_figure_atomic, write_json_atomic  # noqa: E402
# Variance of the raw fields in the paper's NS files (its data/navier_stokes_dataloader.py, visc 0.01).
from pde.train import PAPER_NS_VARIANCE, TrainConfig  # noqa: E402

# Paper values (Marwah et al. 2023, Table 1, Darcy 85x85 clean, test relative L2, mean of 3 seeds), for the README.
PAPER = {"darcy": {"fno-d4": 0.0078, "fno++-d4": 0.0088, "ifno": 0.0076, "fno-deq": 0.0057}}

BASELINES = ("fno-d4", "fno++-d4")


# ----------------------------------------------------------------------------------- the plan

def model_overrides(problem: str, small: bool, epochs: int, steps_per_epoch: int) -> dict[str, dict]:
    """Name -> TrainConfig overrides of each compared model (paper settings, experiments/configs/)."""
    # the paper warms up for 300 of 500 x 32 = 16000 steps; a short run keeps that share, at least 2 epochs'
    # worth and at most 300 steps, so the DEQ phase is most of the training
    warm = min(300, max(2 * steps_per_epoch, round(300 / 16000 * epochs * steps_per_epoch)))
    if problem == "darcy":
        deq = dict(model="fno-deq", solver="anderson", max_iter=32, eval_max_iter=32, tol=1e-6, backward="phantom",
                   backward_steps=1, backward_damping=0.5, pretrain_steps=warm, pretrain_iter=8)
        ifno_iters = 12
    else:
        # no norm in the block, unlike the paper (and the baselines here): instance norm makes the tied block
        # expansive and the solve stalls (relative residual 0.38 after 24 iterations in the H100 run kept
        # as experiments/results/fno_deq_ns_instance_norm.json; see experiments/configs/ns-fno-deq.toml)
        deq = dict(model="fno-deq", solver="anderson", max_iter=24, eval_max_iter=24, tol=1e-6, backward="phantom",
                   backward_steps=3, backward_damping=0.8, pretrain_steps=warm, pretrain_iter=12, norm="none")
        ifno_iters = 12
    if small:
        deq.update(max_iter=6, eval_max_iter=6, pretrain_steps=4, pretrain_iter=3)
        ifno_iters = 3
    return {"fno-d4": dict(model="fno", depth=1 if small else 4),
            "fno++-d4": dict(model="fno++", depth=1 if small else 4),
            "ifno": dict(model="ifno", iterations=ifno_iters),
            "fno-deq": deq}


def darcy_settings() -> dict[str, dict]:
    return {"clean": {}, "input-noise-0.001": dict(noise_level=1e-3, noise_on="input"),
            "target-noise-0.001": dict(noise_level=1e-3, noise_on="target")}


def ns_settings(levels: list[float]) -> dict[str, dict]:
    out = {"clean": {}}
    for lv in levels:
        out[f"input-noise-{lv:g}"] = dict(noise_level=lv, noise_on="input")
        out[f"target-noise-{lv:g}"] = dict(noise_level=lv, noise_on="target")
    return out


def recipes(args) -> dict[str, dict]:
    """Data set name -> recipe dict (generated into <out>/data)."""
    from pde.datasets import load_recipe

    if args.small:
        return {"darcy": {"name": "darcy-fdsmall", "generator": "darcy", "seed": 1, "chunk_size": 32,
                          "store_dtype": "float32", "splits": {"train": 48, "test": 16},
                          "darcy": {"fine_resolution": 33, "subsample": 2}},
                "ns-nu0.01": {"name": "ns-fdsmall", "generator": "navier_stokes", "seed": 1, "chunk_size": 32,
                              "store_dtype": "float32", "splits": {"train": 32, "test": 8},
                              "navier_stokes": {"resolution": 16, "viscosity": 0.01, "kolmogorov_amplitude": 0.05,
                                                "perturbation_amplitude": 0.05, "tol": 1e-6}}}
    out = {"darcy": load_recipe("darcy-85")}
    for nu in args.ns_viscosities.split(","):
        if not nu:
            continue
        r = load_recipe(f"ns-nu{nu}")
        if (args.ns_train, args.ns_test) != (r["splits"]["train"], r["splits"]["test"]):
            r = dict(r, name=f"{r['name']}-n{args.ns_train}-{args.ns_test}",
                     splits={"train": args.ns_train, "test": args.ns_test},
                     description=r.get("description", "") + f"; {args.ns_train} train / {args.ns_test} test samples")
        out[f"ns-nu{nu}"] = r
    return out


def _subset(available: dict, wanted: str, flag: str) -> dict:
    """The entries of ``available`` named in the comma-separated ``wanted`` (all if empty), in their order."""
    if not wanted:
        return available
    names = wanted.split(",")
    unknown = set(names) - set(available)
    if unknown:
        raise SystemExit(f"{flag}: unknown {sorted(unknown)}; choose from {sorted(available)}")
    return {k: v for k, v in available.items() if k in names}


def plan(args) -> list[dict]:
    """Every job: data generation, the memory sweep, one training per (data, setting, model, seed)."""
    from pde.train import load_config

    # --paper-match: the Darcy FNO-DEQ config's current normaliser, spectral bias and gradient
    current = load_config(None, ROOT / "experiments" / "configs" / "darcy-fno-deq.toml")
    out = Path(args.out)
    problems = args.problems.split(",")
    every = recipes(args)
    unknown = set(problems) - {"darcy", "ns", *every}
    if unknown:
        raise SystemExit(f"--problems: unknown {sorted(unknown)}; choose from darcy, ns or one of {sorted(every)}")
    recs = {k: v for k, v in every.items() if k.split("-")[0] in problems or k in problems}
    jobs: list[dict] = []
    for key, r in recs.items():
        jobs.append({"id": f"data-{key}", "kind": "data", "recipe": r, "dir": str(out / "data"), "needs": [],
                     "device": args.device})
    if "darcy" in recs:
        jobs.append({"id": "memory", "kind": "memory", "needs": ["data-darcy"], "small": args.small,
                     "device": args.device,
                     "train_file": str(out / "data" / f"{recs['darcy']['name']}_train.h5")})
    # every training waits for all the data: generating nu=0.001 beside a dozen trainings took 470 s on the
    # H100 (about 35 s alone), which left its own trainings one epoch
    data_jobs = [f"data-{key}" for key in recs]
    trains = []
    for key, r in recs.items():
        darcy = key == "darcy"
        epochs = args.epochs if darcy else args.ns_epochs
        seeds = [int(s) for s in (args.seeds if darcy else args.ns_seeds).split(",")]
        ntrain = r["splits"]["train"]
        batch = 8 if args.small else 32
        settings = darcy_settings() if darcy else ns_settings([float(v) for v in args.ns_noise.split(",") if v])
        settings = (_subset(settings, args.darcy_settings, "--darcy-settings") if darcy
                    else _subset(settings, args.ns_settings, "--ns-settings"))
        common = dict(width=8 if args.small else 32, modes=4 if args.small else 12, epochs=epochs, batch_size=batch,
                      weight_decay=1e-4, loss_reduction=args.loss_reduction, device=args.device, plot=False,
                      eval_every=max(1, epochs // 4),
                      data=str(out / "data" / f"{r['name']}_train.h5"))
        if darcy:
            common.update(lr=1e-3, scheduler="cosine", padding=0.1, norm="none")
            if args.paper_match:
                common.update(normalizer=current.normalizer, spectral_bias=current.spectral_bias)
        else:  # the paper: lr 5e-3 constant, instance norm (normalize=True), periodic data (no padding)
            common.update(lr=5e-3, scheduler="constant", padding=0.0, norm="instance_norm",
                          subsample=1 if args.small else args.ns_subsample)
            if args.paper_match:  # the paper's spectral convolutions and its NS normaliser (a scale, mean 0)
                common.update(spectral_bias=False, normalizer="scale")
        models = model_overrides("darcy" if darcy else "ns", args.small, epochs, -(-ntrain // batch))
        models = _subset(models, args.models, "--models")
        if args.solver_graph and "fno-deq" in models:
            models["fno-deq"] = dict(models["fno-deq"], solver_graph=True)
        if args.checkpoint_unrolled:  # FNO-DEQ's warm-up and IFNO recompute their iterations in the backward
            for name in {"fno-deq", "ifno"} & set(models):
                models[name] = dict(models[name], checkpoint_unrolled=True)
        if args.deterministic:  # every model: bitwise-repeatable GPU runs
            common["deterministic"] = True
        if args.jac_reg and "fno-deq" in models:
            models["fno-deq"] = dict(models["fno-deq"], jac_reg=args.jac_reg)
        if darcy and args.paper_match and "fno-deq" in models:
            models["fno-deq"] = dict(models["fno-deq"], backward=current.backward, backward_tol=current.backward_tol)
        for seed in seeds:
            for setting, noise in settings.items():
                for name, kw in models.items():
                    if name == "ifno" and setting != "clean" and not args.ifno_noisy:
                        continue  # IFNO is in no target; the noisy settings compare FNO-DEQ with FNO/FNO++
                    cfg = dict(common, **kw, **noise, seed=seed,
                               out=str(out / "runs" / key / setting / f"{name}-s{seed}"))
                    if noise and args.noise_per_epoch:  # fresh noise each epoch, as the paper's NS loader
                        cfg["noise_per_epoch"] = True
                    if not darcy and noise:  # the paper's signal-to-noise ratio on our raw scale (set at run time)
                        cfg["noise_scale"] = "auto"
                    else:
                        TrainConfig(**cfg)  # fail now, not in a worker
                    trains.append({"id": f"train-{key}-{setting}-{name}-s{seed}", "kind": "train", "data": key,
                                   "setting": setting, "model": name, "seed": seed, "config": cfg,
                                   "needs": data_jobs, "round": seeds.index(seed),
                                   "cost": {"fno-deq": 4, "ifno": 3, "fno-d4": 2, "fno++-d4": 2}[name]})
    # a cut run loses whole seeds, not settings: seed rounds first, the slowest models first in each round
    trains.sort(key=lambda j: (j["round"], j["data"] != "darcy", -j["cost"]))
    return jobs + trains


# ----------------------------------------------------------------------------------- workers

def _worker(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    result_path = Path(spec["result"])
    if spec["kind"] == "data":
        from implicit.distributed import resolve_device
        from pde.datasets import generate_split

        dev = resolve_device(spec.get("device"))
        t0 = time.perf_counter()
        for split in ("train", "test"):
            generate_split(spec["recipe"], split, spec["dir"], device=dev, progress=False)
        write_json_atomic(result_path, {"seconds": time.perf_counter() - t0, "device": str(dev)})
        return 0
    if spec["kind"] == "memory":
        write_json_atomic(result_path, memory_sweep(spec))
        return 0
    return _train_worker(spec, result_path)


def _train_worker(spec: dict, result_path: Path) -> int:
    from pde.train import evaluate, load_split, train

    cfg_d = dict(spec["config"])
    if cfg_d.get("noise_scale") == "auto":
        ds = load_split(Path(cfg_d["data"]), subsample=cfg_d.get("subsample", 1))
        field = ds.x if cfg_d["noise_on"] == "input" else ds.y
        cfg_d["noise_scale"] = float(field.double().var(dim=(0, 2, 3)).mean() / PAPER_NS_VARIANCE[cfg_d["noise_on"]])
    cfg = TrainConfig(**cfg_d)
    previous = json.loads(result_path.read_text()) if result_path.is_file() else {}
    t0 = time.perf_counter()

    def after_epoch(s: dict) -> None:
        """Keep the job file current after each checkpoint, so that a kill leaves the last evaluation's record
        and the time trained up to the checkpoint the next call resumes from (each kept epoch counted once).
        Before the first evaluation the record is the epochs trained so far, without a test error."""
        if s["epochs_done"] >= cfg.epochs:
            return  # the final record follows
        wall = time.perf_counter() - t0
        record = json.loads(result_path.read_text()) if result_path.is_file() else {}
        if "test_rel_l2" in s["history"][-1] or "test_rel_l2" not in record:
            write_json_atomic(result_path, _train_result(spec, cfg, cfg_d, s, wall, previous))
        else:  # between evaluations: the last one's record, its clock moved on
            write_json_atomic(result_path, {**record, "wall_clock_s": wall + previous.get("wall_clock_s", 0.0)})

    s = train(cfg, progress=False, deadline=spec["deadline"], on_epoch=after_epoch)
    res = _train_result(spec, cfg, cfg_d, s, time.perf_counter() - t0, previous)
    if s["history"] and "test_rel_l2" not in res:  # stopped between evaluations: evaluate the checkpoint now
        test_file = str(cfg.data).replace("_train.h5", "_test.h5")
        ev = evaluate(s["checkpoint"], test_file, subsample=cfg.subsample, device=cfg.device)
        res["test_rel_l2"] = ev["rel_l2_mean"]
        if "solver" in ev:
            res.update(test_solver_iters=ev["solver"]["n_iter_mean"],
                       test_solver_residual=ev["solver"]["residual_mean"],
                       test_solver_rel_residual=ev["solver"]["rel_residual_mean"])
    write_json_atomic(result_path, res)
    return 0


def _train_result(spec: dict, cfg: TrainConfig, cfg_d: dict, s: dict, wall: float, previous: dict) -> dict:
    """A training job's result record from ``train``'s summary ``s`` (final, or after an epoch) under ``cfg``
    (recorded as the job's ``cfg_d``): its epochs, per-epoch curves, the test error and solve of its last epoch
    where that one was evaluated, timings and memory. ``previous``: the record of the job's earlier calls, whose
    wall clock it adds to."""
    from implicit.results import run_environment

    hist = s["history"]
    res = {k: spec[k] for k in ("data", "setting", "model", "seed")}
    res.update(epochs=cfg.epochs, epochs_done=s["epochs_done"], parameters=s["parameters"],
               noise_scale=cfg.noise_scale, config=cfg_d,
               wall_clock_s=wall + previous.get("wall_clock_s", 0.0),
               **run_environment(None if cfg.device == "auto" else cfg.device))
    if not hist:
        return res
    last = hist[-1]
    res["train_rel_l2"] = last["train_rel_l2"]
    res["train_rel_l2_per_epoch"] = [h["train_rel_l2"] for h in hist]
    for k in ("train_solver_rel_residual", "train_jac_loss"):  # FNO-DEQ: whether the tied block kept contracting
        if any(k in h for h in hist):
            res[f"{k}_per_epoch"] = [h.get(k) for h in hist]
    res["test_rel_l2_curve"] = [(h["epoch"], h["test_rel_l2"]) for h in hist if "test_rel_l2" in h]
    # FNO-DEQ's and IFNO's test solve at every evaluation, so the run can be read at an earlier epoch (at_plan_epochs)
    res["test_solver_curve"] = [{"epoch": h["epoch"], **{k: h[k] for k in TEST_SOLVE_KEYS if k in h}}
                                for h in hist if "test_solver_iters" in h]
    res["epoch_time_s"] = statistics.median(h["time_s"] for h in hist)
    if "test_rel_l2" in last:
        res["test_rel_l2"] = last["test_rel_l2"]
        res.update({k: last[k] for k in TEST_SOLVE_KEYS if k in last})
    trained_now = s["epochs_done"] > len(previous.get("train_rel_l2_per_epoch", []))
    for k in ("peak_memory_bytes", "peak_memory_bytes_solving"):
        res[k] = s.get(k) if trained_now else previous.get(k)
    return res


def memory_sweep(spec: dict) -> dict:
    """Peak training memory of FNO-DEQ (solver iterations) and IFNO (unrolled depth), one step each."""
    import gc

    import torch

    from implicit.distributed import resolve_device
    from pde.models import build_model
    from pde.train import load_split, relative_l2

    dev = resolve_device(spec.get("device"))
    small = spec["small"]
    batch = 4 if small else 8  # a ratio is measured; batch 8 keeps IFNO at 48 iterations ~8 GB beside the others
    ds = load_split(Path(spec["train_file"]), limit=batch)
    x = ((ds.x - ds.x.mean()) / ds.x.std()).to(dev)
    y = ds.y.to(dev)
    width, modes = (8, 4) if small else (32, 12)
    depths = [2, 4, 6] if small else [8, 16, 32, 48]
    out: dict = {"iterations": depths, "batch": batch, "fno-deq": [], "ifno": [], "step_s": {"fno-deq": [], "ifno": []}}
    # the first configuration runs twice and only its second run counts, so that one-off effects of the
    # first model in the process (allocator state, FFT plans) do not distort the smallest depth
    for run, n in enumerate([depths[0]] + depths):
        for name, kw in (("fno-deq", dict(max_iter=n, eval_max_iter=n, tol=1e-12, backward="phantom",
                                          backward_options={"steps": 1, "damping": 0.5}, pretrain_steps=0)),
                         ("ifno", dict(iterations=n))):
            torch.manual_seed(0)
            net = build_model(name, width=width, modes=modes, norm=None, **kw).to(dev)
            opt = torch.optim.Adam(net.parameters(), lr=1e-4)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(dev)
            base = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
            times = []
            for i in range(3):
                t0 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                relative_l2(net(x), y).mean().backward()
                opt.step()
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                times.append(time.perf_counter() - t0)
            if run > 0:
                out[name].append(torch.cuda.max_memory_allocated(dev) - base if dev.type == "cuda" else None)
                out["step_s"][name].append(min(times[1:]))
            del net, opt
            gc.collect()
    return out


# ----------------------------------------------------------------------------------- scheduler

# a run's paths, and what is set at run time: none of them changes what the run learns (deterministic: its
# last bits only, which runs without it do not repeat anyway)
MACHINE_KEYS = frozenset({"device", "out", "data", "plot", "eval_every", "noise_scale", "deterministic"})
_TRAIN_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}


def finished_for(run: dict | None, plan: dict) -> bool:
    """Whether ``run`` (a job's result) is a finished training of ``plan`` (the job's config): it ran the plan's
    epochs. A run trained on under a longer plan counts at the plan's epochs where the length changed nothing it
    did up to them: the same settings and no cosine schedule (a constant-rate FNO-DEQ resumed under an 8-epoch
    plan and stopped at its 6th epoch is a 6-epoch run; with a cosine schedule its rate had already differed)."""
    if not run or run.get("epochs_done") != plan["epochs"]:
        return False
    recorded = run.get("config") or {}
    if run.get("epochs", recorded.get("epochs", plan["epochs"])) == plan["epochs"]:  # records may predate "epochs"
        return True
    return _same_training_up_to(run, plan)


def _same_settings(recorded: dict, plan: dict) -> bool:
    """Whether a run whose recorded config is ``recorded`` trained with ``plan``'s settings, its length and
    machine aside. A record that predates a setting ran with TrainConfig's default for it."""
    return all(recorded.get(k, _TRAIN_DEFAULTS.get(k)) == v
               for k, v in plan.items() if k not in MACHINE_KEYS | {"epochs"})


def _same_training_up_to(run: dict, plan: dict) -> bool:
    """Whether ``run``, trained under a longer plan, did what ``plan`` does up to the plan's epochs: a constant
    rate (a cosine schedule's rate depends on the length) and otherwise the same settings."""
    recorded = run.get("config") or {}
    return recorded.get("scheduler", "cosine") != "cosine" and _same_settings(recorded, plan)


# a job's result gives the test solve of its last epoch under these keys, and of every evaluation in its
# test_solver_curve (runs before that curve was recorded have the last epoch's only)
TEST_SOLVE_KEYS = ("test_solver_iters", "test_solver_residual", "test_solver_rel_residual")


def at_plan_epochs(run: dict | None, plan: dict) -> dict | None:
    """``run`` as a finished training of ``plan``, or ``None`` where it is not one. A run that is one
    (:func:`finished_for`) is itself; a run that trained past the plan's epochs under a longer constant-rate plan
    with the same settings (e.g. all 8 epochs of a cell whose 6-epoch plan was never run on its own) is read at
    the plan's last epoch from its per-epoch records: test error from its test curve, which must hold that epoch,
    the test solve from its ``test_solver_curve`` where it has one (else left out), train error and per-epoch
    lists cut there. Its wall clock is left out, ``epoch_time_s`` stays the whole run's median, and
    ``read_at_epoch_of`` keeps the epochs it trained."""
    if finished_for(run, plan):
        return run
    e = plan["epochs"]
    if not run or run.get("epochs_done", 0) <= e or not _same_training_up_to(run, plan):
        return None
    test = {int(epoch): err for epoch, err in run.get("test_rel_l2_curve") or []}
    per_epoch = run.get("train_rel_l2_per_epoch") or []
    if e not in test or len(per_epoch) < e:
        return None
    view = {k: v[:e] if k.endswith("_per_epoch") and isinstance(v, list) else v
            for k, v in run.items() if k not in TEST_SOLVE_KEYS}
    solves = [c for c in run.get("test_solver_curve") or [] if c["epoch"] <= e]
    view.update(epochs_done=e, test_rel_l2=test[e], train_rel_l2=per_epoch[e - 1], wall_clock_s=None,
                test_rel_l2_curve=[p for p in run["test_rel_l2_curve"] if p[0] <= e],
                read_at_epoch_of=run["epochs_done"])
    if "test_solver_curve" in run:
        view["test_solver_curve"] = solves
    view.update({k: v for c in solves if c["epoch"] == e for k, v in c.items() if k != "epoch"})
    return view


def reuse_runs(results_files: list[str], jobs: list[dict], out: Path) -> list[str]:
    """Seed ``out/jobs`` with the finished trainings a results file records (``metrics.runs``), so that
    a command on a fresh machine skips them and only adds what is new (e.g. a seed). Only runs of
    this plan with all their epochs (:func:`at_plan_epochs`: a run of a longer constant-rate plan counts at
    this plan's epochs, as it stood at them) and the same training settings (a recorded config, where there is one, with
    TrainConfig's defaults for keys it predates) are taken, and an existing job result is never
    overwritten. A run that predates its own record of where it trained takes the file's device, torch
    and commit, so the merged results name that machine too (``trained_on``)."""
    planned = {j["id"]: j for j in jobs if j["kind"] == "train"}
    (out / "jobs").mkdir(parents=True, exist_ok=True)
    taken = []
    for f in results_files:
        recorded = json.loads(Path(f).read_text())
        origin = {k: recorded[k] for k in RUN_ENVIRONMENT if k in recorded}
        for jid, r in recorded["metrics"]["runs"].items():
            j = planned.get(jid)
            dest = out / "jobs" / f"{jid}.json"
            r = at_plan_epochs(r, j["config"]) if j else None
            if r and not dest.exists() and (r.get("config") is None or _same_settings(r["config"], j["config"])):
                write_json_atomic(dest, r if "device" in r else {**r, **origin})
                taken.append(jid)
    return taken


def visible_gpus(device: str) -> list[str]:
    """The GPUs one command spreads its processes over: with ``--device cuda`` on a host with several, every
    one this process sees (as CUDA_VISIBLE_DEVICES names them, so a parent's choice is kept); else none, and
    every process takes ``device`` as given."""
    if device != "cuda":
        return []
    import torch

    n = torch.cuda.device_count()
    named = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    gpus = [g.strip() for g in named.split(",")][:n] if named else [str(i) for i in range(n)]
    return gpus if len(gpus) > 1 else []


# a training's load on a GPU relative to a baseline FNO's. Paper-size NS on one H200: three FNO-DEQs alone took
# 171 s an epoch, six baselines alone 37-41 s, so about 57 s against 6.5 s a run (..._target_noise_0.001_nu0.001
# log); IFNO's epochs took 0.8x FNO-DEQ's beside it at 64x64 (fno_deq_ns.json). Data and memory jobs count as one.
GPU_COST = {"fno-deq": 9.0, "ifno": 7.0}


def job_cost(job: dict) -> float:
    """``job``'s expected load on its GPU, in baseline trainings (:data:`GPU_COST`)."""
    return GPU_COST.get((job.get("config") or {}).get("model"), 1.0) if job["kind"] == "train" else 1.0


def launch_order(pending: list[dict]) -> list[dict]:
    """The jobs to start, heaviest first (plan order among equals): with :func:`least_loaded` this spreads a
    paper-size NS cell over two GPUs as two FNO-DEQs on one and the third with the six baselines on the other,
    where plan order (which interleaves the models) would put a baseline beside the two."""
    return sorted(pending, key=job_cost, reverse=True)


def least_loaded(gpus: list[str], busy: list[tuple[str, float]]) -> str:
    """The GPU whose running processes of this command cost least (``busy``: ``(gpu, cost)`` per running
    process, costs from :func:`job_cost`), the first such in order."""
    load = dict.fromkeys(gpus, 0.0)
    for gpu, cost in busy:
        load[gpu] += cost
    return min(gpus, key=load.__getitem__)  # min keeps the first of equals


def run_jobs(jobs: list[dict], args, deadline: float) -> None:
    """Run ``jobs`` as subprocesses, ``args.jobs`` at once, each once its ``needs`` are done; on a host with
    several GPUs (:func:`visible_gpus`) each process is pinned to the least loaded one (:func:`least_loaded`)."""
    out = Path(args.out)
    (out / "jobs").mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    def finished(j: dict) -> bool:  # a data/memory job that wrote its result, a training with all its epochs
        path = out / "jobs" / f"{j['id']}.json"
        if not path.is_file():
            return False
        return j["kind"] != "train" or at_plan_epochs(json.loads(path.read_text()), j["config"]) is not None

    pending = [j for j in jobs if not finished(j)]
    done = {j["id"] for j in jobs if j not in pending}
    failed: set[str] = set()
    retried: set[str] = set()
    by_id = {j["id"]: j for j in jobs}
    running: dict[str, tuple[subprocess.Popen, float, str | None]] = {}
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True")
    gpus = visible_gpus(args.device)
    if gpus and pending:
        print(f"{len(gpus)} GPUs ({','.join(gpus)}): each process on the least loaded one", flush=True)
    t_start = time.time()
    while pending or running:
        for jid, (proc, t0, gpu) in list(running.items()):
            if proc.poll() is not None:
                del running[jid]
                ok = proc.returncode == 0
                print(f"[{time.time() - t_start:6.0f} s] {'done' if ok else 'FAILED'} {jid} ({time.time() - t0:.0f} s"
                      f"{f', GPU {gpu}' if gpu else ''})", flush=True)
                if ok:
                    done.add(jid)
                    continue
                # the reason goes into the main log (a device run returns only that), then one retry:
                # trainings resume from their last checkpoint (e.g. after an out-of-memory among many jobs)
                tail = (out / "logs" / f"{jid}.log").read_text(errors="replace").strip().splitlines()[-3:]
                print("    " + "\n    ".join(tail), flush=True)
                job = by_id[jid]
                if job["kind"] == "train" and jid not in retried:
                    retried.add(jid)
                    pending.append(job)
                    print(f"    retrying {jid} from its checkpoint", flush=True)
                else:
                    failed.add(jid)
        for j in launch_order(pending):
            if any(n in failed for n in j["needs"]):
                pending.remove(j)
                failed.add(j["id"])
                print(f"skipped {j['id']}: a job it needs failed", flush=True)
                continue
            limit = args.jobs + (1 if j["kind"] != "train" else 0)  # data and memory jobs take an extra slot
            if len(running) >= limit or not all(n in done for n in j["needs"]):
                continue
            if j["kind"] == "train" and time.time() > deadline - 20:
                continue  # no time left for a useful epoch; a later command resumes it
            spec = dict(j, deadline=deadline, result=str(out / "jobs" / f"{j['id']}.json"))
            spec_path = out / "jobs" / f"{j['id']}.spec.json"
            write_json_atomic(spec_path, spec)
            log = open(out / "logs" / f"{j['id']}.log", "a")
            busy = [(g, job_cost(by_id[jid])) for jid, (_, _, g) in running.items()]
            gpu = least_loaded(gpus, busy) if gpus else None
            proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_path)],
                                    stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT),
                                    env=dict(env, CUDA_VISIBLE_DEVICES=gpu) if gpu else env)
            running[j["id"]] = (proc, time.time(), gpu)
            pending.remove(j)
        if pending and not running and all(j["kind"] == "train" for j in pending) and time.time() > deadline - 20:
            print(f"budget spent: {len(pending)} training(s) not started; re-run to continue", flush=True)
            break
        time.sleep(0.5)


# ----------------------------------------------------------------------------------- results

RUN_ENVIRONMENT = ("device", "torch", "commit")  # the keys implicit.results.run_environment gives a run


def _agg(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values), "values": values}


def record_command(out: Path, seconds: float) -> list[float]:
    """Append one command's duration to ``<out>/commands.json``: a run resumed over several commands reports
    their sum as its wall-clock time, not only the last command's."""
    path = out / "commands.json"
    times = json.loads(path.read_text()) if path.is_file() else []
    times.append(seconds)
    write_json_atomic(path, times)
    return times


def trained_on(runs: list[dict | None]) -> dict[str, str] | None:
    """Device, torch and commit of the runs that recorded them (each value joined with " + " where runs
    differ), so a results file collected on another machine names where its runs trained; None where no run
    recorded them (runs that predate the record, or reused from older files), and the collecting process
    is named instead."""
    recorded = [r for r in runs if r and "device" in r]
    if not recorded:
        return None
    return {k: " + ".join(sorted({str(r.get(k)) for r in recorded})) for k in RUN_ENVIRONMENT}


# a run's (its folder, seed, data), its noise setting's, and the machine's (``--device``: the collecting one's
# where ``--collect-only`` runs elsewhere; the results file names the machines the runs trained on)
RUN_KEYS = ("out", "seed", "data", "noise_level", "noise_on", "noise_scale", "device")


def model_configs(train_jobs: list[dict]) -> dict[str, dict]:
    """Each model's training config, less what belongs to one run, noise setting or machine. Taken from the model's
    first planned run, so a plan without the clean cell (``--ns-settings input-noise-0.001``) still records
    e.g. FNO-DEQ's Jacobian weight, which ``fno_deq_ns_summary.py`` tells its trainings apart by."""
    models: dict[str, dict] = {}
    for j in train_jobs:
        models.setdefault(j["model"], {k: v for k, v in j["config"].items() if k not in RUN_KEYS})
    return models


CELL_RUN_KEYS = ("seed", "test_rel_l2", "train_rel_l2", "epochs_done", "epochs", "epoch_time_s", "peak_memory_bytes",
                 "peak_memory_bytes_solving", "test_solver_iters", "test_solver_rel_residual", "test_solver_residual",
                 "noise_scale", "wall_clock_s", "test_rel_l2_curve")  # what a results file's table cell keeps of a run


def cell_summary(model: str, runs: list[dict], finished: set[int], parameters: int | None) -> dict:
    """One (data, setting, model) cell of a results file: its runs and their mean ± std test error, epochs,
    time per epoch, peak memory and (FNO-DEQ, IFNO) test solve. ``finished``: the seeds that trained all the
    plan's epochs. A run cut by the budget is not averaged with finished ones (its error is that of fewer
    epochs); only where no run finished does the cell report the cut runs."""
    done = [r for r in runs if r["seed"] in finished]
    rs = done or runs
    cell: dict = {"runs": runs, "test_rel_l2": _agg([r["test_rel_l2"] for r in rs]),
                  "epochs_done": sorted({r["epochs_done"] for r in rs}), "complete": len(done) == len(runs),
                  "cut_runs": {r["seed"]: r["epochs_done"] for r in runs if r not in done},
                  "parameters": parameters,
                  "epoch_time_s_concurrent": statistics.fmean(r["epoch_time_s"] for r in rs)}
    mem = [r["peak_memory_bytes"] for r in rs if r.get("peak_memory_bytes")]
    cell["peak_train_memory_bytes"] = max(mem) if mem else None
    solving = [r["peak_memory_bytes_solving"] for r in rs if r.get("peak_memory_bytes_solving")]
    if solving:  # FNO-DEQ past its warm-up: the implicit training's own peak
        cell["peak_train_memory_bytes_solving"] = max(solving)
    # FNO-DEQ's test solve; IFNO's last unrolled step (runs before it was recorded have none)
    for key in ("test_solver_iters", "test_solver_rel_residual"):
        vals = [r.get(key) for r in rs]
        if model in ("fno-deq", "ifno") and None not in vals:
            cell[key] = statistics.fmean(vals)
    return cell


def comparison_targets(accuracy: dict) -> dict[str, dict]:
    """The issue's accuracy targets: in each (data, setting), FNO-DEQ's mean test error below each baseline's."""
    from implicit.results import target

    targets = {}
    for data_key, per_setting in accuracy.items():
        for setting, per_model in per_setting.items():
            deq = per_model.get("fno-deq")
            if deq is None:
                continue
            for base in (b for b in BASELINES if b in per_model):
                b = per_model[base]
                t = target(deq["test_rel_l2"]["mean"], b["test_rel_l2"]["mean"], "<")
                t.update(n_seeds=[deq["test_rel_l2"]["n"], b["test_rel_l2"]["n"]],
                         std=[deq["test_rel_l2"]["std"], b["test_rel_l2"]["std"]],
                         complete=deq["complete"] and b["complete"])
                targets[f"{data_key}_{setting}_fno_deq_rel_l2_below_{base}"] = t
    return targets


def memory_targets(memory: dict | None) -> dict[str, dict]:
    """The issue's memory targets from the Darcy sweep over solver iterations (8 to 48): FNO-DEQ's peak flat
    within 10%, IFNO's growing. The sweep runs on CUDA only; without it the first is reported unmet."""
    from implicit.results import target

    if memory and all(v is not None for v in memory["fno-deq"] + memory["ifno"]):
        return {"fno_deq_peak_memory_max_over_min_8_to_48_iterations":
                target(max(memory["fno-deq"]) / min(memory["fno-deq"]), 1.10, "<="),
                "ifno_peak_memory_growth_8_to_48_iterations": target(memory["ifno"][-1] / memory["ifno"][0], 1.10, ">")}
    return {"fno_deq_peak_memory_max_over_min_8_to_48_iterations": {
        "value": None, "target": 1.10, "op": "<=", "met": False, "note": "measured on CUDA only"}}


def collect(args, jobs: list[dict], t_start: float) -> list[Path]:
    """Write the results files from the finished jobs; wall-clock time: the commands ``record_command`` logged
    on ``args.out`` (this one's since ``t_start`` where none did)."""
    from implicit.distributed import resolve_device
    from implicit.results import write_results

    out = Path(args.out)
    results = {}
    for j in jobs:
        p = out / "jobs" / f"{j['id']}.json"
        if p.is_file():
            r = json.loads(p.read_text())
            # a run past this plan's epochs (a longer constant-rate plan) is recorded as it stood at them
            results[j["id"]] = (at_plan_epochs(r, j["config"]) or r) if j["kind"] == "train" else r
    device = resolve_device(args.device)
    commands = out / "commands.json"
    # --collect-only with no commands.json (job files gathered from elsewhere): no wall-clock time to report
    command_s = (json.loads(commands.read_text()) if commands.is_file() else
                 [] if args.collect_only else [time.time() - t_start])
    paths = []
    for problem in ("darcy", "ns"):
        keys = sorted({j["data"] for j in jobs
                       if j["kind"] == "train" and (j["data"] == "darcy") == (problem == "darcy")})
        if not keys:
            continue
        accuracy: dict = {}  # data -> setting -> model -> the runs' records, then the cell's summary
        runs: dict = {}
        finished_seeds: dict = {}  # (data, setting, model) -> the seeds with all the plan's epochs
        parameters: dict = {}  # (data, model) -> the parameter count its first run records
        for j in jobs:
            if j["kind"] != "train" or j["data"] not in keys:
                continue
            r = results.get(j["id"])
            runs[j["id"]] = r
            if r and "parameters" in r:
                parameters.setdefault((j["data"], j["model"]), r["parameters"])
            if not r or "test_rel_l2" not in r:
                continue
            per_model = accuracy.setdefault(j["data"], {}).setdefault(j["setting"], {})
            per_model.setdefault(j["model"], []).append({k: r.get(k) for k in CELL_RUN_KEYS})
            if finished_for(r, j["config"]):
                finished_seeds.setdefault((j["data"], j["setting"], j["model"]), set()).add(r["seed"])
        for data_key, per_setting in accuracy.items():
            for setting, per_model in per_setting.items():
                for name, cell_runs in per_model.items():
                    finished = finished_seeds.get((data_key, setting, name), set())
                    per_model[name] = cell_summary(name, cell_runs, finished, parameters.get((data_key, name)))
        targets = comparison_targets(accuracy)
        memory = results.get("memory") if problem == "darcy" else None
        if problem == "darcy":
            targets.update(memory_targets(memory))
        train_jobs = [j for j in jobs if j["kind"] == "train" and j["data"] in keys]
        n_done = sum(1 for j in train_jobs if finished_for(results.get(j["id"]), j["config"]))
        data_info = {k: {"recipe": j["recipe"], "generation": results.get(j["id"])}
                     for k in keys for j in jobs if j["id"] == f"data-{k}"}
        models = model_configs(train_jobs)
        protocol = _protocol(args, problem, n_done, len(train_jobs), models.get("fno-deq", {}).get("pretrain_steps"))
        config = {"protocol": protocol, "small": args.small, "budget_s": args.budget_s, "concurrent_jobs": args.jobs,
                  "epochs": args.epochs if problem == "darcy" else args.ns_epochs,
                  "seeds": args.seeds if problem == "darcy" else args.ns_seeds, "data": data_info,
                  "runs_finished": f"{n_done}/{len(train_jobs)}",
                  "models": models,
                  "paper_test_rel_l2": PAPER.get(problem), "command_wall_clock_s": command_s}
        metrics = {"accuracy": accuracy, "memory_vs_iterations": memory, "runs": runs}
        name = "fno_deq_" + problem + ("_small" if args.small else "")
        trained = [results.get(j["id"]) for j in train_jobs]
        peaks = [r["peak_memory_bytes"] for r in trained if r and r.get("peak_memory_bytes")]
        paths.append(write_results(name, config=config, metrics=metrics, targets=targets, device=device,
                                   wall_clock_s=sum(command_s) if command_s else None, out_dir=out,
                                   measured_on=trained_on(trained),  # the runs trained in their own processes:
                                   peak_memory_bytes=max(peaks) if peaks else None))  # their peak, not this one's
        _plot(accuracy, memory, out / f"{name}.png", problem)
        print(f"wrote {paths[-1]}  ({n_done}/{len(train_jobs)} runs finished all epochs)")
        for k, v in targets.items():
            note = f" ({v['note']})" if v.get("note") else ""
            print(f"  {k}: {v['value']} {v['op']} {v['target']} -> {'met' if v['met'] else 'NOT met'}{note}")
    return paths


def _protocol(args, problem: str, n_done: int, n_all: int, warmup_steps: int | None = None) -> str:
    """The results file's one-paragraph account of where this run matched the paper and where it did not
    (``warmup_steps``: FNO-DEQ's unrolled warm-up as planned, None where it did not train)."""
    if args.small:
        return "SMALL CPU smoke run: toy data and model sizes; the numbers mean nothing."
    loss = ("relative L2 loss summed over the batch (the paper's)" if args.loss_reduction == "sum" else
            "relative L2 loss averaged over the batch (paper: summed, which makes Adam's coupled decay 32x weaker)")
    if problem == "darcy":
        norm = ("pointwise normalisation and spectral convolutions without bias (the paper's); FNO-DEQ with the "
                "exact implicit gradient (paper: phantom)" if args.paper_match else
                "per-channel normalisation (paper: pointwise)")
    else:
        norm = ("the paper's normaliser (mean 0, one scale per field from the clean training set; the paper's is "
                "fixed per data set) and spectral convolutions without bias" if args.paper_match else
                "per-channel normalisation (paper: a fixed per-dataset scale with mean 0); neuraloperator's spectral "
                "convolutions with bias (paper: none)")
    parts = ["Every model the same epochs, batch 32, Adam with weight decay 1e-4", loss, norm]
    if warmup_steps is not None:
        parts.append(f"FNO-DEQ's first {warmup_steps} steps unrolled, its warm-up (paper: 300 steps)")
    if args.jac_reg:
        parts.append(f"FNO-DEQ with a Jacobian regulariser of weight {args.jac_reg:g} (paper: none)")
    common = "; ".join(parts) + ". Runs train concurrently on one GPU, so epoch times are concurrent times. "
    if problem == "darcy":
        models = args.models.replace(",", ", ") if args.models else "fno-d4, fno++-d4, ifno (12 unrolled), fno-deq"
        return (f"REDUCED protocol: {args.epochs} epochs (paper: 500), seeds {args.seeds} (paper: 3), models {models} "
                "(paper also depth 1, 2); lr 1e-3 cosine per step; no norm (paper's Darcy runs). "
                "Data: this package's darcy-85 recipe (1024 train / 500 test), not the .mat files. "
                "Noise: variances {0, 1e-9, ..., 1e-3}, one chunk of the training set each, on the raw coefficient "
                "(values 3/12: the paper's protocol, a small perturbation) or the raw solution, "
                + ("drawn anew each epoch (paper: once); " if args.noise_per_epoch else "drawn once (the paper's); ")
                + "clean test data. "
                + common + f"{n_done}/{n_all} runs finished all epochs; the others report epochs_done.")
    noise = (f"Noise: the paper's NS variance levels up to {args.ns_noise}, scaled by var(our raw field) / "
             "var(paper's raw field) (noise_scale per run) so the signal-to-noise ratio is the paper's, "
             + ("drawn anew each epoch (the paper's). " if args.noise_per_epoch else
                "drawn once per run (paper: anew each epoch). ")
             if args.ns_noise else "Clean training data only (no noise settings). ")
    return (f"REDUCED protocol: {args.ns_epochs} epochs (paper: 500), seeds {args.ns_seeds} (paper: 3), "
            f"{args.ns_train} train / {args.ns_test} test samples (paper: 4500 / 500) at "
            f"{128 // args.ns_subsample}x{128 // args.ns_subsample} (paper: 128), viscosities {args.ns_viscosities}; "
            "lr 5e-3 constant, instance norm (paper's NS runs) except in FNO-DEQ (no norm: with it the tied block "
            "has no fixed point the solver reaches). Data: this package's steady NS recipes (Newton-Krylov "
            "steady states, not time-stepped jax-cfd). " + noise + common
            + f"{n_done}/{n_all} runs finished all epochs; the others report epochs_done.")


def _short_label(data_key: str, setting: str, problem: str) -> str:
    """'ns-nu0.01', 'target-noise-0.004' -> 'nu=0.01\ntarget\n4e-3': bar labels that fit side by side."""
    where, _, level = setting.partition("-noise-")
    label = f"{where}\n{float(level):.0e}".replace("e-0", "e-") if level else setting
    return f"nu={data_key.removeprefix('ns-nu')}\n{label}" if problem == "ns" else label


MODEL_COLORS = {"fno-d4": "C0", "fno++-d4": "C1", "ifno": "C2", "fno-deq": "C3"}  # the same in both panels


def _figure(accuracy: dict, memory: dict | None, problem: str):
    """Left: test error per setting, one bar per model that ran (mean of seeds, std bars, a dot per seed, so
    one diverged run shows as itself rather than as a wide bar; hatched where runs were cut short of their
    epochs). Right: Darcy's training memory against depth, or the test-error curves (mean of seeds; one line
    style per viscosity) of the clean runs, or of the first setting where a file has no clean cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(k, s) for k in accuracy for s in accuracy[k]]
    names = [n for n in MODEL_COLORS if any(n in accuracy[k][s] for k, s in panels)]
    fig, (a, b) = plt.subplots(1, 2, figsize=(max(13, 4 + 1.1 * len(panels)), 4.2))
    w = 0.8 / max(1, len(names))
    for i, n in enumerate(names):
        cells = [(jx, accuracy[k][s][n]) for jx, (k, s) in enumerate(panels) if n in accuracy[k][s]]
        errors = [(jx, c["test_rel_l2"]) for jx, c in cells]
        a.bar([jx + i * w for jx, _ in errors], [e["mean"] for _, e in errors], yerr=[e["std"] for _, e in errors],
              width=w, label=n, color=MODEL_COLORS[n],
              hatch=["//" if c.get("complete") is False else "" for _, c in cells])
        seeds = [(jx + i * w, v) for jx, e in errors for v in e.get("values", [])]
        if seeds:
            a.plot(*zip(*seeds), "o", ms=3.5, mfc="white", mec="k", mew=0.8, zorder=3,
                   label="seeds" if i == 0 else None)
    a.set_xticks([j + 0.4 - w / 2 for j in range(len(panels))],
                 [_short_label(k, s, problem) for k, s in panels], fontsize=7)
    a.set_ylabel("test relative L2\n(mean and std of seeds; dots: seeds)")
    a.legend(fontsize=8)
    cut = any(c.get("complete") is False for k, s in panels for c in accuracy[k][s].values())
    a.set_title(f"{problem}: test error per training setting" + (" (hatched: runs cut short)" if cut else ""))
    if memory and memory.get("fno-deq") and memory["fno-deq"][0] is not None:
        for n in ("fno-deq", "ifno"):
            b.plot(memory["iterations"], [m / 2**20 for m in memory[n]], "o-", label=n, color=MODEL_COLORS[n])
        b.set_xlabel("solver iterations (FNO-DEQ) / unrolled depth (IFNO)")
        b.set_ylabel(f"peak training memory (MiB, batch {memory['batch']})")
        b.legend()
        b.set_title("Training memory vs depth")
    else:
        shown = {k: "clean" if "clean" in accuracy[k] else next(iter(accuracy[k]), "clean") for k in accuracy}
        for style, k in zip(("o-", "s--", "^:"), accuracy):
            for n in names:
                curves = [dict(r["test_rel_l2_curve"]) for r in accuracy[k].get(shown[k], {}).get(n, {}).get("runs", [])
                          if r.get("test_rel_l2_curve")]
                epochs = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
                if epochs:  # runs reused from files that predate the curves have none
                    b.plot(epochs, [statistics.fmean(c[e] for c in curves) for e in epochs], style,
                           color=MODEL_COLORS[n], label=f"{k} {n}")
        b.set_xlabel("epoch")
        b.set_ylabel(f"test relative L2 ({', '.join(sorted(set(shown.values())))}, mean of seeds)")
        b.set_yscale("log")
        if b.lines:
            b.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _plot(accuracy: dict, memory: dict | None, path: Path, problem: str) -> None:
    save_figure_atomic(_figure(accuracy, memory, problem), path, dpi=90)


# ----------------------------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(ROOT / "experiments" / "results"),
                   help="results, data, runs, logs (default experiments/results; runs then under runs/fno_deq)")
    p.add_argument("--small", action="store_true",
                   help="toy data and models on the CPU (about a minute); its defaults: 2 epochs, NS seed 0, "
                        "nu=0.01, noise 0.004, 2 jobs; flags given still apply")
    p.add_argument("--problems", default="darcy,ns", help="darcy, ns or both")
    p.add_argument("--budget-s", type=float, default=540.0, help="wall-clock budget of this command (s)")
    p.add_argument("--jobs", type=int, default=12, help="training processes at once")
    p.add_argument("--device", default="auto", help="device of every training (auto: cuda if present)")
    p.add_argument("--epochs", type=int, default=10, help="Darcy epochs of every model (paper: 500)")
    p.add_argument("--seeds", default="0,1", help="Darcy seeds (paper: 0,1,2; a second command with 0,1,2 adds seed 2)")
    p.add_argument("--loss-reduction", default="mean", choices=["mean", "sum"],
                   help="relative L2 over the batch: mean (every run so far) or sum (the paper's code)")
    p.add_argument("--darcy-settings", default="",
                   help="comma-separated subset of the Darcy settings (clean, input-noise-0.001, target-noise-0.001)")
    p.add_argument("--models", default="",
                   help="comma-separated subset of the models (fno-d4, fno++-d4, ifno, fno-deq; default all)")
    p.add_argument("--paper-match", action="store_true",
                   help="Darcy: the configs' current settings (the paper's pointwise normaliser, no spectral bias; "
                        "FNO-DEQ with the exact gradient, adjoint tolerance 1e-4); NS: no spectral bias and the "
                        "paper's normaliser (mean 0, a scale per field; with --loss-reduction sum, the paper's loss "
                        "too); default: the earlier settings")
    p.add_argument("--checkpoint-unrolled", action="store_true",
                   help="FNO-DEQ's warm-up and IFNO recompute their unrolled iterations in the backward (same "
                        "gradients, less memory: the NS warm-up's peak is about twice the implicit training's)")
    p.add_argument("--solver-graph", action="store_true",
                   help="FNO-DEQ's forward solve replayed as a CUDA graph (same results, ~1.14x faster epochs)")
    p.add_argument("--deterministic", action="store_true",
                   help="every training with pde.train's deterministic option: bitwise-repeatable GPU runs "
                        "(torch's deterministic algorithms; slower). Reused runs without it still count")
    p.add_argument("--jac-reg", type=float, default=0.0,
                   help="FNO-DEQ's Jacobian regulariser weight (pde.train's jac_reg; 0, the paper's: off)")
    p.add_argument("--ns-epochs", type=int, default=6, help="Navier-Stokes epochs of every model")
    p.add_argument("--ns-seeds", default="0", help="Navier-Stokes seeds")
    p.add_argument("--ns-viscosities", default="0.01,0.001")
    p.add_argument("--ns-train", type=int, default=1000, help="NS training samples (paper: 4500)")
    p.add_argument("--ns-test", type=int, default=200, help="NS test samples (paper: 500)")
    p.add_argument("--ns-subsample", type=int, default=2, help="NS grid stride on the 128 grid (paper: 128, i.e. 1)")
    p.add_argument("--ifno-noisy", action="store_true",
                   help="train IFNO on the noisy settings too (default: clean only)")
    p.add_argument("--ns-noise", default="0.004", help="NS maximum noise variances (paper: 0.001,0.004)")
    p.add_argument("--noise-per-epoch", action="store_true",
                   help="draw the noise anew each epoch, as the paper's NS loader (default: once per run, as its "
                        "Darcy loader and every run in experiments/results)")
    p.add_argument("--ns-settings", default="",
                   help="comma-separated subset of the NS settings --ns-noise gives (clean, input-noise-0.004, ...)")
    p.add_argument("--reuse", action="append", default=[], metavar="RESULTS_JSON",
                   help="take the finished runs a results file records instead of training them again")
    p.add_argument("--collect-only", action="store_true",
                   help="write the results files from the runs already in OUT/jobs (e.g. job files gathered there "
                        "from several machines), training nothing and recording no command")
    return p


# --small: the toy run's defaults (a flag given on the command line wins), and the flags its toy data fixes
SMALL_DEFAULTS = {"epochs": 2, "ns_epochs": 2, "ns_seeds": "0", "ns_viscosities": "0.01", "ns_noise": "0.004",
                  "device": "cpu", "jobs": 2}
SMALL_DATA_FIXES = ("ns_viscosities", "ns_train", "ns_test", "ns_subsample")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line. Under ``--small`` the toy defaults replace the others, but every flag given still
    applies (``--small --ns-seeds 0,1`` trains both seeds), and a flag the toy data ignores stops the command
    rather than being dropped."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.small:
        return args
    parser.set_defaults(**SMALL_DEFAULTS)
    args = parser.parse_args(argv)
    ignored = [f for f in SMALL_DATA_FIXES if getattr(args, f) != parser.get_default(f)]
    if ignored:
        flags = ", ".join("--" + f.replace("_", "-") for f in ignored)
        raise SystemExit(f"--small trains on its own toy data (NS: nu=0.01, 32/8 samples at 16x16), "
                         f"which {flags} cannot change; drop --small to set them")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return _worker(args.worker)
    from implicit.distributed import resolve_device

    args.device = str(resolve_device(args.device))
    t_start = time.time()
    deadline = t_start + args.budget_s - (20 if args.small else 30)  # room to evaluate and write the results
    jobs = plan(args)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.reuse:
        taken = reuse_runs(args.reuse, jobs, Path(args.out))
        print(f"reused {len(taken)} finished runs from {', '.join(args.reuse)}", flush=True)
    if args.collect_only and not any((Path(args.out) / "jobs" / f"{j['id']}.json").is_file() for j in jobs):
        raise SystemExit(f"--collect-only: none of the {len(jobs)} planned jobs has a result in {args.out}/jobs")
    if not args.collect_only:
        print(f"{sum(j['kind'] == 'train' for j in jobs)} trainings, {args.jobs} at once, "
              f"budget {args.budget_s:.0f} s, out {args.out}", flush=True)
        run_jobs(jobs, args, deadline)
        record_command(Path(args.out), time.time() - t_start)
    collect(args, jobs, t_start)
    print(f"total {time.time() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
