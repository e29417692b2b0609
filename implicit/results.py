"""Experiment results files: one JSON per study with config, metrics, targets and provenance."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from .distributed import resolve_device

_OPS = {"<=": lambda a, b: a <= b, ">=": lambda a, b: a >= b, "<": lambda a, b: a < b, ">": lambda a, b: a > b}


def target(value: float, goal: float, op: str) -> dict:
    """One entry of a results file's ``"targets"``: the value reached, the goal and whether it is met."""
    if op not in _OPS:
        raise ValueError(f"op must be one of {sorted(_OPS)}, got {op!r}")
    return {"value": value, "target": goal, "op": op, "met": bool(_OPS[op](value, goal))}


def device_name(device: torch.device | str | None = None) -> str:
    """Human-readable name of the device the numbers were measured on."""
    device = resolve_device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def git_commit() -> str:
    """The current git commit of the source tree, or "unknown" outside a checkout."""
    try:
        root = Path(__file__).resolve().parents[1]
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_environment(device: torch.device | str | None = None) -> dict[str, str]:
    """``{"device", "torch", "commit"}`` of this process: what a worker stores beside numbers that another
    process may collect into a results file."""
    return {"device": device_name(device), "torch": torch.__version__, "commit": git_commit()}


@contextmanager
def atomic_path(path: str | Path) -> Iterator[str]:
    """A temporary file beside ``path`` to write, renamed onto ``path`` when the block ends and removed
    if it raises: a run killed mid-write leaves the previous file whole, never a truncated one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp" + path.suffix)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json_atomic(path: str | Path, data: Any) -> Path:
    """Write JSON (indent 2) to ``path`` through :func:`atomic_path`."""
    with atomic_path(path) as tmp, open(tmp, "w") as fh:
        json.dump(data, fh, indent=2, default=float)
        fh.write("\n")
    return Path(path)


def save_torch_atomic(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to ``path`` through :func:`atomic_path`."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def save_figure_atomic(fig: Any, path: str | Path, *, close: bool = True, **savefig_kwargs: Any) -> Path:
    """``fig.savefig`` to ``path`` through :func:`atomic_path` (in ``path``'s format), then close ``fig``
    (unless ``close=False``) so long runs do not pile up open figures."""
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=Path(path).suffix.lstrip(".") or None, **savefig_kwargs)
    finally:
        if close:
            import matplotlib.pyplot as plt

            plt.close(fig)
    return Path(path)


def global_rng_state(device: torch.device | None = None) -> dict:
    """torch's global random streams, for a checkpoint: draws from them during training (Hutchinson
    probes, random initial states) then continue on resume exactly as in an uninterrupted run.

    CPU and every initialised CUDA device; with a CUDA ``device``, that device's stream alone (one
    process a device under DDP: each rank then restores rank 0's stream onto its own device).
    """
    if device is not None and device.type == "cuda":
        cuda = [torch.cuda.get_rng_state(device)]
    elif device is None and torch.cuda.is_initialized():
        cuda = torch.cuda.get_rng_state_all()
    else:
        cuda = []
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def set_global_rng_state(state: dict, device: torch.device | None = None) -> None:
    """Restore :func:`global_rng_state`'s streams (``device`` as given there). The states may have
    been loaded onto a GPU (``map_location``); torch takes them as CPU byte tensors."""
    torch.set_rng_state(state["cpu"].cpu())
    if not state["cuda"] or not torch.cuda.is_available():
        return
    if device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"][0].cpu(), device)
    elif device is None:
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


@contextmanager
def deterministic_algorithms(on: bool = True) -> Iterator[None]:
    """Bitwise-repeatable GPU numerics inside the block; ``on=False`` changes nothing.

    Without it, two CUDA runs of one seed part in the last bits (reductions whose order varies), and
    training grows the gap. Inside: torch's deterministic algorithms (an op that has none raises), cuDNN
    without autotuning, and cuBLAS's fixed workspace (``CUBLAS_WORKSPACE_CONFIG``, set when unset). Slower;
    the previous settings come back on exit. On the CPU these ops are repeatable already.
    """
    if not on:
        yield
        return
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2], before[3]


def write_results(
    name: str,
    *,
    config: dict,
    metrics: dict,
    targets: dict | None = None,
    device: torch.device | str | None = None,
    wall_clock_s: float | None = None,
    out_dir: str | Path = "experiments/results",
    measured_on: dict[str, str] | None = None,
    peak_memory_bytes: int | None = None,
) -> Path:
    """Write ``<out_dir>/<name>.json`` following the results contract in DESIGN.md. ``measured_on`` (keys of
    ``run_environment``) names where the numbers were made when that is not this process, e.g. runs trained
    on GPU machines and collected on a laptop; ``peak_memory_bytes`` likewise gives their peak where they ran
    in other processes (default: this process's CUDA peak)."""
    dev = resolve_device(device)
    data = {
        "name": name,
        **(measured_on or run_environment(dev)),
        "config": config,
        "metrics": metrics,
        "targets": targets or {},
        "wall_clock_s": wall_clock_s,
        "peak_memory_bytes": (peak_memory_bytes if peak_memory_bytes is not None else
                              torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None),
    }
    return write_json_atomic(Path(out_dir) / f"{name}.json", data)
