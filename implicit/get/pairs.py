"""Noise/image pairs from a diffusion teacher, in one resumable HDF5 file.

The file holds ``noise`` (x_T) and ``image`` (the teacher's deterministic sample
from that x_T), both ``(sample, channel, x, y)`` float32, plus ``label`` for a
class-conditional teacher. Its attributes hold the recipe (teacher, sampler:
sequential DDIM or DEQ-DDIM, steps, seed, batch size, versions). Noise for chunk
``k`` comes from a generator seeded with ``(seed, k)`` on the CPU, so a file is
reproducible chunk by chunk and an interrupted run resumes where it stopped. The
file is written under ``<name>.partial`` and renamed when complete.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

__all__ = ["write_pairs", "load_pairs", "chunk_noise", "teacher_sampler"]

SampleFn = Callable[[Tensor, "Tensor | None"], Tensor]


def chunk_noise(seed: int, chunk: int, batch: int, shape: tuple[int, ...], num_classes: int = 0):
    """The x_T (and labels) of chunk ``chunk``: CPU float32, reproducible on any device."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(chunk))
    x = torch.randn(batch, *shape, generator=g)
    y = torch.randint(0, num_classes, (batch,), generator=g) if num_classes > 0 else None
    return x, y


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("implicit-sciml")
    except Exception:  # not installed: running from a checkout
        return "unknown"


def write_pairs(
    path: str | Path,
    sample_fn: SampleFn,
    *,
    n: int,
    shape: tuple[int, ...],
    batch_size: int = 256,
    seed: int = 0,
    num_classes: int = 0,
    recipe: dict | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    stop_after_chunks: int | None = None,
) -> Path:
    """Write ``n`` pairs ``(x_T, sample_fn(x_T, y))`` to ``path``; resume a ``.partial`` file.

    ``recipe`` (teacher, sampler, steps...) is stored in the attributes with the
    arguments here; resuming with a different recipe raises. ``stop_after_chunks``
    stops early (for tests of resumption). Returns the final path (or the partial
    one when stopped early).
    """
    import h5py
    from tqdm.auto import tqdm

    if n < 1 or batch_size < 1:
        raise ValueError(f"n and batch_size must be positive, got {n}, {batch_size}")
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    full = dict(recipe or {}, n=n, shape=list(shape), batch_size=batch_size, seed=seed, num_classes=num_classes)
    key = json.dumps(full, sort_keys=True, default=str)
    if path.exists():
        with h5py.File(path, "r") as fh:
            if fh.attrs.get("recipe") != key:
                raise ValueError(f"{path} exists with a different recipe; remove it or choose another path")
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "a" if partial.exists() else "w"
    with h5py.File(partial, mode) as fh:
        if mode == "w":
            fh.attrs["recipe"] = key
            for k, v in full.items():
                fh.attrs[k] = json.dumps(v) if isinstance(v, (dict, list)) else v
            fh.attrs["package_version"] = str(_version())
            fh.attrs["torch_version"] = str(torch.__version__)
            fh.attrs["done"] = 0
            fh.attrs["teacher_seconds"] = 0.0
            chunks = (min(batch_size, n), *shape)
            fh.create_dataset("noise", (n, *shape), "f4", chunks=chunks)
            fh.create_dataset("image", (n, *shape), "f4", chunks=chunks)
            if num_classes > 0:
                fh.create_dataset("label", (n,), "i8")
        elif fh.attrs.get("recipe") != key:
            raise ValueError(f"{partial} was started with a different recipe; remove it to start over")
        done = int(fh.attrs["done"])
        n_chunks = -(-n // batch_size)
        bar = tqdm(total=n, initial=done, desc="pairs", unit="img", disable=not progress)
        written = 0
        for chunk in range(done // batch_size, n_chunks):
            if stop_after_chunks is not None and written >= stop_after_chunks:
                bar.close()
                return partial
            lo, hi = chunk * batch_size, min(n, (chunk + 1) * batch_size)
            x, y = chunk_noise(seed, chunk, batch_size, shape, num_classes)
            x, y = x[: hi - lo], (y[: hi - lo] if y is not None else None)
            start = time.perf_counter()
            with torch.no_grad():
                img = sample_fn(x.to(device), None if y is None else y.to(device))
            img = img.float().cpu()
            fh.attrs["teacher_seconds"] = float(fh.attrs["teacher_seconds"]) + time.perf_counter() - start
            if img.shape != x.shape:
                raise ValueError(f"sample_fn returned shape {tuple(img.shape)} for noise {tuple(x.shape)}")
            fh["noise"][lo:hi] = x.numpy()
            fh["image"][lo:hi] = img.numpy()
            if y is not None:
                fh["label"][lo:hi] = y.numpy()
            fh.attrs["done"] = hi
            fh.flush()
            written += 1
            bar.update(hi - lo)
        bar.close()
        stats = getattr(sample_fn, "stats", None)
        if stats:
            fh.attrs["sampler_stats"] = json.dumps(stats, default=float)
    os.replace(partial, path)
    return path


def load_pairs(path: str | Path, holdout: int = 0) -> dict[str, Tensor | dict]:
    """Read a complete pairs file: ``noise``, ``image``, ``label`` (or None), split off the last ``holdout``.

    Returns a dict with ``train`` and ``test`` (each ``{noise, image, label}``) and ``attrs``.
    """
    import h5py

    path = Path(path)
    if not path.exists():
        partial = path.with_name(path.name + ".partial")
        hint = " (a .partial file exists: re-run `implicit get pairs` to finish it)" if partial.exists() else ""
        raise FileNotFoundError(f"no pairs file at {path}{hint}")
    with h5py.File(path, "r") as fh:
        noise = torch.from_numpy(np.asarray(fh["noise"]))
        image = torch.from_numpy(np.asarray(fh["image"]))
        label = torch.from_numpy(np.asarray(fh["label"])) if "label" in fh else None
        attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in fh.attrs.items()}
    if not 0 <= holdout < len(noise):
        raise ValueError(f"holdout must be in [0, {len(noise)}), got {holdout}")
    cut = len(noise) - holdout

    def part(sl: slice) -> dict:
        return {"noise": noise[sl], "image": image[sl], "label": None if label is None else label[sl]}

    return {"train": part(slice(0, cut)), "test": part(slice(cut, None)), "attrs": attrs}


def teacher_sampler(teacher: str | Path, *, sampler: str = "ddim", steps: int = 100,
                    device: str | torch.device = "cpu", **options: Any) -> tuple[SampleFn, dict]:
    """A ``sample_fn(x_T, y)`` running the package's diffusion teacher, and its recipe entries.

    ``sampler`` is ``"ddim"`` (sequential, eta=0) or ``"deq-ddim"`` (the whole chain as one
    fixed point, solved by the backend); both come from :mod:`implicit.diffusion`.
    """
    from . import _teacher

    return _teacher.sampler(teacher, sampler=sampler, steps=steps, device=device, **options)
