"""What one FNO-DEQ training step keeps for its backward: the unrolled warm-up, the warm-up with its
iterations recomputed (``checkpoint_unrolled``), and the implicit training after it, with its forward solve
eager or replayed as a CUDA graph (``solver_graph``) (writes fno_deq_warmup_memory[_cpu].json and .png).

At the paper's Navier-Stokes size (128x128, batch 32, ``ns-fno-deq.toml``: 12 warm-up iterations, then
Anderson with the phantom gradient and the Jacobian regulariser) the runs of ``fno_deq.py`` peaked at
13.5 GB, while three of them past the warm-up held 22.9 GB of the GPU together. The bytes autograd keeps
between forward and backward are the same on any device, so this counts them (each storage once) for one
step of each phase, and checks that recomputing the warm-up leaves its gradient unchanged. On a GPU it
also records each step's CUDA peak above the model and its input, and its median time over 5 steps (the
recomputed warm-up's cost in time is their ratio, both measured in one process, as is the graphed solve's
saving).

    python experiments/fno_deq_warmup_memory.py --out DIR               # CPU: ~4 minutes, ~14 GB of RAM
    python experiments/fno_deq_warmup_memory.py --small --out /tmp/w    # CPU smoke run, seconds
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from implicit.bench._timing import peak_memory, saved_for_backward_bytes, timed
from implicit.distributed import resolve_device
from implicit.results import save_figure_atomic, target, write_results
from pde.datasets import IO_VARIABLES, load_recipe
from pde.models import build_model
from pde.train import load_config

ROOT = Path(__file__).resolve().parents[1]
WHOLE_RUN = 10**9  # warm-up steps that outlast every repeated step below
PHASES = {  # name -> (model overrides, whether the step adds the Jacobian regulariser)
    "warm-up": ({"pretrain_steps": WHOLE_RUN, "checkpoint_unrolled": False}, False),
    "warm-up, recomputed": ({"pretrain_steps": WHOLE_RUN, "checkpoint_unrolled": True}, False),
    "implicit": ({"pretrain_steps": 0}, True),
    # the forward solve's iterations replayed as a CUDA graph (``solver_graph``; the same as "implicit" on a CPU)
    "implicit, graphed solve": ({"pretrain_steps": 0, "solver_options": {"graph": True}}, True),
}


def training_step(cfg, overrides: dict, jac_reg: bool, x: torch.Tensor, device: torch.device):
    """A fresh model (seed 0) and a function running one training forward; the loss it returns."""
    torch.manual_seed(0)
    model = build_model(cfg.model, **dict(cfg.model_kwargs(x.shape[1], 1), **overrides)).to(device).train()

    def forward() -> torch.Tensor:
        loss = model(x).square().mean()
        if jac_reg:
            loss = loss + cfg.jac_reg * model.last_result.stats["jac_loss"]
        return loss
    return model, forward


def max_rel_diff(grads: tuple, others: tuple) -> float:
    """The largest difference between two gradients of one model, relative to each parameter's largest entry."""
    return max(float((g - h).abs().max() / g.abs().max().clamp_min(1e-30))
               for g, h in zip(grads, others) if g is not None)


