"""Adapters: a diffusers ``UNet2DModel`` (+ ``DDIMScheduler``) as ``eps(x, t)`` plus a :class:`DDIMSchedule`.

Models load only from a local folder written by ``save_pretrained`` (never the hub).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .schedule import DDIMSchedule

__all__ = ["UNetEps", "load_local"]


class UNetEps:
    """``eps(x, t)`` for a diffusers ``UNet2DModel``: casts to the UNet's dtype and back."""

    def __init__(self, unet: Any):
        self.unet = unet

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        return self.unet(x.to(self.unet.dtype), t).sample.to(x.dtype)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images the UNet takes."""
        cfg = self.unet.config
        size = cfg.sample_size if isinstance(cfg.sample_size, (tuple, list)) else (cfg.sample_size,) * 2
        return (cfg.in_channels, *size)


def load_local(folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """Load ``(eps, schedule, unet, scheduler)`` from a local diffusers pipeline or model folder.

    ``folder`` holds ``unet/`` and ``scheduler/`` (a saved ``DDIMPipeline``/``DDPMPipeline``) or is
    itself a ``UNet2DModel`` folder (then the default ``DDIMScheduler`` config is used).
    """
    from diffusers import DDIMScheduler, UNet2DModel

    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"model folder {str(folder)!r} does not exist (models load from local folders only)")
    if (folder / "unet").is_dir():
        unet = UNet2DModel.from_pretrained(folder, subfolder="unet", local_files_only=True)
        scheduler = DDIMScheduler.from_pretrained(folder, subfolder="scheduler", local_files_only=True)
    elif (folder / "config.json").is_file():
        unet = UNet2DModel.from_pretrained(folder, local_files_only=True)
        scheduler = DDIMScheduler()
    else:
        raise ValueError(f"{str(folder)!r} holds neither unet/ + scheduler/ nor a UNet2DModel config.json")
    unet = unet.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return UNetEps(unet), DDIMSchedule.from_config(scheduler), unet, scheduler
