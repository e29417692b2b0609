"""Noise schedules and DDIM timesteps, matching diffusers' ``DDIMScheduler`` for the same config.

Written out (rather than calling the scheduler) because the samplers need every
step's coefficients as tensors indexed by step number, so one batched call can
advance many steps at once; diffusers' scheduler steps one timestep at a time.
The arithmetic follows ``DDIMScheduler.step`` (Song et al., 2021, arXiv 2010.02502)
operation for operation, so float32 results agree with diffusers' to rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor

__all__ = ["DDIMSchedule", "PREDICTION_TYPES", "TIMESTEP_SPACINGS", "BETA_SCHEDULES"]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def _betas(n: int, beta_start: float, beta_end: float, schedule: str, trained_betas) -> Tensor:
    if trained_betas is not None:
        return torch.tensor(trained_betas, dtype=torch.float32)
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, n, dtype=torch.float32)
    if schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float32) ** 2
    if schedule == "squaredcos_cap_v2":  # Nichol & Dhariwal (2021) cosine schedule
        f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        return torch.tensor([min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)], dtype=torch.float32)
    raise ValueError(f'beta_schedule must be one of {BETA_SCHEDULES}, got "{schedule}"')


def _zero_terminal_snr(betas: Tensor) -> Tensor:
    """Rescale betas so the last timestep has zero SNR (Lin et al., 2023, Algorithm 1)."""
    s = torch.cumprod(1 - betas, 0).sqrt()
    s0, sT = s[0].clone(), s[-1].clone()
    s = (s - sT) * (s0 / (s0 - sT))
    ab = s**2
    return 1 - torch.cat([ab[:1], ab[1:] / ab[:-1]])


@dataclass(frozen=True, eq=False)
class DDIMSchedule:
    """The DDIM quantities of a diffusers ``DDIMScheduler`` configuration.

    Attributes:
        alphas_cumprod: ``(num_train_timesteps,)`` float32, as diffusers computes it.
        final_alpha_cumprod: alpha-bar used past ``t = 0`` (1 with ``set_alpha_to_one``).
    """

    alphas_cumprod: Tensor
    final_alpha_cumprod: float = 1.0
    prediction_type: str = "epsilon"
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    timestep_spacing: str = "leading"
    steps_offset: int = 0

    def __post_init__(self):
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f'prediction_type must be one of {PREDICTION_TYPES}, got "{self.prediction_type}"')
        if self.timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f'timestep_spacing must be one of {TIMESTEP_SPACINGS}, got "{self.timestep_spacing}"')

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    @classmethod
    def create(
        cls,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Any = None,
        clip_sample: bool = True,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        clip_sample_range: float = 1.0,
        timestep_spacing: str = "leading",
        rescale_betas_zero_snr: bool = False,
        thresholding: bool = False,
        **_ignored: Any,
    ) -> "DDIMSchedule":
        """Build from ``DDIMScheduler``'s constructor arguments (same names and defaults)."""
        if thresholding:
            raise ValueError("thresholding=True (dynamic thresholding) is not supported by these samplers")
        betas = _betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
        if rescale_betas_zero_snr:
            betas = _zero_terminal_snr(betas)
        ac = torch.cumprod(1.0 - betas, dim=0)
        final = 1.0 if set_alpha_to_one else float(ac[0])
        return cls(ac, final, prediction_type, bool(clip_sample), float(clip_sample_range), timestep_spacing,
                   int(steps_offset))

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | Any) -> "DDIMSchedule":
        """From a diffusers scheduler (DDIM or DDPM) or its ``config`` mapping."""
        cfg = getattr(config, "config", config)
        return cls.create(**dict(cfg))

    def timesteps(self, n_steps: int) -> Tensor:
        """The ``n_steps`` training timesteps DDIM visits, descending, as ``set_timesteps`` gives them."""
        N = self.num_train_timesteps
        if int(n_steps) != n_steps or not 1 <= n_steps <= N:
            raise ValueError(f"n_steps must be an integer in [1, {N}], got {n_steps}")
        if self.timestep_spacing == "linspace":
            ts = np.linspace(0, N - 1, n_steps).round()[::-1].copy().astype(np.int64)
        elif self.timestep_spacing == "leading":
            ts = (np.arange(0, n_steps) * (N // n_steps)).round()[::-1].copy().astype(np.int64) + self.steps_offset
        else:
            ts = np.round(np.arange(N, 0, -N / n_steps)).astype(np.int64) - 1
        return torch.from_numpy(ts)

    def coefficients(self, n_steps: int, eta: float, dtype: torch.dtype, device: torch.device) -> dict[str, Tensor]:
        """Per-step DDIM coefficients, each ``(n_steps,)`` in ``dtype``; step ``k`` maps ``x_{t_k}`` to its successor.

        Keys: ``t`` (long timesteps), ``a`` / ``a_prev`` (alpha-bar now / next), ``sqrt_a``,
        ``sqrt_1ma`` (sqrt(1 - a)), ``sqrt_a_prev``, ``dir`` (the coefficient of the predicted
        noise) and ``sigma`` (the noise scale, ``eta`` times the DDPM posterior std).
        """
        if eta < 0:
            raise ValueError(f"eta must be non-negative, got {eta}")
        t = self.timesteps(n_steps)
        prev = t - self.num_train_timesteps // n_steps  # diffusers' rule, whatever the spacing
        ac = self.alphas_cumprod.to(dtype)
        a = ac[t]
        final = torch.tensor(self.final_alpha_cumprod, dtype=torch.float32).to(dtype)
        a_prev = torch.where(prev >= 0, ac[prev.clamp(min=0)], final)
        variance = ((1 - a_prev) / (1 - a)) * (1 - a / a_prev)
        sigma = eta * variance**0.5
        out = {"a": a, "a_prev": a_prev, "sqrt_a": a**0.5, "sqrt_1ma": (1 - a) ** 0.5,
               "sqrt_a_prev": a_prev**0.5, "dir": (1 - a_prev - sigma**2) ** 0.5, "sigma": sigma}
        out = {k: v.to(device) for k, v in out.items()}
        out["t"] = t.to(device)
        return out

    def to_config(self) -> dict:
        """The fields that define this schedule (alphas_cumprod as a list), for results files."""
        return {"num_train_timesteps": self.num_train_timesteps, "final_alpha_cumprod": self.final_alpha_cumprod,
                "prediction_type": self.prediction_type, "clip_sample": self.clip_sample,
                "clip_sample_range": self.clip_sample_range, "timestep_spacing": self.timestep_spacing,
                "steps_offset": self.steps_offset}
