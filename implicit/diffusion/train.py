"""Teacher training: a diffusers ``UNet2DModel`` with the DDPM noise-prediction loss (Ho et al., 2020).

Data are available offline: scikit-learn's 8x8 digits upsampled (bilinear) to the model
size, or 2-D fields from the package's PDE data files (``pde`` HDF5: Darcy ``solution``,
Navier-Stokes ``vorticity``), each scaled to [-1, 1]. The result is a ``DDIMPipeline``
folder (``save_pretrained``: ``unet/`` + ``scheduler/``) that diffusers and
:func:`implicit.diffusion.load_local` read. Training resumes from ``checkpoint.pt`` in the
output folder, written atomically (temporary file, then rename).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..results import global_rng_state, save_torch_atomic, set_global_rng_state

__all__ = ["TrainConfig", "UNET_SIZES", "make_unet", "load_images", "train_teacher"]

# block_out_channels, layers_per_block, attention in the last down block
UNET_SIZES = {
    "tiny": ((8, 16), 1, False),
    "small": ((32, 64, 64), 1, True),
    "cifar": ((128, 256, 256, 256), 2, True),  # DDPM CIFAR-10 size, about 35.7M parameters at 32x32
}


def make_unet(size: str = "small", sample_size: int = 32, channels: int = 1):
    """A diffusers ``UNet2DModel`` of a named size (see ``UNET_SIZES``)."""
    from diffusers import UNet2DModel

    if size not in UNET_SIZES:
        raise ValueError(f'size must be one of {sorted(UNET_SIZES)}, got "{size}"')
    blocks, layers, attn = UNET_SIZES[size]
    n = len(blocks)
    down = ["DownBlock2D"] * n
    up = ["UpBlock2D"] * n
    if attn:
        down[-2] = "AttnDownBlock2D"
        up[1] = "AttnUpBlock2D"
    groups = 4 if blocks[0] < 32 else 32
    return UNet2DModel(sample_size=sample_size, in_channels=channels, out_channels=channels,
                       layers_per_block=layers, block_out_channels=blocks, down_block_types=tuple(down),
                       up_block_types=tuple(up), norm_num_groups=groups)


def load_images(data: str = "digits", size: int = 32, channels: int = 1) -> torch.Tensor:
    """Training images (N, channels, size, size) in [-1, 1]: ``"digits"`` or a ``pde`` HDF5 file path.

    The sources are grey-scale; ``channels > 1`` repeats them (e.g. a 3-channel CIFAR-size UNet).
    """
    if channels < 1:
        raise ValueError(f"channels must be positive, got {channels}")
    if data == "digits":
        from sklearn.datasets import load_digits

        x = torch.tensor(load_digits().images, dtype=torch.float32)[:, None] / 16.0
    else:
        path = Path(data)
        if not path.is_file():
            raise ValueError(f'data must be "digits" or an existing HDF5 file from `implicit data generate`, '
                             f"got {data!r}")
        import h5py

        with h5py.File(path, "r") as fh:
            name = next((v for v in ("solution", "vorticity") if v in fh), None)
            if name is None:
                raise ValueError(f"{path} has neither a 'solution' nor a 'vorticity' variable")
            x = torch.tensor(fh[name][...], dtype=torch.float32)[:, None]
        lo = x.amin(dim=(2, 3), keepdim=True)
        hi = x.amax(dim=(2, 3), keepdim=True)
        x = (x - lo) / (hi - lo).clamp_min(1e-12)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (2 * x - 1).clamp(-1, 1).repeat(1, channels, 1, 1)


@dataclass(frozen=True)
class TrainConfig:
    """Teacher training options (written into the checkpoint and the run folder)."""

    data: str = "digits"
    size: str = "small"
    sample_size: int = 32
    channels: int = 1
    steps: int = 4000
    batch: int = 64
    lr: float = 2e-4
    num_train_timesteps: int = 1000
    seed: int = 0
    save_every: int = 500


def _legacy_rng_state(ckpt: dict) -> dict:
    """The random state of a checkpoint written before ``global_rng`` (keys ``rng`` and ``cuda_rng``), in
    :func:`implicit.results.global_rng_state`'s form, so older teacher runs still resume."""
    cuda = ckpt.get("cuda_rng")
    return {"cpu": ckpt["rng"], "cuda": [] if cuda is None else [cuda]}


def train_teacher(out: str | Path, config: TrainConfig = TrainConfig(), device: str | torch.device = "cpu",
                  progress: bool = True) -> Path:
    """Train (or resume) a teacher in ``out``; returns the folder holding the saved pipeline."""
    from diffusers import DDIMPipeline, DDIMScheduler

    out, device = Path(out), torch.device(device)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint.pt"
    torch.manual_seed(config.seed)
    images = load_images(config.data, config.sample_size, config.channels)
    unet = make_unet(config.size, config.sample_size, images.shape[1]).to(device)
    opt = torch.optim.AdamW(unet.parameters(), lr=config.lr)
    start = 0
    if ckpt_path.is_file():
        # on the CPU: RNG states must stay CPU byte tensors (map_location=cuda broke resuming on a GPU)
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if ckpt["config"] != asdict(config):
            raise ValueError(f"{ckpt_path} was written with a different config; use a new folder or the same options")
        unet.load_state_dict(ckpt["unet"])
        opt.load_state_dict(ckpt["opt"])  # moves the state to the parameters' device
        start = ckpt["step"]
        set_global_rng_state(ckpt["global_rng"] if "global_rng" in ckpt else _legacy_rng_state(ckpt), device)
    scheduler = DDIMScheduler(num_train_timesteps=config.num_train_timesteps, clip_sample=True)
    ac = scheduler.alphas_cumprod.to(device)
    images = images.to(device)
    steps = range(start, config.steps)
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps, initial=start, total=config.steps, desc="train teacher")
    unet.train()
    for i in steps:
        x = images[torch.randint(len(images), (config.batch,), device="cpu").to(device)]
        t = torch.randint(config.num_train_timesteps, (config.batch,), device="cpu").to(device)
        noise = torch.randn_like(x)
        a = ac[t].view(-1, 1, 1, 1)
        loss = F.mse_loss(unet(a.sqrt() * x + (1 - a).sqrt() * noise, t).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress:
            steps.set_postfix(loss=f"{loss.item():.4f}")
        if (i + 1) % config.save_every == 0 or i + 1 == config.steps:
            save_torch_atomic({"unet": unet.state_dict(), "opt": opt.state_dict(), "step": i + 1,
                               "config": asdict(config), "global_rng": global_rng_state(device)}, ckpt_path)
    unet.eval()
    DDIMPipeline(unet=unet, scheduler=scheduler).save_pretrained(out / "pipeline")
    return out / "pipeline"
