"""The diffusion teacher as a ``sample_fn(x_T, y) -> x_0`` for pair generation.

Loads the package's own teacher (or any local diffusers folder) through
:func:`implicit.diffusion.load_local` and samples with sequential DDIM or
DEQ-DDIM (eta = 0, deterministic), keeping per-call statistics for the file's recipe.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

TEACHER_SAMPLERS = ("ddim", "deq-ddim")


class TeacherSampler:
    """Callable ``(x_T, y) -> x_0``; ``stats`` accumulates calls, images and (DEQ-DDIM) parallel rounds."""

    def __init__(self, eps: Any, schedule: Any, sampler: str, steps: int, options: dict):
        if sampler not in TEACHER_SAMPLERS:
            raise ValueError(f'sampler must be one of {TEACHER_SAMPLERS}, got "{sampler}"')
        self.eps, self.schedule, self.sampler, self.steps, self.options = eps, schedule, sampler, steps, options
        self.stats: dict[str, float] = {"calls": 0, "images": 0}

    def __call__(self, x_T: Tensor, y: Tensor | None = None) -> Tensor:
        from ..diffusion import ddim, deq_ddim

        if y is not None:
            raise ValueError("the teacher is unconditional; draw pairs with num_classes=0")
        self.stats["calls"] += 1
        self.stats["images"] += len(x_T)
        if self.sampler == "ddim":
            return ddim(self.eps, x_T, self.schedule, self.steps, **self.options)
        x0, result = deq_ddim(self.eps, x_T, self.schedule, self.steps, backward=None, **self.options)
        self.stats["rounds_sum"] = self.stats.get("rounds_sum", 0) + float(result.n_iter.float().sum())
        self.stats["rounds_mean"] = self.stats["rounds_sum"] / self.stats["images"]
        self.stats["all_converged"] = bool(self.stats.get("all_converged", True) and result.all_converged)
        return x0


def sampler(teacher: str | Path, *, sampler: str = "ddim", steps: int = 100, device: str | torch.device = "cpu",
            **options: Any) -> tuple[TeacherSampler, dict]:
    """``(sample_fn, recipe)`` for the teacher folder ``teacher``; ``options`` go to the DDIM sampler."""
    from ..diffusion import load_local

    device = torch.device(device)
    if sampler == "ddim" and device.type == "cuda":
        options.setdefault("graph", True)  # the CUDA-graph sequential sampler: same numbers, faster
    if sampler == "deq-ddim":
        options.setdefault("tol", 1e-5)  # pairs should match sequential DDIM's images closely
    eps, schedule, unet, _ = load_local(teacher, device=device)
    fn = TeacherSampler(eps, schedule, sampler, steps, options)
    recipe = {"teacher": str(Path(teacher).resolve()), "sampler": sampler, "steps": steps, "eta": 0.0,
              "sampler_options": {k: v for k, v in options.items()}, "schedule": schedule.to_config(),
              "teacher_shape": list(eps.sample_shape)}
    return fn, recipe
