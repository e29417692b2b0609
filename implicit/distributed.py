"""Device and torchrun set-up shared by the training and sampling entry points (PDE operators, GET, DEQ-DDIM)."""

from __future__ import annotations

import os

import torch


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """The device a ``--device`` / config name gives: ``"auto"`` (or ``None``) is CUDA where present, else the CPU;
    a CUDA device on a machine without CUDA is refused here, with a message that says so. Under torchrun
    ``rank_device`` then gives each rank its own GPU. Every entry point picks its device here, so a bad name fails
    the same way everywhere, before any work."""
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f'device "{name}" requested but CUDA is not available')
    return dev


def init_process_group_for(device: torch.device) -> tuple[int, int, int | None]:
    """``(rank, world_size, local_rank)``. Under torchrun (``WORLD_SIZE`` > 1) this starts the process group
    unless it is running already: NCCL where ``device`` is CUDA, gloo otherwise (NCCL rejects CPU tensors, so
    ``--device cpu`` on a GPU machine needs gloo). ``local_rank`` is ``LOCAL_RANK`` (else the rank) inside a
    group and None outside one, where the answer is ``(0, 1, None)``."""
    import torch.distributed as dist

    if not dist.is_available():
        return 0, 1, None
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # torch._dynamo (which diffusers imports) imported after the group starts keeps the gloo backend and
        # its threads alive past destroy_process_group, and the process then aborts at exit now and then
        # ("terminate called without an active exception"); imported first, destroy stops them.
        import torch._dynamo  # noqa: F401

        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if not dist.is_initialized():
        return 0, 1, None
    rank = dist.get_rank()
    return rank, dist.get_world_size(), int(os.environ.get("LOCAL_RANK", rank))


def rank_device(device: torch.device, world: int, local_rank: int | None) -> torch.device:
    """This rank's device: under a group of several ranks a CUDA ``device`` becomes ``cuda:<local_rank>`` and
    the current CUDA device; otherwise ``device`` as given."""
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device


def setup_device(name: str) -> tuple[torch.device, int, int]:
    """``(device, rank, world_size)`` for a ``--device`` / config name: :func:`resolve_device`, the process group
    under torchrun (:func:`init_process_group_for`), then this rank's device (:func:`rank_device`)."""
    device = resolve_device(name)
    rank, world, local_rank = init_process_group_for(device)
    return rank_device(device, world, local_rank), rank, world