def main(argv: list[str] | None = None) -> Path:
    """Measure every phase and write the results file (named for the device it ran on); returns its path."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "experiments" / "configs" / "ns-fno-deq.toml"))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--device", default="auto")
    p.add_argument("--small", action="store_true", help="width 8, 4 modes, batch 2 at 32x32")
    p.add_argument("--out", default="experiments/results")
    a = p.parse_args(argv)
    device = resolve_device(a.device)
    overrides = dict(width=8, modes=4) if a.small else {}
    cfg = load_config(path=a.config, device=str(device), **overrides)
    batch, res = (2, 32) if a.small else (a.batch, a.resolution)
    inputs, _ = IO_VARIABLES[load_recipe(cfg.data)["generator"]]  # NS: the forcing's two components
    x = torch.randn(batch, len(inputs), res, res, generator=torch.Generator().manual_seed(0)).to(device)
    t_start = time.perf_counter()
    metrics: dict = {"phases": {}}
    grads = {}
    for name, (over, jac) in PHASES.items():
        model, forward = training_step(cfg, over, jac, x, device)
        saved, loss = saved_for_backward_bytes(forward)
        mode = model.last_stats["mode"]
        grads[name] = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
        row = {"saved_for_backward_bytes": saved, "model_mode": mode}
        if device.type == "cuda":  # the whole step, forward and backward, above the model and input
            del loss
            model, forward = training_step(cfg, over, jac, x, device)
            row["cuda_peak_bytes"] = peak_memory(lambda: forward().backward(), device)
            row["step_seconds"], _ = timed(lambda: forward().backward(), device, repeats=5)
            if model.last_stats["mode"] != mode:  # every timed step must be of this phase
                raise RuntimeError(f"{name}: timed a {model.last_stats['mode']} step, not {mode}")
        metrics["phases"][name] = row
        print(f"{name}: {saved / 2**30:.3f} GiB kept for the backward ({mode})"
              + (f", CUDA peak {row['cuda_peak_bytes'] / 2**30:.3f} GiB, {row['step_seconds']:.3f} s a step"
                 if "cuda_peak_bytes" in row else ""),
              flush=True)
    phases = metrics["phases"]
    if device.type == "cuda":  # what recomputing the warm-up costs, and graphing the solve saves, in time
        seconds = {name: row["step_seconds"] for name, row in phases.items()}
        metrics["recomputed_warmup_time_ratio"] = seconds["warm-up, recomputed"] / seconds["warm-up"]
        metrics["graphed_solve_time_ratio"] = seconds["implicit, graphed solve"] / seconds["implicit"]
    metrics["recomputed_warmup_max_rel_grad_diff"] = max_rel_diff(grads["warm-up"], grads["warm-up, recomputed"])
    metrics["graphed_solve_max_rel_grad_diff"] = max_rel_diff(grads["implicit"], grads["implicit, graphed solve"])
    targets = {
        "recomputed_warmup_keeps_less_than_implicit_step": target(
            phases["warm-up, recomputed"]["saved_for_backward_bytes"], phases["implicit"]["saved_for_backward_bytes"],
            "<"),
        "recomputed_warmup_gradient_unchanged": target(metrics["recomputed_warmup_max_rel_grad_diff"], 1e-5, "<="),
    }
    config = {"config": str(Path(a.config).relative_to(ROOT)) if Path(a.config).is_relative_to(ROOT) else a.config,
              "batch": batch, "resolution": res, "in_channels": len(inputs), "small": a.small, "width": cfg.width, "modes": cfg.modes,
              "pretrain_iter": cfg.pretrain_iter, "max_iter": cfg.max_iter, "backward": cfg.backward,
              "backward_steps": cfg.backward_steps, "jac_reg": cfg.jac_reg,
              "measure": "bytes of the storages autograd saves during one training forward (each counted once); on "
                         "CUDA also max_memory_allocated over forward and backward above the model and input, and "
                         "the median seconds of forward and backward over 5 steps after one",
              "input": "random N(0, 1) fields (the counts depend on shapes, not values)"}
    name = "fno_deq_warmup_memory" + ("_small" if a.small else "") + ("_cpu" if device.type == "cpu" else "")
    path = write_results(name, config=config, metrics=metrics, targets=targets, device=device,
                         wall_clock_s=time.perf_counter() - t_start, out_dir=a.out)
    plot(metrics, path.with_suffix(".png"), f"{res}x{res}, batch {batch}")
    print({k: v["met"] for k, v in targets.items()}, "\nwrote", path)
    return path


def plot(metrics: dict, path: Path, title: str) -> None:
    """Bytes kept for the backward (bars) and CUDA peaks (dots) by phase; step times beside them on a GPU."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = metrics["phases"]
    names = list(phases)
    colors = ["tab:red", "tab:green", "tab:blue", "tab:purple"][:len(names)]
    labels = [n.replace(", ", ",\n") for n in names]
    timed = all("step_seconds" in row for row in phases.values())
    fig, axes = plt.subplots(1, 2 if timed else 1, figsize=(10 if timed else 6, 3.4), squeeze=False)
    ax = axes[0, 0]
    saved = [phases[n]["saved_for_backward_bytes"] / 2**30 for n in names]
    peaks = [phases[n].get("cuda_peak_bytes") for n in names]
    ax.bar(range(len(names)), saved, color=colors, label="kept for the backward")
    tops = saved
    if all(p is not None for p in peaks):
        peaks = [p / 2**30 for p in peaks]
        ax.plot(range(len(names)), peaks, "ko", label="CUDA peak of the step")
        tops = [max(a, b) for a, b in zip(saved, peaks)]
        ax.legend(fontsize=8)
    for i, (v, top) in enumerate(zip(saved, tops)):  # the label above both the bar and its dot
        ax.annotate(f"{v:.2f}", (i, top), xytext=(0, 4), textcoords="offset points", ha="center", fontsize=8)
    ax.set_ylim(0, 1.2 * max(tops))
    ax.set_xticks(range(len(names)), labels, fontsize=8)
    ax.set_ylabel("GiB")
    ax.set_title(f"memory of one training step ({title})", fontsize=9)
    if timed:
        ax = axes[0, 1]
        seconds = [phases[n]["step_seconds"] for n in names]
        ax.bar(range(len(names)), seconds, color=colors)
        for i, v in enumerate(seconds):
            ax.annotate(f"{v:.3f} s", (i, v), xytext=(0, 4), textcoords="offset points", ha="center", fontsize=8)
        ax.set_ylim(0, 1.2 * max(seconds))
        ax.set_xticks(range(len(names)), labels, fontsize=8)
        ax.set_ylabel("seconds (median of 5 steps)")
        ax.set_title("time of one training step, forward and backward", fontsize=9)
    fig.suptitle("FNO-DEQ by training phase", fontsize=10)
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=110)


if __name__ == "__main__":
    main()
